"""Helpers of the foundation test suite (CLI, discovery, runs, bad inputs).

Expensive things (the demo dataset, participant runs) are made once per session or module.
The CLI is called in-process through ``qmri_bids.cli.run.main`` (which returns the exit code;
argparse errors and ``--version`` raise ``SystemExit``, turned into a code by ``cli``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

# A smaller demo: the default field of view (80×96×72 voxels at 2.2 mm) at 3/4 of the resolution,
# so that the head phantom is whole and N4 runs in about a second per image. (At half the
# resolution N4 works on ~18 mm voxels after its shrink factor of 4 and its field correlates with
# the true one at only ~0.75, so the ground-truth check would lose its meaning.)
DEMO_SHAPE = (60, 72, 54)
DEMO_SPACING = (2.2 * 80 / 60,) * 3


def cli(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``qmri-bids argv`` in-process; return (exit code, stdout, stderr).

    ``main`` sets ``OMP_NUM_THREADS`` in ``os.environ``: the environment is restored afterwards
    so that one test's run cannot change the next one's.
    """
    from qmri_bids.cli.run import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse: usage errors and --version
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        _close_log_handlers()
    return code, out.getvalue(), err.getvalue()


def _close_log_handlers() -> None:
    """The CLI attaches a file handler to the 'qmri_bids' logger; close it between runs."""
    import logging

    root = logging.getLogger("qmri_bids")
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)


def run_log(work_dir: Path) -> str:
    """Text of every run log in ``work_dir/logs`` (the CLI's log file, DEBUG level)."""
    return "\n".join(p.read_text() for p in sorted((Path(work_dir) / "logs").glob("*.log")))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime_ns) of every file and folder below ``folder``."""
    folder = Path(folder)
    out = {}
    for path in folder.rglob("*"):
        st = path.lstat()
        out[path.relative_to(folder).as_posix()] = (st.st_size if path.is_file() else 0,
                                                    st.st_mtime_ns)
    return out


def save_nifti(path: Path, data: np.ndarray, spacing=(2.0, 2.0, 2.0), dtype=np.float32) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing[: 3], 1.0])
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


def blob_image(shape=(24, 24, 12), seed: int = 0) -> np.ndarray:
    """A smooth bright ellipsoid with a linear shading and a little noise (a small 'object')."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 <= 1
    shading = 1.0 + 0.3 * x
    data = np.where(inside, 800.0 * shading, 0.0) + rng.normal(0, 10, shape)
    return np.abs(data)


def make_tiny_bids(root: Path, subjects=("01", "02"), shape=(24, 24, 12),
                   suffixes=("T1w",)) -> Path:
    """A minimal valid BIDS dataset with small anatomical images (one per suffix)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "tiny test dataset", "BIDSVersion": "1.10.0", "DatasetType": "raw",
         "License": "CC0"}))
    (root / "README").write_text("A tiny dataset written by the qmri-bids test suite.\n")
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    for index, sub in enumerate(subjects):
        for suffix in suffixes:
            stem = root / f"sub-{sub}" / "anat" / f"sub-{sub}_{suffix}"
            save_nifti(stem.with_name(stem.name + ".nii.gz"), blob_image(shape, seed=index))
            stem.with_name(stem.name + ".json").write_text(json.dumps(
                {"RepetitionTime": 0.02, "EchoTime": 0.004, "FlipAngle": 20}))
    return root


