"""Full participant-level runs with N4: the demo (both participants, in-process) and ds-real
``neck01``/``balls01`` (through the ``qmri-bids`` console script), then resume and group level.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids import __version__
from qmri_bids.errors import EXIT_MISSING_INPUT, EXIT_NOTHING_SELECTED, EXIT_OK

from ._helpers import cli, snapshot

SUFFIXES_DEMO = ("T1w", "T2w")


# ------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def demo_run(demo_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("demo_run")
    out, work = base / "out", base / "work"
    before = snapshot(demo_dir)
    code, stdout, stderr = cli([demo_dir, out, "participant", "-w", work, "--nprocs", "2",
                                "--omp-nthreads", "1", "--bias-method", "both"])
    runs = sorted((out / "logs").glob("run_*.json"))
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "work": work,
            "bids": demo_dir, "input_before": before,
            "run_id": json.loads(runs[-1].read_text())["run_id"] if runs else None}


def _node_results(work: Path) -> dict[str, int]:
    """Nipype node folder (relative) → mtime of its result_*.pklz."""
    return {p.parent.relative_to(work).as_posix(): p.stat().st_mtime_ns
            for p in work.rglob("result_*.pklz")}


def _console(argv, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("qmri-bids")
    if exe is None:
        pytest.skip("the qmri-bids console script is not on PATH")
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([exe, *map(str, argv)], capture_output=True, text=True, timeout=600,
                          check=False,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def real_run(ds_real, tmp_path_factory) -> dict:
    """ds-real neck01 + balls01 through the console script, with HOME and cwd isolated."""
    base = tmp_path_factory.mktemp("real_run")
    out, work, home, cwd = base / "out", base / "work", base / "home", base / "cwd"
    home.mkdir()
    cwd.mkdir()
    before = snapshot(ds_real)
    proc = _console([ds_real, out, "participant", "-w", work, "--participant-label", "neck01",
                     "balls01", "--nprocs", "2", "--omp-nthreads", "1", "--bias-method", "n4"],
                    home, cwd)
    runs = sorted((out / "logs").glob("run_*.json"))
    return {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "out": out,
            "work": work, "bids": ds_real, "home": home, "cwd": cwd, "input_before": before,
            "run_id": json.loads(runs[-1].read_text())["run_id"] if runs else None}


@pytest.fixture(scope="module")
def real_rerun(real_run) -> dict:
    """The same command again with the same work dir (resume), as a user would: a new process.

    (A second run inside the *same* Python process is a different matter: see
    ``test_in_process_rerun_reuses_cache`` in test_nipype_config.py.)
    """
    assert real_run["code"] == EXIT_OK, real_run["stderr"][-3000:]
    before = _node_results(real_run["work"])
    time.sleep(0.05)  # so that a re-executed node would get a different mtime
    proc = _console([real_run["bids"], real_run["out"], "participant", "-w", real_run["work"],
                     "--participant-label", "neck01", "balls01", "--nprocs", "2",
                     "--omp-nthreads", "1", "--skip-bids-validation", "--bias-method", "n4"],
                    real_run["home"], real_run["cwd"])
    return {"code": proc.returncode, "stderr": proc.stderr, "before": before,
            "after": _node_results(real_run["work"])}


# ------------------------------------------------------------------------ shared checks
def _raw_images(bids: Path, subject: str) -> list[Path]:
    from qmri_bids.bids.discovery import ANAT_SUFFIXES

    return sorted(p for p in (bids / f"sub-{subject}" / "anat").glob("*.nii.gz")
                  if p.name.split("_")[-1].split(".")[0] in ANAT_SUFFIXES)


def _check_geometry(raw: nib.Nifti1Image, out: nib.Nifti1Image, name: str) -> None:
    assert out.shape == raw.shape, name
    np.testing.assert_allclose(out.affine, raw.affine, atol=1e-5, err_msg=name)
    raw_q, raw_qc = raw.header.get_qform(coded=True)
    out_q, out_qc = out.header.get_qform(coded=True)
    raw_s, raw_sc = raw.header.get_sform(coded=True)
    out_s, out_sc = out.header.get_sform(coded=True)
    assert (int(out_qc or 0), int(out_sc or 0)) == (int(raw_qc or 0), int(raw_sc or 0)), name
    if raw_qc:
        np.testing.assert_allclose(out_q, raw_q, atol=1e-5, err_msg=name)
    if raw_sc:
        np.testing.assert_allclose(out_s, raw_s, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out.header.get_zooms()[:3], raw.header.get_zooms()[:3],
                               rtol=1e-6, err_msg=name)


def check_n4_outputs(run: dict, subject: str) -> None:
    from qmri_bids.bias.n4 import N4Settings

    out, bids = run["out"], run["bids"]
    raws = _raw_images(bids, subject)
    assert raws, f"no anatomical input for sub-{subject}"
    for raw_path in raws:
        stem = raw_path.name[: -len(".nii.gz")]
        suffix = stem.split("_")[-1]
        prefix = stem[: -len(suffix)]
        anat = out / f"sub-{subject}" / "anat"
        corr_path = anat / f"{prefix}desc-n4_{suffix}.nii.gz"
        field_path = anat / f"{prefix}desc-n4field_{suffix}.nii.gz"
        assert corr_path.is_file(), corr_path
        assert field_path.is_file(), field_path
        raw_img = nib.load(str(raw_path))
        corr_img, field_img = nib.load(str(corr_path)), nib.load(str(field_path))
        _check_geometry(raw_img, corr_img, corr_path.name)
        _check_geometry(raw_img, field_img, field_path.name)
        raw = raw_img.get_fdata(dtype=np.float64)
        corr = np.asarray(corr_img.dataobj, dtype=np.float64)
        field = np.asarray(field_img.dataobj, dtype=np.float64)
        assert np.isfinite(corr).all() and np.isfinite(field).all()
        assert (field > 0).all(), f"{field_path.name}: a multiplicative field must be positive"
        foreground = raw > raw.mean()
        assert foreground.sum() > 100
        # mean 1 in the foreground is the documented normalisation (up to the mask used)
        assert 0.8 < field[foreground].mean() < 1.25
        np.testing.assert_allclose(corr[foreground], raw[foreground] / field[foreground],
                                   rtol=2e-6, atol=1e-6 * np.abs(raw).max(),
                                   err_msg=f"{corr_path.name} != raw / field")
        # the correction does something
        assert np.ptp(field[foreground]) > 1e-3

        for path, desc in ((corr_path, "n4"), (field_path, "n4field")):
            meta = json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())
            assert meta["Sources"] == [f"bids:raw:sub-{subject}/anat/{raw_path.name}"], path
            params = meta["Parameters"]
            for key, value in N4Settings().as_dict().items():
                assert params[key] == value, (path.name, key)
            assert "N4" in meta["Method"]
            assert meta["Description"]

    # nothing unexpected: exactly two images and two sidecars per raw anatomical image
    produced = sorted(p.name for p in (out / f"sub-{subject}" / "anat").iterdir()
                      if "_desc-n4" in p.name)
    assert len(produced) == 4 * len(raws), produced


def check_dataset_level(run: dict) -> None:
    out, bids = run["out"], run["bids"]
    desc = json.loads((out / "dataset_description.json").read_text())
    raw_desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["BIDSVersion"]
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "qmri-bids"
    assert gen["Version"] == __version__
    assert gen["CodeURL"].startswith("https://")
    assert desc["DatasetLinks"]["raw"] == Path(bids).resolve().as_uri()
    assert desc["License"] == raw_desc["License"]
    assert (out / ".bidsignore").is_file()
    # no temporary file left behind anywhere
    leftovers = [p for p in out.rglob(".*") if p.name != ".bidsignore"]
    assert leftovers == [], leftovers
    assert not list(out.rglob("*.tmp"))


def check_logs(run: dict, subjects: list[str]) -> None:
    out, run_id = run["out"], run["run_id"]
    assert run_id, "logs/run_<id>.json is missing"
    info = json.loads((out / "logs" / f"run_{run_id}.json").read_text())
    assert info["exit_code"] == 0
    assert sorted(info["participants"]) == sorted(subjects)
    for sub in subjects:
        log_dir = out / f"sub-{sub}" / "log" / run_id
        config = json.loads((log_dir / "config.json").read_text())
        assert config["run_id"] == run_id
        assert Path(config["bids_dir"]) == Path(run["bids"]).resolve()
        logs = list(log_dir.glob("*.log"))
        assert len(logs) == 1 and run_id in logs[0].read_text()


# ------------------------------------------------------------------------------ demo run
def test_demo_run_exit_code(demo_run):
    assert demo_run["code"] == EXIT_OK, demo_run["stderr"][-3000:]


@pytest.mark.parametrize("subject", ["01", "02"])
def test_demo_outputs(demo_run, subject):
    assert demo_run["code"] == EXIT_OK
    check_n4_outputs(demo_run, subject)


def test_demo_dataset_level_files(demo_run):
    assert demo_run["code"] == EXIT_OK
    check_dataset_level(demo_run)


def test_demo_logs(demo_run):
    assert demo_run["code"] == EXIT_OK
    check_logs(demo_run, ["01", "02"])
    # bids-validator ran on the raw dataset and its report was kept
    assert (demo_run["out"] / "logs" / f"bids-validator_{demo_run['run_id']}.json").is_file()


def _table_block(lines: list[str], header: str) -> list[str]:
    """The indented rows below one participant's header line of the summary table."""
    block = lines[lines.index(header) + 1:]
    end = next((i for i, line in enumerate(block) if not line.startswith("  ")), len(block))
    return block[:end]


