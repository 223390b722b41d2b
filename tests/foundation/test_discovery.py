"""Input discovery on the real dataset ds-real (read-only: copied when a test changes it)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import pytest

from qmri_bids.bids.discovery import (
    discover,
    list_subjects_on_disk,
    select_participants,
    summary_table,
)
from qmri_bids.errors import NothingSelectedError

ALL_SUBJECTS = ["balls01", "brain01", "brain02", "brain03", "kidney01", "neck01", "phantom01"]


@pytest.fixture(scope="module")
def found(ds_real, tmp_path_factory) -> dict[str, object]:
    db = tmp_path_factory.mktemp("bids_db")
    results = discover(ds_real, db, select_participants(ds_real, None))
    return {r.subject: r for r in results}


def _names(paths) -> list[str]:
    return [Path(p).name for p in paths]


def _sidecar(path: Path) -> dict:
    return json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())


def test_all_seven_subjects(ds_real, found):
    assert list_subjects_on_disk(ds_real) == ALL_SUBJECTS
    assert sorted(found) == ALL_SUBJECTS
    assert all(not r.empty for r in found.values())
    assert all(r.session is None for r in found.values())
    assert all(not r.skipped for r in found.values()), {s: r.skipped for s, r in found.items()}


def test_brain01_mts(found):
    res = found["brain01"]
    assert [a.suffix for a in res.anat] == ["T1w"]
    (col,) = res.collections
    assert col.suffix == "MTS"
    assert _names(m.path for m in col.members) == [
        "sub-brain01_flip-1_mt-off_MTS.nii.gz",
        "sub-brain01_flip-1_mt-on_MTS.nii.gz",
        "sub-brain01_flip-2_mt-off_MTS.nii.gz",
    ]
    trs = [m.metadata["RepetitionTimeExcitation"] for m in col.members]
    assert trs == [_sidecar(m.path)["RepetitionTimeExcitation"] for m in col.members]
    assert trs == [0.028, 0.028, 0.018]  # as in the dataset README
    assert [m.metadata["MTState"] for m in col.members] == [False, True, False]
    assert [m.metadata["FlipAngle"] for m in col.members] == [
        _sidecar(m.path)["FlipAngle"] for m in col.members]
    assert col.b1map is None


def test_brain02_vfa_with_2d_b1map(ds_real, found):
    res = found["brain02"]
    assert res.anat == []
    (col,) = res.collections
    assert col.suffix == "VFA"
    assert _names(m.path for m in col.members) == ["sub-brain02_flip-1_VFA.nii.gz",
                                                   "sub-brain02_flip-2_VFA.nii.gz"]
    assert [m.metadata["FlipAngle"] for m in col.members] == [3, 20]
    assert col.b1map is not None
    assert col.b1map.name == "sub-brain02_TB1map.nii.gz"
    # The B1 map is stored 2-D while the VFA images are 3-D with one slice: still attached.
    assert len(nib.load(str(col.b1map)).shape) == 2
    assert len(nib.load(str(col.members[0].path)).shape) == 3


def test_b1map_attached_only_through_intended_for(ds_real, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(ds_real, ds, ignore=shutil.ignore_patterns("derivatives"))
    side = ds / "sub-brain02" / "fmap" / "sub-brain02_TB1map.json"
    meta = json.loads(side.read_text())
    meta.pop("IntendedFor")
    side.write_text(json.dumps(meta))
    (res,) = discover(ds, tmp_path / "db", ["brain02"])
    assert res.collections[0].b1map is None
    assert [s.what for s in res.skipped] == ["TB1map"]
    assert "IntendedFor" in res.skipped[0].reason


def test_brain03_irt1(found):
    (col,) = found["brain03"].collections
    assert col.suffix == "IRT1"
    assert [m.entities["inv"] for m in col.members] == [str(i) for i in range(1, 10)]
    tis = [m.metadata["InversionTime"] for m in col.members]
    assert tis == sorted(tis) and len(set(tis)) == 9


def test_phantom01_irt1_numeric_order(found):
    (col,) = found["phantom01"].collections
    assert col.suffix == "IRT1"
    assert len(col.members) == 19
    # inv-10 sorts after inv-9 (numeric, not lexical, order)
    assert [int(m.entities["inv"]) for m in col.members] == list(range(1, 20))
    assert [m.metadata["InversionTime"] for m in col.members] == [
        _sidecar(m.path)["InversionTime"] for m in col.members]


def test_kidney01_mese_echo_times_ascending(found):
    (col,) = found["kidney01"].collections
    assert col.suffix == "MESE"
    assert len(col.members) == 10
    assert [int(m.entities["echo"]) for m in col.members] == list(range(1, 11))
    tes = [m.metadata["EchoTime"] for m in col.members]
    assert all(a < b for a, b in itertools.pairwise(tes)), tes


def test_neck01_mtr_and_anatomicals(found):
    res = found["neck01"]
    assert sorted(a.suffix for a in res.anat) == ["T1w", "T2starw", "T2w"]
    (col,) = res.collections
    assert col.suffix == "MTR"
    assert sorted(m.entities["mt"] for m in col.members) == ["off", "on"]
    assert {m.metadata["MTState"] for m in col.members} == {True, False}


def test_balls01_anatomicals_only(found):
    res = found["balls01"]
    assert sorted(a.suffix for a in res.anat) == ["T1w", "T2w"]
    assert res.collections == []
    # the sidecars are empty ({}): discovery must cope
    assert [a.metadata for a in res.anat] == [_sidecar(a.path) for a in res.anat]


def _table_rows(lines: list[str]) -> list[list[str]]:
    """The rows of a summary table (indented lines), split into (kind, found, plan)."""
    rows = []
    for line in lines:
        if line.startswith("  "):
            head, arrow, plan = line.partition("  -> ")
            assert arrow, f"row without a plan column: {line!r}"
            kind, found = head.strip().split(None, 1)
            rows.append([kind, found.strip(), plan])
    return rows


def test_summary_table(found):
    table = summary_table(list(found.values()))
    lines = table.splitlines()
    # one header line per participant (none has nothing to process), the rows indented below it
    headers = [line for line in lines if not line.startswith("  ")]
    assert headers == [f"sub-{sub}" for sub in found]
    assert sorted(headers) == [f"sub-{sub}" for sub in ALL_SUBJECTS]
    rows = _table_rows(lines)
    assert len(rows) + len(headers) == len(lines)
    assert ["MTS", "3 files", "-"] in rows
    assert ["VFA", "2 files + sub-brain02_TB1map.nii.gz", "-"] in rows
    assert ["IRT1", "19 files", "-"] in rows
    assert ["IRT1", "9 files", "-"] in rows
    assert ["MESE", "10 files", "-"] in rows
    assert ["MTR", "2 files", "-"] in rows
    assert sum(r[0] == "anat" and r[1].startswith("sub-neck01_") for r in rows) == 3
    assert not any(r[0] == "skipped" for r in rows)
    # the columns are aligned within each participant's block: every "->" at the same offset
    block: list[str] = []
    for line in [*lines, "END"]:
        if not line.startswith("  "):
            assert len({row.index("  -> ") for row in block}) <= 1, block
            block = []
        else:
            block.append(line)
    # planned outputs appear next to the inputs
    res = found["balls01"]
    planned = {str(a.path): ["bias n4"] for a in res.anat}
    planned_lines = summary_table([res], planned).splitlines()
    assert planned_lines[0] == "sub-balls01"
    assert _table_rows(planned_lines) == [
        ["anat", a.path.name, "bias n4"] for a in res.anat]


def test_selected_subjects_only_are_indexed(ds_real, tmp_path):
    results = discover(ds_real, tmp_path / "db", ["neck01"])
    assert [r.subject for r in results] == ["neck01"]
    assert any(tmp_path.joinpath("db").rglob("*.sqlite")), "the pybids index goes to database_dir"


def test_unknown_participant_raises(ds_real):
    with pytest.raises(NothingSelectedError, match="sub-brain99"):
        select_participants(ds_real, ["brain01", "brain99"])


def test_discovery_writes_nothing_into_the_dataset(ds_real, tmp_path):
    before = sorted(p.as_posix() for p in ds_real.rglob("*"))
    discover(ds_real, tmp_path / "db", ["balls01"])
    assert sorted(p.as_posix() for p in ds_real.rglob("*")) == before


# ------------------------------------------------------------- metadata checks (synthetic data)
MRF_PAIR = ("part-mag", "part-phase")


def _mrf_dataset(root: Path, meta: dict, with_tsv: bool, parts=MRF_PAIR) -> Path:
    """A dataset with one MRF series: one file per ``part`` (``None``: no part entity).

    By default a part-mag/part-phase pair, as MRF_CONVENTION.md requires, sharing ``meta``.
    """
    import numpy as np

    from ._helpers import make_tiny_bids, save_nifti

    ds = make_tiny_bids(root, subjects=("01",), shape=(8, 8, 4), suffixes=())
    anat = ds / "sub-01" / "anat"
    rng = np.random.default_rng(0)
    for part in parts:
        stem = "sub-01" + (f"_{part}" if part else "") + "_MRF"
        data = rng.random((8, 8, 1, 5))
        data = data * 2 * np.pi - np.pi if part == "part-phase" else data + 1
        save_nifti(anat / f"{stem}.nii.gz", data)
        sidecar = {**meta, "Units": "rad"} if part == "part-phase" else meta
        (anat / f"{stem}.json").write_text(json.dumps(sidecar))
    if with_tsv:
        (anat / "sub-01_mrfschedule.tsv").write_text(
            "FlipAngle\tRepetitionTimeExcitation\n" + "".join(f"{10 + i}\t0.012\n"
                                                              for i in range(5)))
    return ds


MRF_META = {"FlipAngle": [10, 20, 30, 40, 50], "RepetitionTimeExcitation": [0.012] * 5,
            "EchoTime": 0.002}


@pytest.mark.parametrize("meta, with_tsv, found_mrf, missing", [
    (MRF_META, False, True, None),
    ({"EchoTime": 0.002}, True, True, None),  # schedule in _mrfschedule.tsv
    ({"EchoTime": 0.002}, False, False, "FlipAngle"),
    ({"FlipAngle": [10, "x"], "RepetitionTimeExcitation": 0.012, "EchoTime": 0.002}, False,
     False, "FlipAngle"),
])
def test_mrf_schedule_metadata(tmp_path, meta, with_tsv, found_mrf, missing):
    ds = _mrf_dataset(tmp_path / "ds", meta, with_tsv)
    (res,) = discover(ds, tmp_path / "db", ["01"]) if found_mrf else (None,)
    if found_mrf:
        (col,) = res.collections
        assert col.suffix == "MRF"
        # one collection of the pair, grouped by the part entity (mag first)
        assert _names(m.path for m in col.members) == [
            "sub-01_part-mag_MRF.nii.gz", "sub-01_part-phase_MRF.nii.gz"]
        assert col.label == "MRF"
        assert res.skipped == []
    else:
        with pytest.raises(NothingSelectedError):
            discover(ds, tmp_path / "db2", ["01"])
        from qmri_bids.bids.discovery import build_layout, discover_subject

        layout = build_layout(ds, tmp_path / "db3", ["01"])
        res = discover_subject(layout, ds, "01", None)
        (skip,) = res.skipped
        assert skip.what == "MRF"
        assert skip.path.name == "sub-01_part-mag_MRF.nii.gz" and missing in skip.reason


class _Records(logging.Handler):
    """Collects the records of one logger (the CLI turns off propagation of 'qmri_bids', so
    pytest's caplog, which listens on the root logger, may miss them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("parts, reason", [
    ((None,), "at least 2 members, found 1"),  # a lone sub-01_MRF.nii.gz
    (("part-mag",), "at least 2 members, found 1"),  # half of a pair
    (("part-mag", "part-imag"), "part-mag/part-phase"),  # not a pair that goes together
])
def test_mrf_without_a_pair_is_skipped_with_a_logged_reason(tmp_path, parts, reason):
    ds = _mrf_dataset(tmp_path / "ds", MRF_META, False, parts=parts)
    from qmri_bids.bids.discovery import build_layout, discover_subject

    logger = logging.getLogger("qmri_bids.discovery")
    records = _Records()
    logger.addHandler(records)
    try:
        layout = build_layout(ds, tmp_path / "db", ["01"])
        res = discover_subject(layout, ds, "01", None)
    finally:
        logger.removeHandler(records)
    assert res.collections == [] and res.empty
    (skip,) = res.skipped
    # the reason names the first member in the collection's (part-sorted) order
    first = min("sub-01" + (f"_{part}" if part else "") + "_MRF.nii.gz" for part in parts)
    assert skip.what == "MRF" and skip.path.name == first
    assert reason in skip.reason
    warnings = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
    assert any("sub-01" in m and "skipping MRF" in m and first in m and reason in m
               for m in warnings), warnings
    # the summary table shows the skip and why; the participant has nothing else
    assert summary_table([res]).splitlines() == [
        "sub-01", f"  skipped  MRF {first}  -> {skip.reason}"]
    with pytest.raises(NothingSelectedError):
        discover(ds, tmp_path / "db2", ["01"])
