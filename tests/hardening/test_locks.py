"""The one lock helper (qmri_bids.locks), exercised with real processes: a live holder is
refused and named, a dead holder's lock is detected and taken over, and the file goes away on
release; the same with the O_EXCL fallback used where flock is not supported."""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qmri_bids.locks import FileLock, LockHeldError, file_lock, read_owner

from ._procs import wait_for

HOLDER = textwrap.dedent("""
    import sys, time
    from qmri_bids.locks import FileLock
    lock = FileLock(sys.argv[1], purpose="test holder")
    lock.acquire()
    print("locked", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(120)
    else:  # die without releasing, as a killed process would
        import os
        os._exit(0)
""")
FORCE_EXCLUSIVE = textwrap.dedent("""
    import errno, fcntl
    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    fcntl.flock = no_flock
""")


def _holder(path: Path, mode: str, exclusive: bool = False) -> subprocess.Popen:
    code = (FORCE_EXCLUSIVE if exclusive else "") + HOLDER
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture(params=["flock", "exclusive"])
def mode(request, monkeypatch) -> str:
    if request.param == "exclusive":
        def no_flock(*args):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_flock)
    return request.param


def test_live_holder_is_refused_and_named(tmp_path, mode):
    path = tmp_path / "sub-01.lock"
    proc = _holder(path, "hold", exclusive=mode == "exclusive")
    try:
        with pytest.raises(LockHeldError) as info:
            FileLock(path, timeout_s=0.3, poll_s=0.05).acquire()
        assert info.value.owner is not None and info.value.owner.pid == proc.pid
        assert f"pid {proc.pid}" in str(info.value) and str(path) in str(info.value)
        assert "test holder" in str(info.value)
        assert isinstance(info.value, TimeoutError)  # what model_store's callers expect
    finally:
        proc.kill()
        proc.wait()


def test_dead_holder_is_taken_over(tmp_path, mode, caplog):
    path = tmp_path / "sub-01.lock"
    proc = _holder(path, "die", exclusive=mode == "exclusive")
    proc.wait()
    stale = read_owner(path)
    assert stale is not None and stale.pid == proc.pid  # the record survived its process
    lock = FileLock(path, timeout_s=0)
    owner = lock.acquire()
    try:
        assert owner.pid == os.getpid()
        assert lock.took_over is not None and lock.took_over.pid == proc.pid
        assert f"pid {proc.pid}" in caplog.text and "no longer running" in caplog.text
        assert read_owner(path).pid == os.getpid()
    finally:
        lock.release()
    assert not path.exists()


def test_killed_holder_is_taken_over(tmp_path):
    """kill -9 of a process holding the lock: the kernel drops its flock at once."""
    path = tmp_path / "sub-01.lock"
    proc = _holder(path, "hold")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with file_lock(path, timeout_s=5, poll_s=0.05) as owner:
        assert owner.pid == os.getpid()


def test_waiting_for_a_lock_until_it_is_released(tmp_path):
    path = tmp_path / "model.lock"
    proc = _holder(path, "hold")
    try:
        assert wait_for(lambda: read_owner(path) is not None, 5)
        with pytest.raises(LockHeldError):
            FileLock(path, timeout_s=0.2, poll_s=0.05).acquire()
        proc.kill()
        with file_lock(path, timeout_s=10, poll_s=0.05, purpose="training x") as owner:
            assert json.loads(path.read_text())["purpose"] == "training x"
            assert owner.purpose == "training x"
    finally:
        proc.kill()
        proc.wait()


def test_one_holder_among_many_processes(tmp_path):
    """Four processes race for one lock; they record who held it when; no two overlap."""
    path = tmp_path / "race.lock"
    log = tmp_path / "log"
    code = textwrap.dedent("""
        import sys, time
        from qmri_bids.locks import file_lock
        for _ in range(5):
            with file_lock(sys.argv[1], timeout_s=60, poll_s=0.01):
                t0 = time.monotonic()
                time.sleep(0.02)
                with open(sys.argv[2], "a") as fh:
                    fh.write(f"{t0} {time.monotonic()}\\n")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(log)])
             for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 20
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert not path.exists()


def test_planted_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = tmp_path / "sub-01.lock"
    path.symlink_to(victim)
    with pytest.raises(OSError) as info:
        FileLock(path).acquire()
    assert info.value.errno == errno.ELOOP
    assert victim.read_text() == "precious\n"


def test_not_reentrant_and_release_is_idempotent(tmp_path):
    lock = FileLock(tmp_path / "x.lock")
    lock.acquire()
    with pytest.raises(RuntimeError):
        lock.acquire()
    lock.release()
    lock.release()
    assert not (tmp_path / "x.lock").exists()