def test_demo_summary_table_printed(demo_run):
    lines = demo_run["stdout"].splitlines()
    assert "sub-01" in lines and "sub-02" in lines
    # --bias-method both: each anatomical image (T1w and T2w of two participants) gets both
    anat_rows = [line for line in lines if line.startswith("  anat  ")]
    assert len(anat_rows) == 4, anat_rows
    assert all(line.endswith("  -> bias cnn, bias n4") for line in anat_rows), anat_rows
    for sub in ("01", "02"):
        rows = _table_block(lines, f"sub-{sub}")
        cells = [(row.split()[0], row.partition("  -> ")) for row in rows]
        # the demo's anatomical images, then its qMRI collections, nothing skipped; sub-02's
        # VFA B1+ comes from a double-angle collection instead of a TB1map
        dam = ["TB1DAM"] if sub == "02" else []
        assert [kind for kind, _ in cells] == ["anat", "anat", "VFA", "IRT1", "MESE", "MRF",
                                               *dam], rows
        assert [found.split()[1] for kind, (found, _, _) in cells if kind == "anat"] == [
            f"sub-{sub}_{suffix}.nii.gz" for suffix in SUFFIXES_DEMO]
        # collections: as many files as the demo wrote, and each has a plan
        for kind, (found, arrow, plan) in cells[2:]:
            folder = demo_run["bids"] / f"sub-{sub}" / ("fmap" if kind == "TB1DAM" else "anat")
            n_files = len(list(folder.glob(f"sub-{sub}_*_{kind}.nii.gz")))
            assert found.split()[1:3] == [str(n_files), "files"], (kind, found)
            assert arrow and plan.strip() not in ("", "-") and "problem" not in plan, (kind, plan)
        # the B1 maps are attached to the collections their IntendedFor names
        if sub == "02":
            assert "TB1map" not in rows[2] and "-> B1 from TB1DAM, " in rows[2]
        else:
            assert f"+ sub-{sub}_TB1map.nii.gz" in rows[2]
        assert f"+ sub-{sub}_acq-mrf_TB1map.nii.gz" in rows[5]
        # aligned: the plan column starts at the same offset in every row of the block
        assert len({row.index("  -> ") for row in rows}) == 1, rows


