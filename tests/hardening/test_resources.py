"""Resource faults and trust boundaries: full and read-only disks (injected, and for real on a
small tmpfs where mounting is permitted), the bias CNN and --model-dir checked at start,
internal-error dumps, temporary files, the work dir's permissions."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.errors import (
    EXIT_BAD_DATA,
    EXIT_CANNOT_WRITE,
    EXIT_NODE_FAILED,
    EXIT_USAGE,
    CannotWriteError,
)
from tests.foundation._helpers import cli, make_tiny_bids, run_log

from ._procs import node_running, slow_dataset

SHAPE = (16, 16, 8)
# What Nipype records when a worker cannot save a node's result on a full work dir (abridged).
NIPYPE_ENOSPC = """Traceback (most recent call last):
  File ".../nipype/utils/filemanip.py", line 695, in savepkl
    with pkl_open(tmpfile, "wb") as pkl_file:
OSError: [Errno 28] No space left on device
During handling of the above exception, another exception occurred:
FileNotFoundError: {work}/qmri_bids_0_1_wf/sub_01_wf/anat_00_T1w_bias_wf/cnn/result_cnn.pklz
"""


# ------------------------------------------------------------------ write faults, injected
def test_probe_reports_a_full_folder(tmp_path, monkeypatch):
    from qmri_bids import safety

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safety.os, "write", full)
    with pytest.raises(CannotWriteError) as info:
        safety.probe_space("output_dir", tmp_path / "out")
    assert str(info.value).startswith(f"output_dir {tmp_path / 'out'}: no space left on "
                                      f"{tmp_path / 'out'}")
    assert info.value.exit_code == EXIT_CANNOT_WRITE
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the probe is gone


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_write_error_names_the_folder(tmp_path, code, words):
    from qmri_bids.safety import write_error

    out, work = tmp_path / "out", tmp_path / "work"
    for folder in (out, work):
        folder.mkdir()
    exc = OSError(code, os.strerror(code), str(work / "x" / "result.pklz"))
    error = write_error(exc, [out, work])
    assert error is not None and str(error).startswith(f"{words} on {work}")
    # an input that cannot be read is not a fault of the run's folders
    denied = OSError(errno.EACCES, "Permission denied", "/elsewhere/input.nii.gz")
    assert write_error(denied, [out, work]) is None
    assert write_error(ValueError("not a file-system problem"), [out, work]) is None


def test_sqlite_full_is_a_write_fault(tmp_path):
    from qmri_bids.safety import write_error

    class OperationalError(Exception):
        pass

    exc = OperationalError("(sqlite3.OperationalError) database or disk is full")
    error = write_error(exc, [tmp_path])
    assert error is not None and f"no space left on {tmp_path}" in str(error)


def test_node_traceback_with_enospc_names_the_work_dir(tmp_path):
    from qmri_bids.safety import write_fault_in_text

    out, work = tmp_path / "out", tmp_path / "work"
    error = write_fault_in_text(NIPYPE_ENOSPC.format(work=work), [out, work])
    assert error is not None and str(error).startswith(f"no space left on {work}")
    assert write_fault_in_text("ValueError: something else", [out, work]) is None


def test_node_write_fault_is_exit_73(tmp_path, monkeypatch):
    from qmri_bids.cli import run as cli_run
    from qmri_bids.config import RunConfig

    config = RunConfig(bids_dir=tmp_path / "ds", output_dir=tmp_path / "out",
                       analysis_level="participant", work_dir=tmp_path / "work")
    monkeypatch.setattr(cli_run, "_RUN_FOLDERS", [config.output_dir, config.work_dir])
    failures = [{"node": "cnn", "fullname": "wf.cnn", "mem_gb": 1.0, "subject": "01",
                 "text": NIPYPE_ENOSPC.format(work=config.work_dir)},
                {"node": "n4", "fullname": "wf.n4", "mem_gb": 1.0, "subject": "01",
                 "text": "BadDataError: x.nii.gz: all zero"}]
    error = cli_run._failure_error(failures, config, RuntimeError())
    assert error.exit_code == EXIT_CANNOT_WRITE
    assert f"no space left on {config.work_dir}" in str(error) and "resume" in str(error)
    only_bad = cli_run._failure_error(failures[1:], config, RuntimeError())
    assert only_bad.exit_code == EXIT_BAD_DATA


def test_partial_files_of_atomic_writes_are_removed(tmp_path):
    from qmri_bids.artifacts import atomic_write
    from qmri_bids.safety import remove_partial_files

    target = tmp_path / "sub-01" / "anat" / "sub-01_desc-n4_T1w.nii.gz"

    def killed(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        Path(str(tmp) + ".nii.gz").write_bytes(b"half")  # what nibabel writes beside it
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, killed)
    leftovers = [p.name for p in target.parent.iterdir()]
    assert leftovers and not target.exists()  # nibabel's file survived the writer's cleanup
    keep = target.parent / "sub-01_T1w.json"
    keep.write_text("{}")
    removed = remove_partial_files(tmp_path / "sub-01")
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert [p.name for p in target.parent.iterdir()] == [keep.name]


# --------------------------------------------------------------- checks at start
@pytest.fixture()
def corrupt_shipped_cnn(tmp_path, monkeypatch) -> Path:
    """The shipped bias-CNN weights, truncated, in a copy of the package's model folder."""
    from qmri_bids.bias import weights

    models = tmp_path / "models"
    shutil.copytree(weights.models_dir(), models)
    path = models / f"{weights.DEFAULT_MODEL}.safetensors"
    path.write_bytes(path.read_bytes()[:2000])
    monkeypatch.setattr(weights, "models_dir", lambda: models)
    return path


