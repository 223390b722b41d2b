"""Bad inputs: each ends with its documented exit code or a logged skip, and nothing is written
outside the output and work folders (the input dataset, the working directory and HOME are
checked before/after; HOME and the working directory are empty temporary folders).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.errors import (
    EXIT_BAD_DATA,
    EXIT_CANNOT_WRITE,
    EXIT_MISSING_INPUT,
    EXIT_NOTHING_SELECTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VALIDATION,
)

from ._helpers import blob_image, cli, make_tiny_bids, run_log, save_nifti, snapshot

SHAPE = (24, 24, 12)


def _run(argv, isolated, watched: Path | None = None) -> tuple[int, str, str]:
    """Run the CLI; check that neither ``watched`` (the input) nor HOME nor cwd changed."""
    before = snapshot(watched) if watched is not None and watched.exists() else None
    # Input handling is shared by both methods; N4 is the one these checks name in outputs.
    if len(argv) > 2 and argv[2] == "participant" and "--bias-method" not in argv:
        argv = [*argv, "--bias-method", "n4"]
    code, out, err = cli(argv)
    if before is not None:
        assert snapshot(watched) == before, "the input dataset was modified"
    assert list(isolated["home"].iterdir()) == [], "files written into HOME"
    assert list(isolated["cwd"].iterdir()) == [], "files written into the working directory"
    assert "Traceback" not in err
    return code, out, err


def _outputs(out: Path, subject: str) -> list[str]:
    return sorted(p.name for p in (out / f"sub-{subject}" / "anat").glob("*.nii.gz"))


# ------------------------------------------------------------------------ dataset-level errors
def test_not_a_bids_folder_exits_16(tmp_path, isolated_env):
    ds = tmp_path / "notbids"
    save_nifti(ds / "sub-01" / "anat" / "sub-01_T1w.nii.gz", blob_image(SHAPE))
    code, _, err = _run([ds, tmp_path / "out", "participant", "-w", tmp_path / "w"],
                        isolated_env, ds)
    assert code == EXIT_VALIDATION
    assert "dataset_description.json" in err


def test_missing_bids_dir_exits_66(tmp_path, isolated_env):
    code, _, err = _run([tmp_path / "nowhere", tmp_path / "out", "participant", "-w",
                         tmp_path / "w"], isolated_env)
    assert code == EXIT_MISSING_INPUT
    assert "nowhere" in err
    assert not (tmp_path / "nowhere").exists()


def test_dataset_without_subjects_exits_66(tmp_path, isolated_env):
    ds = make_tiny_bids(tmp_path / "ds", subjects=())
    code, _, err = _run([ds, tmp_path / "out", "participant", "-w", tmp_path / "w",
                         "--skip-bids-validation"], isolated_env, ds)
    assert code == EXIT_MISSING_INPUT
    assert "sub-" in err


def test_unknown_participant_exits_18(tmp_path, isolated_env):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",))
    code, _, err = _run([ds, tmp_path / "out", "participant", "-w", tmp_path / "w",
                         "--participant-label", "42"], isolated_env, ds)
    assert code == EXIT_NOTHING_SELECTED
    assert "sub-42" in err and "sub-01" in err  # names the missing and the available ones


def test_output_inside_input_exits_64(tmp_path, isolated_env):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",))
    code, _, err = _run([ds, ds / "sub-01" / "out", "participant", "-w", tmp_path / "w"],
                        isolated_env, ds)
    assert code == EXIT_USAGE
    assert "inside bids_dir" in err


def test_unwritable_output_dir_exits_73(tmp_path, isolated_env):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",))
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            # running as root: permissions do not stop us; a path below a regular file cannot
            # be created by anyone
            target = tmp_path / "file.txt"
            target.write_text("a regular file\n")
            out = target / "out"
        else:
            out = parent / "out"
        code, _, err = _run([ds, out, "participant", "-w", tmp_path / "w"], isolated_env, ds)
    finally:
        parent.chmod(0o700)
    assert code == EXIT_CANNOT_WRITE
    assert "cannot be written" in err and str(out) in err


def test_unwritable_output_dir_by_permission_exits_73(tmp_path, isolated_env):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",))
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is still writable")
        code, _, _err = _run([ds, parent / "out", "participant", "-w", tmp_path / "w"],
                            isolated_env, ds)
    finally:
        parent.chmod(0o700)
    assert code == EXIT_CANNOT_WRITE


# -------------------------------------------------------------------------- image problems
def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _four_d(path: Path) -> None:
    data = np.stack([blob_image(SHAPE, seed=s) for s in range(3)], axis=-1)
    save_nifti(path, data)


def _all_zero(path: Path) -> None:
    save_nifti(path, np.zeros(SHAPE))


def _nan_inf(path: Path) -> None:
    data = blob_image(SHAPE, seed=5)
    data[3, 4, 5] = np.nan
    data[10, 10, 6] = np.inf
    data[11, 12, 6] = -np.inf
    save_nifti(path, data)


BAD_IMAGES = {"02": _truncate, "03": _four_d, "04": _all_zero}


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> Path:
    """sub-01 fine, sub-02 truncated, sub-03 4-D, sub-04 all zero, sub-05 with NaN/Inf."""
    ds = make_tiny_bids(tmp_path_factory.mktemp("bad") / "ds",
                        subjects=("01", "02", "03", "04", "05"), shape=SHAPE)
    for sub, spoil in {**BAD_IMAGES, "05": _nan_inf}.items():
        spoil(ds / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz")
    return ds


@pytest.mark.parametrize("subject, words", [
    ("02", "truncated"),
    ("03", "4-D"),
    ("04", "all zero"),
])
def test_bad_image_alone_exits_65(bad_dataset, tmp_path, isolated_env, subject, words):
    out = tmp_path / "out"
    code, _, err = _run([bad_dataset, out, "participant", "-w", tmp_path / "w",
                         "--participant-label", subject, "--skip-bids-validation"],
                        isolated_env, bad_dataset)
    assert code == EXIT_BAD_DATA
    assert f"sub-{subject}_T1w.nii.gz" in err and words in err
    assert _outputs(out, subject) == []
    # the failed run still leaves a valid derivatives dataset and its logs
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == \
        "derivative"
    assert (out / f"sub-{subject}" / "log").is_dir()


def test_bad_images_do_not_stop_the_others(bad_dataset, tmp_path, isolated_env):
    out, work = tmp_path / "out", tmp_path / "w"
    code, _stdout, err = _run([bad_dataset, out, "participant", "-w", work, "--nprocs", "2",
                              "--omp-nthreads", "1", "--skip-bids-validation"],
                             isolated_env, bad_dataset)
    assert code == EXIT_BAD_DATA, err[-3000:]
    for sub in BAD_IMAGES:
        assert f"sub-{sub}_T1w.nii.gz" in err
        assert _outputs(out, sub) == []
    for sub in ("01", "05"):
        assert _outputs(out, sub) == [f"sub-{sub}_desc-n4_T1w.nii.gz",
                                      f"sub-{sub}_desc-n4field_T1w.nii.gz"]
    # NaN/Inf voxels: processed, with a warning naming the file, and finite outputs
    log = run_log(work)
    assert "sub-05_T1w.nii.gz" in log and "NaN/Inf" in log
    for name in _outputs(out, "05"):
        assert np.isfinite(nib.load(str(out / "sub-05" / "anat" / name)).get_fdata()).all()
    # the exit status is recorded
    (run_file,) = (out / "logs").glob("run_*.json")
    assert json.loads(run_file.read_text())["exit_code"] == EXIT_BAD_DATA
    assert not [p for p in out.rglob(".*") if p.name != ".bidsignore"]


def test_nan_image_alone_is_processed(bad_dataset, tmp_path, isolated_env):
    out, work = tmp_path / "out", tmp_path / "w"
    code, _, err = _run([bad_dataset, out, "participant", "-w", work, "--participant-label",
                         "05", "--skip-bids-validation", "--nprocs", "1"],
                        isolated_env, bad_dataset)
    assert code == EXIT_OK, err[-3000:]
    raw = nib.load(str(bad_dataset / "sub-05" / "anat" / "sub-05_T1w.nii.gz")).get_fdata()
    corr = nib.load(str(out / "sub-05" / "anat" / "sub-05_desc-n4_T1w.nii.gz")).get_fdata()
    assert np.isfinite(corr).all()
    assert corr[~np.isfinite(raw)].tolist() == [0.0, 0.0, 0.0]  # treated as background
    assert "NaN/Inf" in run_log(work)


# ------------------------------------------------------------------- sidecar metadata problems
def _collection_dataset(root: Path, with_t1w: bool) -> Path:
    """sub-01: a VFA pair whose flip-2 FlipAngle is a string, and a 3-echo MESE collection whose
    echo-2 lacks EchoTime; optionally a usable T1w."""
    ds = make_tiny_bids(root, subjects=("01",), shape=SHAPE, suffixes=("T1w",) if with_t1w
                        else ())
    anat = ds / "sub-01" / "anat"
    for flip, fa in ((1, 3), (2, "twenty")):
        save_nifti(anat / f"sub-01_flip-{flip}_VFA.nii.gz", blob_image(SHAPE, seed=flip))
        (anat / f"sub-01_flip-{flip}_VFA.json").write_text(json.dumps(
            {"FlipAngle": fa, "RepetitionTimeExcitation": 0.015}))
    for echo in (1, 2, 3):
        save_nifti(anat / f"sub-01_echo-{echo}_MESE.nii.gz", blob_image(SHAPE, seed=echo))
        meta = {"RepetitionTime": 3.0} | ({} if echo == 2 else {"EchoTime": 0.01 * echo})
        (anat / f"sub-01_echo-{echo}_MESE.json").write_text(json.dumps(meta))
    return ds


def _check_metadata_skips(text: str) -> None:
    assert "sub-01_flip-2_VFA.nii.gz" in text and "FlipAngle" in text
    assert "sub-01_echo-2_MESE.nii.gz" in text and "EchoTime" in text


def test_bad_sidecars_only_exits_65(tmp_path, isolated_env):
    """Both collections are skipped (logged, naming file and field); nothing else is left, but
    something was selected: unusable input, exit 65 (issue 13), with the files and fields in
    the error message."""
    ds = _collection_dataset(tmp_path / "ds", with_t1w=False)
    work = tmp_path / "w"
    code, _, err = _run([ds, tmp_path / "out", "participant", "-w", work,
                         "--skip-bids-validation"], isolated_env, ds)
    assert code == EXIT_BAD_DATA
    _check_metadata_skips(run_log(work))
    _check_metadata_skips(err.split("qmri-bids: error:")[-1])


def test_bad_sidecars_with_usable_t1w_exits_65(tmp_path, isolated_env):
    """The same skips, but a T1w remains: it is processed, and the run ends with exit 65 like
    other unusable inputs (issue 13); the skips are logged, listed in the summary table and
    named (file and field) in the final error message."""
    ds = _collection_dataset(tmp_path / "ds", with_t1w=True)
    out, work = tmp_path / "out", tmp_path / "w"
    code, stdout, err = _run([ds, out, "participant", "-w", work, "--skip-bids-validation",
                              "--nprocs", "1"], isolated_env, ds)
    assert code == EXIT_BAD_DATA, err[-3000:]
    _check_metadata_skips(err.split("qmri-bids: error:")[-1])
    _check_metadata_skips(run_log(work))
    _check_metadata_skips(stdout)  # the summary table lists the skips
    assert _outputs(out, "01") == ["sub-01_desc-n4_T1w.nii.gz", "sub-01_desc-n4field_T1w.nii.gz"]


@pytest.mark.parametrize("field, value, ok", [
    ("FlipAngle", "20", False),
    ("FlipAngle", None, False),
    ("FlipAngle", True, False),
    ("FlipAngle", -5, False),
    ("FlipAngle", [3, 6], False),  # a list only makes sense for MR fingerprinting
    ("FlipAngle", 20, True),
    ("FlipAngle", 20.5, True),
    ("RepetitionTimeExcitation", "0.015", False),
    ("RepetitionTimeExcitation", 0, False),
])
def test_vfa_metadata_types(tmp_path, field, value, ok):
    from qmri_bids.bids.discovery import discover

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=(8, 8, 4), suffixes=("T1w",))
    anat = ds / "sub-01" / "anat"
    for flip in (1, 2):
        save_nifti(anat / f"sub-01_flip-{flip}_VFA.nii.gz", blob_image((8, 8, 4), seed=flip))
        meta = {"FlipAngle": 3 * flip, "RepetitionTimeExcitation": 0.015}
        if flip == 2:
            meta[field] = value
        (anat / f"sub-01_flip-{flip}_VFA.json").write_text(json.dumps(meta))
    (res,) = discover(ds, tmp_path / "db", ["01"])
    if ok:
        assert [c.suffix for c in res.collections] == ["VFA"]
        assert res.skipped == []
    else:
        assert res.collections == []
        (skip,) = res.skipped
        assert skip.path.name == "sub-01_flip-2_VFA.nii.gz"
        assert field in skip.reason


# ---------------------------------------------------------------------------- bids-validator
needs_validator = pytest.mark.skipif(shutil.which("bids-validator") is None,
                                     reason="bids-validator is not installed")


@pytest.fixture(scope="module")
def misnamed_dataset(tmp_path_factory) -> Path:
    """sub-01 holds a file whose name is not BIDS; sub-02 is clean."""
    ds = make_tiny_bids(tmp_path_factory.mktemp("misnamed") / "ds", subjects=("01", "02"),
                        shape=SHAPE)
    anat = ds / "sub-01" / "anat"
    shutil.copy(anat / "sub-01_T1w.nii.gz", anat / "sub-01_T1weighted.nii.gz")
    return ds


@needs_validator
def test_validator_errors_exit_16(misnamed_dataset, tmp_path, isolated_env):
    out = tmp_path / "out"
    code, _, err = _run([misnamed_dataset, out, "participant", "-w", tmp_path / "w"],
                        isolated_env, misnamed_dataset)
    assert code == EXIT_VALIDATION
    assert "sub-01_T1weighted.nii.gz" in err
    assert "--skip-bids-validation" in err
    assert list(out.glob("logs/bids-validator_*.json"))
    assert not list(out.glob("sub-*/anat"))


@needs_validator
def test_validator_ignores_unselected_participants(misnamed_dataset, tmp_path, isolated_env):
    out = tmp_path / "out"
    code, _, err = _run([misnamed_dataset, out, "participant", "-w", tmp_path / "w",
                         "--participant-label", "02", "--nprocs", "1"],
                        isolated_env, misnamed_dataset)
    assert code == EXIT_OK, err[-3000:]
    assert _outputs(out, "02") == ["sub-02_desc-n4_T1w.nii.gz", "sub-02_desc-n4field_T1w.nii.gz"]


def test_skip_bids_validation_goes_on(misnamed_dataset, tmp_path, isolated_env):
    out, work = tmp_path / "out", tmp_path / "w"
    code, _, err = _run([misnamed_dataset, out, "participant", "-w", work, "--participant-label",
                         "01", "--skip-bids-validation", "--nprocs", "1"],
                        isolated_env, misnamed_dataset)
    assert code == EXIT_OK, err[-3000:]
    assert _outputs(out, "01") == ["sub-01_desc-n4_T1w.nii.gz", "sub-01_desc-n4field_T1w.nii.gz"]
    assert "validation skipped" in run_log(work)
    assert not list(out.glob("logs/bids-validator_*.json"))


# ----------------------------------------------------------------------- image_io unit checks
@pytest.mark.parametrize("spoil, words", [(_truncate, "truncated"), (_four_d, "4-D"),
                                          (_all_zero, "all zero")])
def test_load_image_rejects(tmp_path, spoil, words):
    from qmri_bids.errors import BadDataError
    from qmri_bids.image_io import load_image

    path = save_nifti(tmp_path / "img.nii.gz", blob_image(SHAPE))
    spoil(path)
    with pytest.raises(BadDataError, match=words) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert info.value.exit_code == EXIT_BAD_DATA


def test_load_image_all_nan_and_constant(tmp_path):
    from qmri_bids.errors import BadDataError
    from qmri_bids.image_io import load_image

    with pytest.raises(BadDataError, match="NaN or Inf"):
        load_image(save_nifti(tmp_path / "nan.nii.gz", np.full(SHAPE, np.nan)))
    with pytest.raises(BadDataError, match="constant"):
        load_image(save_nifti(tmp_path / "c.nii.gz", np.full(SHAPE, 7.0)))


def test_load_image_truncated_uncompressed_and_bad_gzip(tmp_path):
    from qmri_bids.errors import BadDataError
    from qmri_bids.image_io import load_image

    nii = save_nifti(tmp_path / "img.nii", blob_image(SHAPE))
    _truncate(nii)
    with pytest.raises(BadDataError):
        load_image(nii)
    gz = tmp_path / "junk.nii.gz"
    gz.write_bytes(gzip.compress(b"not a nifti at all" * 30))
    with pytest.raises(BadDataError):
        load_image(gz)


def test_load_image_single_volume_4d_is_3d(tmp_path):
    from qmri_bids.image_io import load_image

    path = save_nifti(tmp_path / "img.nii.gz", blob_image(SHAPE)[..., None])
    assert load_image(path).data.shape == SHAPE