def test_demo_pybids_database_in_work_dir(demo_run):
    db = demo_run["work"] / "bids_db" / demo_run["run_id"]
    assert list(db.glob("*.sqlite")), "the per-run pybids index must live in the work dir"
    assert not list(demo_run["bids"].rglob("*.sqlite"))


def test_demo_input_untouched(demo_run):
    assert snapshot(demo_run["bids"]) == demo_run["input_before"]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("subject", ["01", "02"])
def test_demo_n4_field_matches_ground_truth(demo_run, subject):
    """N4's field against the simulated one, inside the head.

    Measured (correlation of log fields inside the head, T1w): 0.88 and 0.91 for sub-01/02 at this
    resolution (60×72×54 at 2.93 mm), 0.93-0.95 at the default 80×96×72, 0.75 at 40×48×36. The
    true field flipped through the centre correlates negatively (about -0.6 to -0.8) with N4's,
    so > 0.8, and well above the flipped copy, means that N4 recovered *this* field.
    """
    assert demo_run["code"] == EXIT_OK
    gt = demo_run["bids"] / "derivatives" / "groundtruth" / f"sub-{subject}" / "anat"
    true = nib.load(str(gt / f"sub-{subject}_desc-truefield_T1w.nii.gz")).get_fdata()
    head = nib.load(str(gt / f"sub-{subject}_desc-tissue_dseg.nii.gz")).get_fdata() > 0
    est = nib.load(str(demo_run["out"] / f"sub-{subject}" / "anat" /
                       f"sub-{subject}_desc-n4field_T1w.nii.gz")).get_fdata()
    r = _correlation(np.log(est[head]), np.log(true[head]))
    r_flipped = _correlation(np.log(est[head]), np.log(true[::-1, ::-1, ::-1][head]))
    assert r > 0.8, f"correlation of the N4 field with the true field: {r:.3f}"
    assert r > r_flipped + 0.2, (r, r_flipped)