def test_corrupt_shipped_cnn_is_one_line_at_start(tmp_path, isolated_env, corrupt_shipped_cnn):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    work = tmp_path / "w"
    code, stdout, err = cli([ds, tmp_path / "out", "participant", "-w", work,
                             "--skip-bids-validation"])
    assert code == EXIT_BAD_DATA, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmri-bids: error: ")
    assert str(corrupt_shipped_cnn) in lines[0] and "integrity" in lines[0]
    assert stdout == "" and not work.exists()  # before the workflow, before any folder


@pytest.mark.parametrize("kind, code", [("file", EXIT_USAGE), ("below-file", EXIT_CANNOT_WRITE),
                                        ("inside-input", EXIT_USAGE)])
def test_model_dir_is_checked_at_start(tmp_path, isolated_env, kind, code):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a folder\n")
    model_dir = {"file": a_file, "below-file": a_file / "models",
                 "inside-input": ds / "models"}[kind]
    got, _, err = cli([ds, tmp_path / "out", "participant", "-w", tmp_path / "w",
                       "--skip-bids-validation", "--bias-method", "n4",
                       "--model-dir", model_dir])
    assert got == code, err
    assert f"--model-dir {model_dir}" in err and "Traceback" not in err
    if code == EXIT_USAGE:  # refused before any folder is made
        assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- trust boundaries
def test_internal_error_dump_goes_to_the_work_dir(tmp_path, isolated_env, monkeypatch):
    from qmri_bids.cli import run as cli_run

    def bug(*args, **kwargs):
        raise ValueError("a bug of qmri-bids")

    monkeypatch.setattr(cli_run, "run_participant_level", bug)
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    work, tmpdir = tmp_path / "w", tmp_path / "tmpdir"
    tmpdir.mkdir()
    code, _, err = cli([ds, tmp_path / "out", "participant", "-w", work,
                        "--skip-bids-validation", "--bias-method", "n4"],
                       env={"TMPDIR": str(tmpdir)})
    assert code == EXIT_NODE_FAILED
    assert "internal error (ValueError: a bug of qmri-bids)" in err and "Traceback" not in err
    (dump,) = (work / "logs").glob("crash-*.txt")
    assert f"details in {dump}" in err
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert "Traceback" in dump.read_text() and "a bug of qmri-bids" in dump.read_text()
    assert list(tmpdir.iterdir()) == []


def test_crash_dump_never_follows_a_planted_symlink(tmp_path, monkeypatch):
    from qmri_bids import safety

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    fixed = uuid.UUID(int=0x1234)
    calls = iter([fixed, uuid.uuid4(), uuid.uuid4()])
    monkeypatch.setattr(safety.uuid, "uuid4", lambda: next(calls))
    monkeypatch.setattr(safety.time, "strftime", lambda fmt: "20260101-000000")
    planted = logs / f"crash-20260101-000000-{os.getpid()}-{fixed.hex[:12]}.txt"
    planted.symlink_to(victim)
    dump = safety.write_crash_dump("details\n", [logs])
    assert dump is not None and dump != planted and dump.parent == logs
    assert dump.read_text() == "details\n" and victim.read_text() == "precious\n"


