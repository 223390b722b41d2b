"""Helpers of the hardening tests: qmri-bids in a child process, and the processes it starts.

A run in a child process (``python -m qmri_bids``) is what a user or a scheduler sees: signals,
``kill -9`` and a second concurrent run act on real processes. The child's HOME and TMPDIR are
empty folders of the test, so that stray writes can be detected.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.foundation._helpers import blob_image, make_tiny_bids, save_nifti

#: an image on which N4 takes a few seconds: long enough to interrupt a run while it works
SLOW_SHAPE = (56, 56, 40)


def slow_dataset(root: Path, subjects=("01", "02", "03")) -> Path:
    """A BIDS dataset of T1w images big enough that a run lasts several seconds."""
    ds = make_tiny_bids(root, subjects=subjects, shape=(8, 8, 4))
    for index, sub in enumerate(subjects):
        save_nifti(ds / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz",
                   blob_image(SLOW_SHAPE, seed=index))
    return ds


def child_env(base: Path) -> dict[str, str]:
    """The environment of a child run: empty HOME and TMPDIR (created here), no telemetry."""
    home, tmp = base / "home", base / "tmpdir"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "NIPYPE_NO_ET": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def start_run(argv: list, base: Path, name: str = "run") -> tuple[subprocess.Popen, Path, Path]:
    """Start ``qmri-bids argv`` in a child process; returns it and its stdout/stderr files."""
    out, err = base / f"{name}.stdout", base / f"{name}.stderr"
    proc = subprocess.Popen([sys.executable, "-m", "qmri_bids", *map(str, argv)],
                            stdout=out.open("wb"), stderr=err.open("wb"),
                            env=child_env(base), cwd=base)
    return proc, out, err


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def node_running(work_dir: Path) -> bool:
    """Whether a Nipype node has started (it writes ``_0x<hash>_unfinished.json`` first)."""
    return any(Path(work_dir).rglob("_0x*_unfinished.json"))


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def alive(pid: int) -> bool:
    """Running (a zombie has exited, it only waits to be reaped)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
                out.append(int(entry.name))
    return out