# -------------------------------------------------------------------------------- resume
def test_resume_reexecutes_no_processing_node(real_rerun):
    """A second run with the same -w reuses every cached processing node.

    ``ds_*`` nodes (DerivativesSink) have ``always_run = True`` on purpose, like fMRIPrep's
    DerivativesDataSink (the outputs live outside the work dir, so a cached result must not hide
    a deleted output): they are excluded here, and checked to have re-run.
    """
    assert real_rerun["code"] == EXIT_OK, real_rerun["stderr"][-3000:]
    before, after = real_rerun["before"], real_rerun["after"]
    # A sink MapNode's per-item subnodes (ds_maps/mapflow/_ds_maps0) belong to the sink.
    def is_sink(node: str) -> bool:
        return any(part.startswith("ds_") for part in Path(node).parts)

    processing = {k for k in before if not is_sink(k)}
    # one N4 node per image (neck01 3, balls01 2) and the map node of neck01's MTR collection
    assert sorted(Path(*Path(k).parts[1:]).as_posix() for k in processing) == [
        "sub_balls01_wf/anat_00_T1w_bias_wf/n4",
        "sub_balls01_wf/anat_01_T2w_bias_wf/n4",
        "sub_neck01_wf/anat_00_T1w_bias_wf/n4",
        "sub_neck01_wf/anat_01_T2w_bias_wf/n4",
        "sub_neck01_wf/anat_02_T2starw_bias_wf/n4",
        "sub_neck01_wf/qmri_00_MTR_wf/map",
    ], sorted(before)
    assert set(after) == set(before)
    rerun = sorted(k for k in processing if after[k] != before[k])
    assert rerun == [], f"re-executed on resume: {rerun}"
    sinks = [k for k in before if is_sink(k)]
    assert sinks and all(after[k] != before[k] for k in sinks)


def test_resume_keeps_outputs_valid(real_rerun, real_run):
    assert real_rerun["code"] == EXIT_OK
    for subject in ("neck01", "balls01"):
        check_n4_outputs(real_run, subject)
    check_dataset_level(real_run)
    assert len(list((real_run["out"] / "logs").glob("run_*.json"))) == 2
    assert list(real_run["home"].iterdir()) == [] and list(real_run["cwd"].iterdir()) == []


# ----------------------------------------------------------------------------- group level
def test_group_level_on_finished_output(demo_run, tmp_path):
    assert demo_run["code"] == EXIT_OK
    out = demo_run["out"]
    code, _stdout, stderr = cli([demo_run["bids"], out, "group", "-w", tmp_path / "w"])
    assert code == EXIT_OK, stderr
    table = (out / "group_summary.tsv").read_text().splitlines()
    header = table[0].split("\t")
    assert header[0] == "participant_id"
    rows = {r.split("\t")[0]: dict(zip(header, r.split("\t"), strict=True)) for r in table[1:]}
    assert sorted(rows) == ["sub-01", "sub-02"]
    last = max(json.loads(p.read_text())["run_id"] for p in (out / "logs").glob("run_*.json"))
    for sub, row in rows.items():
        n_files = len([p for p in (out / sub).rglob("*.nii.gz") if "/log/" not in p.as_posix()])
        assert int(row["n_images"]) + int(row["n_maps"]) == n_files
        assert row["last_run"] == last
        assert row["last_exit_code"] == "0"


def test_group_level_on_empty_output(demo_dir, tmp_path):
    empty = tmp_path / "empty_out"
    code, _, err = cli([demo_dir, empty, "group", "-w", tmp_path / "w"])
    assert code == EXIT_MISSING_INPUT
    assert "participant level first" in err
    assert not (empty / "group_summary.tsv").exists()


def test_group_level_on_output_without_participants(demo_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    code, _, _err = cli([demo_dir, out, "group", "-w", tmp_path / "w"])
    assert code == EXIT_NOTHING_SELECTED
    assert not (out / "group_summary.tsv").exists()


# ---------------------------------------------------------------------------- ds-real run
def test_real_run_exit_code(real_run):
    assert real_run["code"] == EXIT_OK, real_run["stderr"][-3000:]
    assert "Traceback" not in real_run["stderr"]


@pytest.mark.parametrize("subject", ["neck01", "balls01"])
def test_real_outputs(real_run, subject):
    assert real_run["code"] == EXIT_OK
    check_n4_outputs(real_run, subject)


def test_real_dataset_level_and_logs(real_run):
    assert real_run["code"] == EXIT_OK
    check_dataset_level(real_run)
    check_logs(real_run, ["neck01", "balls01"])
    # only the selected participants were processed
    assert sorted(p.name for p in real_run["out"].glob("sub-*") if p.is_dir()) == ["sub-balls01",
                                                                             "sub-neck01"]
    assert sorted(p.name for p in real_run["out"].glob("sub-*.html")) == ["sub-balls01.html",
                                                                           "sub-neck01.html"]


def test_real_run_writes_nowhere_else(real_run):
    assert snapshot(real_run["bids"]) == real_run["input_before"]
    assert list(real_run["home"].iterdir()) == [], "files written into HOME"
    assert list(real_run["cwd"].iterdir()) == [], "files written into the working directory"
