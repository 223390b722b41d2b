"""Real processes: SIGTERM/SIGINT stop a run cleanly (exit 143/130, workers gone, nothing
half-written, the work dir resumable); a second run of the same participant is refused while
the first holds its lock; kill -9 of the main process leaves no worker alive 5 s later, and the
next run takes over the dead run's lock and finishes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from qmri_bids.errors import EXIT_CANNOT_WRITE, EXIT_OK
from tests.foundation._helpers import cli

from ._procs import alive, children, node_running, slow_dataset, start_run, wait_for

pytestmark = pytest.mark.slow
OUTPUTS = ["sub-{s}_desc-n4_T1w.nii.gz", "sub-{s}_desc-n4field_T1w.nii.gz"]


def _argv(ds: Path, base: Path) -> list:
    return [ds, base / "out", "participant", "-w", base / "work", "--bias-method", "n4",
            "--skip-bids-validation", "--nprocs", "2", "--omp-nthreads", "1"]


def _outputs(out: Path, subject: str) -> list[str]:
    return sorted(p.name for p in (out / f"sub-{subject}" / "anat").glob("*.nii.gz"))


def _no_traces(base: Path) -> None:
    """Nothing in the child's HOME and TMPDIR; no lock, no temporary file left in the output."""
    from qmri_bids.safety import _PARTIAL

    assert list((base / "home").iterdir()) == [], "files written into HOME"
    assert list((base / "tmpdir").iterdir()) == [], "files written into TMPDIR"
    assert not list((base / "out").rglob("*.lock")), "a lock was left behind"
    assert not [p for p in (base / "out").rglob("*") if _PARTIAL.match(p.name)]
    assert not (base / "work" / "tmp").exists(), "the run's temporary folder was left"


def _start_and_wait_for_a_node(ds: Path, base: Path, name: str):
    proc, out, err = start_run(_argv(ds, base), base, name)
    if not wait_for(lambda: node_running(base / "work") or proc.poll() is not None, 120):
        proc.kill()
        pytest.fail("no node started within 120 s")
    assert proc.poll() is None, f"the run ended before a node ran: {err.read_text()[-2000:]}"
    workers = children(proc.pid)
    assert workers, "no worker process found"
    return proc, out, err, workers


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_run_cleanly(tmp_path, sig, code):
    ds = slow_dataset(tmp_path / "ds")
    proc, _, err, workers = _start_and_wait_for_a_node(ds, tmp_path, "first")
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=30) == code
    stderr = err.read_text()
    assert f"stopped by {signal.Signals(sig).name}" in stderr and "resume" in stderr
    assert "Traceback" not in stderr
    assert not [p for p in workers if alive(p)], "workers outlived the run"
    (run_file,) = (tmp_path / "out" / "logs").glob("run_*.json")
    record = json.loads(run_file.read_text())
    assert record["status"] == "interrupted" and record["exit_code"] == code
    _no_traces(tmp_path)
    if sig != signal.SIGTERM:
        return
    # The work dir is resumable: the same command finishes the job.
    again, _, err2 = start_run(_argv(ds, tmp_path), tmp_path, "again")
    assert again.wait(timeout=300) == EXIT_OK, err2.read_text()[-3000:]
    for s in ("01", "02", "03"):
        assert _outputs(tmp_path / "out", s) == [o.format(s=s) for o in OUTPUTS]
    _no_traces(tmp_path)


def test_same_participant_twice_then_kill9(tmp_path, isolated_env):
    ds = slow_dataset(tmp_path / "ds")
    first, _, _, workers = _start_and_wait_for_a_node(ds, tmp_path, "first")
    try:
        # A second run of the same participants into the same folders is refused at start.
        code, _, err2 = cli(_argv(ds, tmp_path))
        assert code == EXIT_CANNOT_WRITE, err2[-3000:]
        assert "sub-01 is already being processed" in err2 and f"pid {first.pid}" in err2
        assert "Traceback" not in err2
        assert first.poll() is None, "the refused run disturbed the first one"
        # kill -9 of the main process: its workers die with it.
        workers = children(first.pid) or workers
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        t0 = time.monotonic()
        assert wait_for(lambda: not any(alive(p) for p in workers), 5.0), \
            f"workers {[p for p in workers if alive(p)]} alive 5 s after kill -9"
        assert time.monotonic() - t0 <= 5.5
    finally:
        if first.poll() is None:
            first.kill()
    # The dead run's locks are taken over and the job finishes.
    again, _, err3 = start_run(_argv(ds, tmp_path), tmp_path, "again")
    assert again.wait(timeout=300) == EXIT_OK, err3.read_text()[-3000:]
    stderr = err3.read_text()
    assert f"taking over the lock left by pid {first.pid}" in stderr
    for s in ("01", "02", "03"):
        assert _outputs(tmp_path / "out", s) == [o.format(s=s) for o in OUTPUTS]
    _no_traces(tmp_path)


def test_cnn_run_does_not_deadlock_its_workers(tmp_path):
    """The start-up check of the shipped CNN must run no torch operation in the main process:
    torch's OpenMP pool, once started there, deadlocks forked workers that run the CNN."""
    from tests.foundation._helpers import make_tiny_bids

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=(24, 24, 12))
    argv = [ds, tmp_path / "out", "participant", "-w", tmp_path / "work", "--bias-method",
            "cnn", "--skip-bids-validation", "--nprocs", "2", "--omp-nthreads", "2"]
    proc, _, err = start_run(argv, tmp_path, "cnn")
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == EXIT_OK, err.read_text()[-3000:]
    assert _outputs(tmp_path / "out", "01") == ["sub-01_desc-cnn_T1w.nii.gz",
                                                "sub-01_desc-cnnfield_T1w.nii.gz"]
    _no_traces(tmp_path)
