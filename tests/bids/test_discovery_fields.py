"""Sidecar fields at discovery (issue 13): a collection whose field has the wrong type or is
missing is skipped with the file and the field named, and counts as unusable input (exit 65),
whether or not something else is left to process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmri_bids.bids.discovery import NoUsableInputError, discover
from qmri_bids.config import RunConfig
from qmri_bids.errors import EXIT_BAD_DATA, BadDataError, NothingSelectedError
from qmri_bids.preflight import preflight
from tests.foundation._helpers import blob_image, make_tiny_bids, save_nifti

SHAPE = (8, 8, 4)


def _write(ds: Path, subject: str, suffix: str, entity: str, metas: list[dict]) -> None:
    anat = ds / f"sub-{subject}" / "anat"
    for index, meta in enumerate(metas, start=1):
        name = f"sub-{subject}_{entity}-{index}_{suffix}"
        save_nifti(anat / f"{name}.nii.gz", blob_image(SHAPE, index))
        (anat / f"{name}.json").write_text(json.dumps(meta))


def _dataset(root: Path, suffix: str, entity: str, metas: list[dict], with_t1w: bool) -> Path:
    ds = make_tiny_bids(root, subjects=("01",), shape=SHAPE,
                        suffixes=("T1w",) if with_t1w else ())
    _write(ds, "01", suffix, entity, metas)
    return ds


IRT1_OK = [{"InversionTime": ti} for ti in (0.1, 0.5, 1.0)]
# subject -> (what is wrong, suffix, entity, members, the bad member, the field)
CASES = {
    "01": ("IRT1 InversionTime as a string", "IRT1", "inv",
           [IRT1_OK[0], {"InversionTime": "0.5"}, IRT1_OK[2]], 2, "InversionTime"),
    "02": ("IRT1 InversionTime as a list", "IRT1", "inv",
           [IRT1_OK[0], IRT1_OK[1], {"InversionTime": [0.9, 1.0]}], 3, "InversionTime"),
    "03": ("IRT1 member without InversionTime", "IRT1", "inv", [IRT1_OK[0], {}, IRT1_OK[2]], 2,
           "InversionTime"),
    "04": ("VFA FlipAngle as a string", "VFA", "flip",
           [{"FlipAngle": 3, "RepetitionTimeExcitation": 0.015},
            {"FlipAngle": "20", "RepetitionTimeExcitation": 0.015}], 2, "FlipAngle"),
}


def test_unusable_fields_alone_are_bad_data_naming_each_file_and_field(tmp_path):
    ds = make_tiny_bids(tmp_path / "ds", subjects=tuple(CASES), shape=SHAPE, suffixes=())
    for subject, (_, suffix, entity, metas, _, _) in CASES.items():
        _write(ds, subject, suffix, entity, metas)
    with pytest.raises(NoUsableInputError) as exc:
        discover(ds, tmp_path / "db", list(CASES))
    # nothing is left to process, because of bad data: exit 65, not 18
    assert isinstance(exc.value, BadDataError) and isinstance(exc.value, NothingSelectedError)
    assert exc.value.exit_code == EXIT_BAD_DATA
    lines = str(exc.value).splitlines()[1:]
    assert len(lines) == len(CASES)
    for subject, (what, suffix, entity, _, bad, field) in CASES.items():
        name = f"sub-{subject}_{entity}-{bad}_{suffix}.nii.gz"
        assert any(name in line and field in line for line in lines), (what, lines)


def test_unusable_field_beside_a_t1w_is_reported_by_preflight(tmp_path):
    _, suffix, entity, metas, bad, field = CASES["01"]
    ds = _dataset(tmp_path / "ds", suffix, entity, metas, with_t1w=True)
    (found,) = discover(ds, tmp_path / "db", ["01"])
    assert [a.suffix for a in found.anat] == ["T1w"] and found.collections == []
    (skip,) = found.skipped
    assert skip.unusable and skip.path.name == f"sub-01_inv-{bad}_IRT1.nii.gz"
    assert "'InversionTime' must be a number, got str '0.5'" in skip.reason
    config = RunConfig(bids_dir=ds, output_dir=tmp_path / "out", analysis_level="participant",
                       work_dir=tmp_path / "work", bias_methods=("n4",))
    problems = preflight([found], config)
    # the run goes on with the T1w, and ends with exit 65 because of this message
    assert len(problems) == 1 and skip.path.name in problems[0] and field in problems[0]
    assert found.anat and found.anat[0].n_voxels == 8 * 8 * 4


def test_a_b1_map_without_intended_for_is_only_a_warning(tmp_path):
    ds = _dataset(tmp_path / "ds", "VFA", "flip",
                  [{"FlipAngle": fa, "RepetitionTimeExcitation": 0.015} for fa in (3, 20)],
                  with_t1w=False)
    fmap = ds / "sub-01" / "fmap"
    save_nifti(fmap / "sub-01_TB1map.nii.gz", blob_image(SHAPE))
    (fmap / "sub-01_TB1map.json").write_text("{}")
    (found,) = discover(ds, tmp_path / "db", ["01"])
    (skip,) = found.skipped
    assert skip.what == "TB1map" and not skip.unusable
    config = RunConfig(bids_dir=ds, output_dir=tmp_path / "out", analysis_level="participant",
                       work_dir=tmp_path / "work")
    assert preflight([found], config) == []
    from qmri_bids.qmri.model_store import estimator_stem
    from qmri_bids.qmri.models import VFAModel

    assert found.collections[0].plan.network.stem == estimator_stem(
        "vfa", VFAModel([3.0, 20.0], 0.015).to_protocol())
