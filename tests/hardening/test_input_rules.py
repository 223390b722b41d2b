"""The rows of issue 13 about inputs, at unit level (image headers, the dataset scan, filters,
labels, dataset_description.json), plus one participant run on a dataset holding one bad input
of each kind beside good ones: exit 65, every bad file named, the rest processed, no traceback.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.errors import EXIT_BAD_DATA, EXIT_USAGE, EXIT_VALIDATION, BadDataError, UsageError
from tests.foundation._helpers import blob_image, cli, make_tiny_bids, save_nifti

SHAPE = (16, 16, 8)


# ---------------------------------------------------------------------------- image headers
def _huge_header(path: Path, dims=(4000, 4000, 4000)) -> Path:
    """Rewrite the header of a .nii(.gz) to declare ``dims`` on the same tiny data."""
    if path.name.endswith(".gz"):
        with gzip.open(path) as handle:
            raw = handle.read()
    else:
        raw = path.read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header["dim"][1:4] = dims
    data = header.binaryblock + raw[348:]
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _singular(path: Path) -> Path:
    img = nib.load(str(path))
    header = img.header.copy()
    header["srow_z"] = [0, 0, 0, 0]  # the third voxel axis collapses
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), str(path))
    return path


def _complex(path: Path) -> Path:
    img = nib.load(str(path))
    data = img.get_fdata() * np.exp(0.3j)
    nib.save(nib.Nifti1Image(data.astype(np.complex64), img.affine), str(path))
    return path


@pytest.mark.parametrize("name", ["img.nii.gz", "img.nii"])
def test_huge_declared_dimensions_are_rejected_before_loading(tmp_path, name):
    from qmri_bids.image_io import check_header, load_image

    path = _huge_header(save_nifti(tmp_path / name, blob_image(SHAPE)))
    for check in (check_header, load_image):
        with pytest.raises(BadDataError, match="4000x4000x4000") as info:
            check(path)
        assert str(path) in str(info.value) and "corrupt" in str(info.value)


def test_image_larger_than_memory_is_rejected(tmp_path, monkeypatch):
    from qmri_bids import image_io

    path = save_nifti(tmp_path / "img.nii.gz", blob_image(SHAPE))
    monkeypatch.setattr(image_io, "_total_memory_bytes", lambda: 1000)
    with pytest.raises(BadDataError, match="more than this machine's"):
        image_io.check_header(path)


def test_singular_affine_is_rejected(tmp_path):
    from qmri_bids.image_io import check_header, load_image

    path = _singular(save_nifti(tmp_path / "img.nii.gz", blob_image(SHAPE)))
    for check in (check_header, load_image):
        with pytest.raises(BadDataError, match="singular") as info:
            check(path)
        assert str(path) in str(info.value)


def test_non_finite_affine_is_rejected(tmp_path):
    from qmri_bids.image_io import check_header

    path = save_nifti(tmp_path / "img.nii.gz", blob_image(SHAPE))
    img = nib.load(str(path))
    header = img.header.copy()
    header["srow_x"] = [np.nan, 0, 0, 0]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), str(path))
    with pytest.raises(BadDataError, match="NaN or Inf"):
        check_header(path)


def test_complex_image_is_rejected(tmp_path):
    from qmri_bids.image_io import check_header, load_image

    path = _complex(save_nifti(tmp_path / "img.nii.gz", blob_image(SHAPE)))
    for check in (check_header, load_image):
        with pytest.raises(BadDataError, match="complex-valued") as info:
            check(path)
        assert info.value.exit_code == EXIT_BAD_DATA


def test_good_image_passes_header_rules(tmp_path):
    from qmri_bids.image_io import check_header

    assert check_header(save_nifti(tmp_path / "img.nii.gz", blob_image(SHAPE))) == SHAPE
    assert check_header(save_nifti(tmp_path / "img.nii", blob_image(SHAPE))) == SHAPE


# ---------------------------------------------------------------------------- dataset scan
def test_folder_symlinked_to_itself_is_not_followed(tmp_path):
    from qmri_bids.bids.discovery import discover

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE, suffixes=("T1w", "T2w"))
    (ds / "sub-01" / "anat" / "self").symlink_to(".")
    (ds / "loop").symlink_to(".")  # at the top level too
    t0 = time.monotonic()
    (res,) = discover(ds, tmp_path / "db", ["01"])
    assert time.monotonic() - t0 < 30
    assert sorted(a.path.name for a in res.anat) == ["sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz"]


DISCOVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from qmri_bids.bids.discovery import discover
    (res,) = discover(Path(sys.argv[1]), Path(sys.argv[2]), ["01"])
    print(" ".join(sorted(a.path.name for a in res.anat)))
""")


