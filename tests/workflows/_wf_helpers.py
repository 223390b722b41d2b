"""Helpers of the workflow-level tests (``tests.workflows._wf_helpers``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.foundation._helpers import cli


def participant_run(bids: Path, base: Path, *extra) -> dict:
    """``qmri-bids bids base/out participant -w base/work --nprocs 2 --omp-nthreads 1 ...``."""
    out, work = base / "out", base / "work"
    code, stdout, stderr = cli([bids, out, "participant", "-w", work, "--nprocs", "2",
                                "--omp-nthreads", "1", *extra])
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "work": work,
            "bids": bids}


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))


def sidecar(path: Path) -> dict:
    return json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())


def copy_subject(src_bids: Path, dst_bids: Path, src_sub: str, dst_sub: str,
                 patterns: tuple[str, ...]) -> Path:
    """Copy the files of ``sub-<src_sub>`` matching ``patterns`` (globs relative to the subject
    folder) to ``dst_bids/sub-<dst_sub>``, renaming the subject label in names and in
    IntendedFor; write the dataset files when missing."""
    dst_bids.mkdir(parents=True, exist_ok=True)
    for name in ("dataset_description.json", "README"):
        if (src_bids / name).is_file() and not (dst_bids / name).exists():
            shutil.copy(src_bids / name, dst_bids / name)
    src = src_bids / f"sub-{src_sub}"
    for pattern in patterns:
        for path in sorted(src.glob(pattern)):
            rel = path.relative_to(src).as_posix().replace(f"sub-{src_sub}", f"sub-{dst_sub}")
            target = dst_bids / f"sub-{dst_sub}" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".json":
                target.write_text(path.read_text().replace(f"sub-{src_sub}", f"sub-{dst_sub}"))
            else:
                shutil.copy(path, target)
    subs = sorted(p.name for p in dst_bids.glob("sub-*"))
    (dst_bids / "participants.tsv").write_text("participant_id\n" + "".join(f"{s}\n" for s in subs))
    return dst_bids / f"sub-{dst_sub}"


def participant_run_subprocess(bids: Path, base: Path, *extra, timeout: int = 600) -> dict:
    """The same run through the ``qmri-bids`` console script, in a fresh process.

    Needed where a MultiProc worker trains an estimator: workers are forked from the calling
    process, and a pytest process that already ran torch (the demo fixture) has an OpenMP pool
    that a forked child cannot use (the training node's validation then hangs in libgomp).
    """
    import os
    import subprocess
    exe = shutil.which("qmri-bids")
    if exe is None:
        import pytest

        pytest.skip("the qmri-bids console script is not on PATH")
    out, work = base / "out", base / "work"
    base.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, str(bids), str(out), "participant", "-w", str(work),
                           "--nprocs", "2", "--omp-nthreads", "1", *map(str, extra)],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=base, env=dict(os.environ))
    return {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "out": out,
            "work": work, "bids": bids}