def test_crash_dump_without_a_usable_folder_is_private(tmp_path, monkeypatch):
    from qmri_bids import safety

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    dump = safety.write_crash_dump("details\n", [blocker / "logs"])
    assert dump is not None and dump.parent == tmp_path and dump.name.startswith("qmri-bids-")
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600


def test_private_tmpdir(tmp_path, monkeypatch):
    from qmri_bids.safety import private_tmpdir

    monkeypatch.setenv("TMPDIR", "/somewhere/else")
    monkeypatch.delenv("TEMP", raising=False)
    with private_tmpdir(tmp_path / "work", "run1") as tmp:
        assert tmp == tmp_path / "work" / "tmp" / "run1"
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o700
        assert tempfile.gettempdir() == str(tmp) and os.environ["TEMP"] == str(tmp)
        with tempfile.NamedTemporaryFile() as handle:
            assert Path(handle.name).parent == tmp
    assert not (tmp_path / "work" / "tmp").exists()
    assert os.environ["TMPDIR"] == "/somewhere/else" and "TEMP" not in os.environ


def test_private_tmpdir_removes_folders_of_dead_runs_only(tmp_path):
    import sys

    from qmri_bids.safety import private_tmpdir

    root = tmp_path / "work" / "tmp"
    dead = root / "run-dead"
    dead.mkdir(parents=True)
    (dead / "junk").write_text("left by a killed run\n")
    code = ("import sys, time; from qmri_bids.locks import FileLock; "
            "FileLock(sys.argv[1]).acquire(); print('ok', flush=True); time.sleep(60)")
    live = root / "run-live"
    live.mkdir()
    staging = root / ".run-starting.x1"  # a run between making and renaming its folder
    staging.mkdir()
    old_staging = root / ".run-crashed.x2"
    old_staging.mkdir()
    os.utime(old_staging, (time.time() - 7200, time.time() - 7200))
    holder = subprocess.Popen([sys.executable, "-c", code, str(live / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with private_tmpdir(tmp_path / "work", "run-new") as tmp:
            assert not dead.exists() and not old_staging.exists()
            assert live.is_dir() and staging.is_dir() and tmp.is_dir()
            assert sorted(p.name for p in root.iterdir()) == sorted(
                [".run-starting.x1", "run-live", "run-new"])
            assert (tmp / ".lock").is_file()  # held by this run while the block runs
        assert not tmp.exists()
    finally:
        holder.kill()
        holder.wait()
    assert live.is_dir()


def test_world_writable_work_dir_is_warned(tmp_path):
    from qmri_bids.safety import check_work_dir_private

    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    assert check_work_dir_private(work) is None
    work.chmod(0o777)
    assert "writable by everyone" in check_work_dir_private(work)
    work.chmod(0o1777)  # sticky, like /tmp: others cannot replace our files
    assert check_work_dir_private(work) is None


# ------------------------------------------------------------ real full / read-only disks
def _mount_tmpfs(mnt: Path, size: str = "4M") -> None:
    """Mount a small tmpfs at ``mnt`` (needs root or CAP_SYS_ADMIN; the test skips otherwise)."""
    mnt.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system to fill")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({proc.stderr.strip()}); "
                    "the write faults are covered by the injected tests above")


@pytest.fixture()
def small_fs(tmp_path):
    """A 4 MiB tmpfs."""
    mnt = tmp_path / "fs"
    _mount_tmpfs(mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _fill(mnt: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(mnt).free
    (mnt / "filler").write_bytes(b"\0" * max(0, free - leave_bytes))


def _no_half_written(folder: Path) -> None:
    from qmri_bids.safety import _PARTIAL

    assert not [p for p in folder.rglob("*") if _PARTIAL.match(p.name)]
    for image in folder.rglob("*.nii.gz"):
        assert np.isfinite(nib.load(str(image)).get_fdata()).all()  # complete, readable


def test_output_disk_full_mid_run(tmp_path, isolated_env, small_fs):
    ds = slow_dataset(tmp_path / "ds", subjects=("01",))
    out = small_fs / "out"
    _fill(small_fs, 200 * 1024)  # room for the start checks, not for the outputs
    code, _, err = cli([ds, out, "participant", "-w", tmp_path / "w", "--bias-method", "n4",
                        "--skip-bids-validation", "--nprocs", "1"])
    assert code == EXIT_CANNOT_WRITE, err[-3000:]
    assert f"no space left on {out}" in err and "Traceback" not in err
    _no_half_written(out)


def test_output_disk_full_at_start(tmp_path, isolated_env, small_fs):
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    _fill(small_fs, 8 * 1024)
    t0 = time.monotonic()
    code, _, err = cli([ds, small_fs / "out", "participant", "-w", tmp_path / "w",
                        "--bias-method", "n4", "--skip-bids-validation"])
    assert code == EXIT_CANNOT_WRITE and time.monotonic() - t0 < 60
    assert f"no space left on {small_fs / 'out'}" in err


def test_work_disk_full_ends_within_seconds(tmp_path, isolated_env, small_fs):
    """It used to hang (Nipype waiting for a result file that could not be written)."""
    ds = slow_dataset(tmp_path / "ds", subjects=("01",))
    work = small_fs / "w"
    _fill(small_fs, 120 * 1024)
    t0 = time.monotonic()
    code, _, err = cli([ds, tmp_path / "out", "participant", "-w", work, "--bias-method", "n4",
                        "--skip-bids-validation", "--nprocs", "1"])
    assert time.monotonic() - t0 < 90
    assert code == EXIT_CANNOT_WRITE, err[-3000:]
    assert f"no space left on {work}" in err and "Traceback" not in err
    _no_half_written(tmp_path / "out")


def test_work_dir_read_only_mid_run(tmp_path, isolated_env):
    """The Nipype folder of the work dir turns read-only while nodes run (as when a file
    system is remounted read-only after an error). Linux refuses to remount a file system that
    has files open for writing (the run's log), so the read-only mount is the workflow folder."""
    from qmri_bids.config import version_tag

    ds = slow_dataset(tmp_path / "ds", subjects=("01", "02"))
    work = tmp_path / "w"
    nipype_dir = work / f"qmri_bids_{version_tag()}_wf"
    _mount_tmpfs(nipype_dir, "64M")
    remounted = threading.Event()

    def remount_when_a_node_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not node_running(work):
            time.sleep(0.05)
        if subprocess.run(["mount", "-o", "remount,ro", str(nipype_dir)],
                          check=False).returncode == 0:
            remounted.set()

    watcher = threading.Thread(target=remount_when_a_node_runs, daemon=True)
    watcher.start()
    try:
        code, _, err = cli([ds, tmp_path / "out", "participant", "-w", work,
                            "--bias-method", "n4", "--skip-bids-validation", "--nprocs", "1"])
    finally:
        watcher.join(130)
        subprocess.run(["umount", "-l", str(nipype_dir)], capture_output=True, check=False)
    assert remounted.is_set(), "could not remount the workflow folder read-only"
    assert code == EXIT_CANNOT_WRITE, err[-3000:]
    assert f"read-only file system on {work}" in err and "Traceback" not in err
    assert "run the same command again" in err
    _no_half_written(tmp_path / "out")


def test_log_file_that_cannot_be_written_warns_once(tmp_path, isolated_env, monkeypatch):
    """A full work dir also stops the log file: one warning, no logging traceback."""
    from qmri_bids.cli import run as cli_run

    original = cli_run._LogFile.emit
    calls = {"n": 0}

    def failing_emit(self, record):
        calls["n"] += 1
        if calls["n"] > 3:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                self.handleError(record)
            return
        original(self, record)

    monkeypatch.setattr(cli_run._LogFile, "emit", failing_emit)
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=SHAPE)
    code, _, err = cli([ds, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--bias-method", "n4", "--skip-bids-validation", "--nprocs", "1"])
    assert code == 0, err[-3000:]
    assert err.count("cannot be written any more") == 1
    assert "Logging error" not in err and "Traceback" not in err
    assert run_log(tmp_path / "w")  # what was logged before the fault is there