def test_folders_symlinked_to_each_other_finish(tmp_path):
    """The case that hung (pybids walks the loop forever): run in a child process with a
    deadline, so a regression fails quickly instead of stalling the suite."""
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    sub = ds / "sub-01"
    (sub / "extra").mkdir()
    (sub / "anat" / "to_extra").symlink_to("../extra")
    (sub / "extra" / "to_anat").symlink_to("../anat")
    proc = subprocess.run([sys.executable, "-c", DISCOVER, str(ds), str(tmp_path / "db")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["sub-01_T1w.nii.gz"]
    from qmri_bids.bids.scan import scan_dataset

    problems = {p.path.name: p for p in scan_dataset(ds, ["01"]).problems}
    assert set(problems) == {"to_extra", "to_anat"}
    assert all("symlinked folder not followed" in p.reason and not p.unusable
               for p in problems.values())


def test_files_are_deduplicated_by_real_path_and_outside_links_followed(tmp_path):
    from qmri_bids.bids.scan import scan_dataset

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    anat = ds / "sub-01" / "anat"
    (anat / "sub-01_acq-copy_T1w.nii.gz").symlink_to("sub-01_T1w.nii.gz")
    elsewhere = tmp_path / "store" / "func"
    save_nifti(elsewhere / "sub-01_task-x_bold.nii.gz", blob_image(SHAPE))
    (ds / "sub-01" / "func").symlink_to(elsewhere)  # outside the dataset: followed
    scan = scan_dataset(ds, ["01"])
    assert "/sub-01/anat/sub-01_acq-copy_T1w.nii.gz" in scan.ignored
    assert "/sub-01/anat/sub-01_T1w.nii.gz" not in scan.ignored
    assert ds / "sub-01" / "func" / "sub-01_task-x_bold.nii.gz" in scan.images
    (dup,) = [p for p in scan.problems if "same file" in p.reason]
    assert not dup.unusable


def test_broken_json_is_reported_with_line_and_applies_by_inheritance(tmp_path):
    from qmri_bids.bids.scan import scan_dataset

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01", "02"), shape=SHAPE)
    (ds / "sub-01" / "anat" / "sub-01_T1w.json").write_text('{"EchoTime": 0.01,\n  "A": }\n')
    (ds / "T2w.json").write_text("[1, 2]")  # top level: the sidecar of every T2w
    (ds / "participants.json").write_text("{")
    scan = scan_dataset(ds, None)
    reason = scan.broken_json[ds / "sub-01" / "anat" / "sub-01_T1w.json"]
    assert "line 2, column 8" in reason
    assert "not a JSON object" in scan.broken_json[ds / "T2w.json"]
    (hit,) = scan.broken_sidecars_of(ds / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert hit[0].name == "sub-01_T1w.json"
    assert scan.broken_sidecars_of(ds / "sub-02" / "anat" / "sub-02_T1w.nii.gz") == []
    assert [p.name for p, _ in scan.broken_sidecars_of(
        ds / "sub-02" / "anat" / "sub-02_T2w.nii.gz")] == ["T2w.json"]
    # participants.json is no image's sidecar: not an unusable input
    assert not any("participants.json" in m for m in scan.unusable_messages())


def test_discovery_survives_broken_json_and_names_it(tmp_path, caplog):
    from qmri_bids.bids.discovery import discover

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    (ds / "sub-01" / "anat" / "sub-01_T1w.json").write_text('{"EchoTime": }')
    (res,) = discover(ds, tmp_path / "db", ["01"])
    assert [a.path.name for a in res.anat] == ["sub-01_T1w.nii.gz"]
    assert "sub-01_T1w.json is not valid JSON" in caplog.text and "line 1" in caplog.text


def _non_utf8(folder: Path, stem: str) -> Path:
    """A path whose name holds the byte 0xff (not UTF-8), as Python sees it (a surrogate)."""
    name = os.fsdecode(os.fsencode(stem) + b"\xff")
    return folder / name


def test_names_that_are_not_utf8(tmp_path):
    from qmri_bids.bids.discovery import discover, list_subjects_on_disk
    from qmri_bids.bids.scan import scan_dataset

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    anat = ds / "sub-01" / "anat"
    image = Path(str(_non_utf8(anat, "sub-01_acq-")) + "_T1w.nii.gz")
    save_nifti(image, blob_image(SHAPE))
    _non_utf8(anat, "notes-").write_text("not an image\n")
    _non_utf8(ds, "sub-0").mkdir()
    scan = scan_dataset(ds, None)
    unusable = [p for p in scan.problems if p.unusable]
    assert [p.path for p in unusable] == [image]
    assert "not valid UTF-8" in unusable[0].message() and "\\udcff" in unusable[0].message()
    assert list_subjects_on_disk(ds) == ["01"]
    (res,) = discover(ds, tmp_path / "db", ["01"])
    assert [a.path.name for a in res.anat] == ["sub-01_T1w.nii.gz"]


# -------------------------------------------------------------------------- filters, labels
@pytest.mark.parametrize("query, words", [
    ({"t1w": {"foo": "bar"}}, "unknown entity 'foo'"),
    ({"t1w": {"acquisition": {"a": 1}}}, "not a usable value"),
    ({"t1w": {"run": []}}, "empty list"),
    ({"t1w": {"run": [1, True]}}, "not a usable value"),
    ({"vfa": {"echo": float("nan")}}, "not a usable value"),
])
def test_bad_filter_files_are_usage_errors(tmp_path, query, words):
    from qmri_bids.bids.discovery import load_filters

    path = tmp_path / "filter.json"
    path.write_text(json.dumps(query))
    with pytest.raises(UsageError, match=words) as info:
        load_filters(path)
    assert str(path) in str(info.value) and info.value.exit_code == EXIT_USAGE


def test_good_filter_file_is_kept(tmp_path):
    from qmri_bids.bids.discovery import load_filters

    path = tmp_path / "filter.json"
    query = {"t1w": {"acquisition": None, "run": [1, 2], "reconstruction": "*",
                     "EchoTime": 0.004}}
    path.write_text(json.dumps(query))
    assert load_filters(path) == query


def test_filter_on_a_sidecar_field_the_dataset_lacks_exits_64(tmp_path, isolated_env):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    path = tmp_path / "filter.json"
    path.write_text(json.dumps({"t1w": {"NoSuchField": 3}}))
    code, _, err = cli([ds, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--skip-bids-validation", "--bias-method", "n4",
                        "--bids-filter-file", path])
    assert code == EXIT_USAGE, err
    assert "'NoSuchField'" in err and "Traceback" not in err


def test_subject_folders_with_unsafe_labels_are_ignored(tmp_path):
    from qmri_bids.bids.discovery import list_subjects_on_disk

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    for name in ("sub-a b", "sub-x;rm", "sub-..", "sub-"):
        (ds / name).mkdir()
    assert list_subjects_on_disk(ds) == ["01"]


# ------------------------------------------------------------- dataset-level files, at start
@pytest.mark.parametrize("text, words", [
    ('{"Name": ', "not valid JSON: Expecting value at line 1, column 10"),
    ("[]", "must hold a JSON object"),
    ("\xff", "not UTF-8"),
])
def test_broken_dataset_description_exits_16_without_validation(tmp_path, isolated_env,
                                                                  text, words):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    (ds / "dataset_description.json").write_bytes(text.encode("latin-1"))
    code, _, err = cli([ds, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--skip-bids-validation", "--bias-method", "n4"])
    assert code == EXIT_VALIDATION, err
    assert "dataset_description.json" in err and words in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------ one run: bad inputs beside good ones
@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> dict:
    """sub-good fine; sub-json: its T1w sidecar is not valid JSON; sub-huge: header declaring
    4000³ voxels on a tiny file, beside a good T2w; sub-sing: singular affine; sub-cplx: a
    complex-valued image; sub-utf: an image named with a byte that is not UTF-8, beside a
    good T1w; sub-loop: a folder symlinked to itself."""
    base = tmp_path_factory.mktemp("mixed")
    subjects = ("good", "json", "huge", "sing", "cplx", "utf", "loop")
    ds = make_tiny_bids(base / "ds", subjects=subjects, shape=SHAPE)
    anat = {s: ds / f"sub-{s}" / "anat" for s in subjects}
    (anat["json"] / "sub-json_T1w.json").write_text('{"RepetitionTime": 0.02,\n"EchoTime" 1}')
    _huge_header(anat["huge"] / "sub-huge_T1w.nii.gz")
    save_nifti(anat["huge"] / "sub-huge_T2w.nii.gz", blob_image(SHAPE, seed=3))
    _singular(anat["sing"] / "sub-sing_T1w.nii.gz")
    _complex(anat["cplx"] / "sub-cplx_T1w.nii.gz")
    save_nifti(Path(str(_non_utf8(anat["utf"], "sub-utf_acq-")) + "_T1w.nii.gz"),
               blob_image(SHAPE))
    (anat["loop"] / "again").symlink_to(".")
    out, work = base / "out", base / "work"
    home, cwd = base / "home", base / "cwd"
    home.mkdir()
    cwd.mkdir()
    saved = os.getcwd()
    os.chdir(cwd)
    try:
        code, stdout, stderr = cli([ds, out, "participant", "-w", work, "--bias-method", "n4",
                                    "--skip-bids-validation", "--nprocs", "2",
                                    "--omp-nthreads", "1"], env={"HOME": str(home)})
    finally:
        os.chdir(saved)
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "ds": ds,
            "home": home, "cwd": cwd}


def _n4_outputs(run, subject) -> list[str]:
    return sorted(p.name for p in (run["out"] / f"sub-{subject}" / "anat").glob("*desc-n4*.nii.gz"))


def test_mixed_run_exits_65_without_traceback(mixed_run):
    assert mixed_run["code"] == EXIT_BAD_DATA, mixed_run["stderr"][-3000:]
    assert "Traceback" not in mixed_run["stderr"] + mixed_run["stdout"]
    assert "internal error" not in mixed_run["stderr"]
    assert list(mixed_run["home"].iterdir()) == [] and list(mixed_run["cwd"].iterdir()) == []


@pytest.mark.parametrize("name, words", [
    ("sub-json_T1w.json", "is not valid JSON: Expecting ':' delimiter at line 2, column 12"),
    ("sub-huge_T1w.nii.gz", "4000x4000x4000"),
    ("sub-sing_T1w.nii.gz", "singular"),
    ("sub-cplx_T1w.nii.gz", "complex-valued"),
    ("sub-utf_acq-\\udcff_T1w.nii.gz", "not valid UTF-8"),
])
def test_mixed_run_names_each_bad_file(mixed_run, name, words):
    final = mixed_run["stderr"].split("qmri-bids: error:")[-1]
    line = next((ln for ln in final.splitlines() if name in ln), "")
    assert words in line, final


@pytest.mark.parametrize("subject, expected", [
    ("good", ["sub-good_desc-n4_T1w.nii.gz", "sub-good_desc-n4field_T1w.nii.gz"]),
    ("huge", ["sub-huge_desc-n4_T2w.nii.gz", "sub-huge_desc-n4field_T2w.nii.gz"]),
    ("utf", ["sub-utf_desc-n4_T1w.nii.gz", "sub-utf_desc-n4field_T1w.nii.gz"]),
    ("loop", ["sub-loop_desc-n4_T1w.nii.gz", "sub-loop_desc-n4field_T1w.nii.gz"]),
    ("json", []), ("sing", []), ("cplx", []),
])
def test_mixed_run_processes_the_rest(mixed_run, subject, expected):
    assert _n4_outputs(mixed_run, subject) == expected
