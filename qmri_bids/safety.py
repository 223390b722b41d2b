"""Trust boundaries and resource faults of a run, in one place.

* **Where a run writes**: the output folder, the work folder and the model folder, nothing else.
  Temporary files go to a private folder inside the work dir (:func:`private_tmpdir`, which
  points ``TMPDIR`` at it for this process and every worker and library, so ``tempfile`` users
  such as torch follow); internal-error dumps are created exclusively (``O_EXCL``, never
  following a symlink) under a random name in the work dir's or the output's ``logs/``
  (:func:`write_crash_dump`).
* **What is trusted**: the work dir (Nipype unpickles its result files on resume, so whoever can
  write there can run code as the user: :func:`check_work_dir_private` warns when others can);
  the input dataset and the model folder are not (models are safetensors + sha256 only).
* **File-system faults**: a full disk, a read-only file system, a quota or a permission problem
  under one of the run's folders become :class:`~qmri_bids.errors.CannotWriteError` (exit 73)
  naming the folder (:func:`write_error`, :func:`write_fault_in_text`, :func:`probe_space`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from qmri_bids.errors import CannotWriteError

LOGGER = logging.getLogger("qmri_bids.safety")

#: errno -> how a write fault is worded (the same words whatever the library's message)
WRITE_FAULTS: dict[int, str] = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# What those faults look like in a traceback (another process's exception is only text):
# ``OSError: [Errno 28] No space left on device``, SQLite's ``database or disk is full``...
_FAULT_PATTERNS: list[tuple[re.Pattern[str], int]] = [
    (re.compile(r"\[Errno 28\]|No space left on device|database or disk is full"),
     errno.ENOSPC),
    (re.compile(r"\[Errno 122\]|Disk quota exceeded"), errno.EDQUOT),
    (re.compile(r"\[Errno 30\]|Read-only file system|attempt to write a readonly database"),
     errno.EROFS),
    (re.compile(r"\[Errno 13\] Permission denied"), errno.EACCES),
]
#: bytes written (and flushed) by the start-up probe of each folder
PROBE_BYTES = 64 * 1024


def safe_text(text: str) -> str:
    """``text`` printable on any terminal: file names that are not UTF-8 reach Python as lone
    surrogates, which a strict UTF-8 stream refuses; they are shown as ``\\udcff``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def free_bytes(folder: Path) -> int | None:
    """Free bytes for this user on ``folder``'s file system (None when it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _describe(errno_: int, folder: Path, detail: str = "") -> str:
    words = WRITE_FAULTS.get(errno_, os.strerror(errno_).lower())
    free = free_bytes(folder)
    room = f" ({free / 1024**2:.1f} MiB free)" if errno_ in (errno.ENOSPC, errno.EDQUOT) \
        and free is not None else ""
    tail = f": {detail}" if detail else ""
    return f"{words} on {folder}{room}{tail}"


def write_error(exc: BaseException, folders: Sequence[Path], what: str = "") -> CannotWriteError | None:
    """The exit-73 error for ``exc`` when it is a write fault under one of ``folders``.

    The folder named is the one that holds the failing path (``exc.filename``), or, when the
    error does not say (a failed ``write()``, SQLite), the one with the least free space.
    Returns None when ``exc`` is not a write fault.
    """
    code = _errno_of(exc)
    if code not in WRITE_FAULTS:
        return None
    folder = _folder_of(getattr(exc, "filename", None), folders, code)
    if folder is None:
        return None
    message = _describe(code, folder)
    if what:
        message += f" (while {what})"
    return CannotWriteError(message)


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno in WRITE_FAULTS:
        return exc.errno
    # SQLAlchemy wraps sqlite3 errors, which carry no errno, only words.
    for pattern, code in _FAULT_PATTERNS:
        if pattern.search(str(exc)):
            return code
    cause = exc.__cause__ or exc.__context__
    return _errno_of(cause) if cause is not None and cause is not exc else None


def _folder_of(filename: str | os.PathLike | None, folders: Sequence[Path],
              code: int) -> Path | None:
    folders = [Path(f) for f in folders if f is not None]
    if filename:
        path = Path(os.fsdecode(filename)).absolute()
        # The deepest folder wins (the model dir may lie inside the work dir).
        inside = sorted((f for f in folders if _is_within(path, f)), key=lambda f: -len(f.parts))
        if inside:
            return inside[0]
        if code in (errno.EACCES, errno.EPERM):
            return None  # e.g. an input that cannot be read: not a fault of our folders
        return path.parent
    if not folders:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return min(folders, key=lambda f: free_bytes(f) if free_bytes(f) is not None else 1 << 62)
    return folders[0]


def write_fault_in_text(text: str, folders: Sequence[Path]) -> CannotWriteError | None:
    """The exit-73 error for a write fault found in a traceback's text (a node's crash), naming
    the folder of a quoted path of the traceback when it lies in one of ``folders``."""
    for pattern, code in _FAULT_PATTERNS:
        if pattern.search(text):
            break
    else:
        return None
    folders = [Path(f) for f in folders if f is not None]
    mentioned = [Path(m) for m in re.findall(r"['\"](/[^'\"\n]+)['\"]", text)]
    mentioned += [Path(m) for m in re.findall(r"(?:FileNotFoundError|Error): (/\S+)", text)]
    for candidate in mentioned:
        folder = _folder_of(str(candidate), folders, code)
        if folder is not None and folder in folders:
            return CannotWriteError(_describe(code, folder))
    if code in (errno.EACCES, errno.EPERM):
        return None
    folder = _folder_of(None, folders, code)
    return CannotWriteError(_describe(code, folder)) if folder is not None else None


def probe_space(label: str, folder: Path, size: int = PROBE_BYTES) -> None:
    """Create ``folder`` and write, flush and remove a ``size``-byte file in it, so that a full,
    read-only or unwritable folder stops the run at start (exit 73) instead of mid-way."""
    probe = folder / f".qmri-bids-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        words = WRITE_FAULTS.get(exc.errno or 0, exc.strerror or str(exc))
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            message = f"{label} {folder}: {_describe(exc.errno, folder)}"
        else:
            message = f"{label} {folder} cannot be written: {words}"
        raise CannotWriteError(message) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# ------------------------------------------------------------------------- temporary files


@contextlib.contextmanager
def private_tmpdir(work_dir: Path, run_id: str) -> Iterator[Path]:
    """A private (0700) ``<work>/tmp/<run id>`` as the temporary folder of this run.

    ``TMPDIR`` (and ``TEMP``/``TMP``) point at it while the block runs (and ``MPLCONFIGDIR``
    at ``<work>/cache/matplotlib``), and ``tempfile``'s cache
    is reset, so this process, its workers (forked with this environment) and libraries that ask
    ``tempfile`` (torch's compile cache, nibabel, SQLite) write there instead of a shared
    ``/tmp``. The folder is removed afterwards; the environment is restored. Each run holds a
    lock in its folder, so the folders of runs that were killed are recognised and removed.
    """
    from qmri_bids.locks import FileLock, LockHeldError

    root = Path(work_dir) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    # Made under a hidden name, locked, then renamed: a visible folder always has its lock held
    # while its run lives (flock follows the file, not its name), so an unlocked one is stale.
    staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=root))
    lock = FileLock(staging / ".lock", purpose=f"temporary folder of run {run_id}")
    lock.acquire()
    folder = root / run_id
    os.rename(staging, folder)
    lock.path = folder / ".lock"
    for other in root.iterdir():
        if other == folder or other.is_symlink() or not other.is_dir():
            continue
        if other.name.startswith("."):
            # a staging folder: stale only if its creator died before renaming it
            with contextlib.suppress(OSError):
                if time.time() - other.lstat().st_mtime > 3600:
                    shutil.rmtree(other, ignore_errors=True)
            continue
        probe = FileLock(other / ".lock")
        try:
            probe.acquire()
        except (LockHeldError, OSError):
            continue  # a live run's folder (or not ours to judge)
        probe.release()
        shutil.rmtree(other, ignore_errors=True)
        LOGGER.info("removed the temporary folder %s of a run that ended without cleaning up",
                    other)
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "TEMP", "TMP", "MPLCONFIGDIR")}
    for key in ("TMPDIR", "TEMP", "TMP"):
        os.environ[key] = str(folder)
    # matplotlib (the reports) would otherwise write its config and font cache into HOME;
    # in the work dir the font cache is kept from one run to the next.
    mpl_dir = Path(work_dir) / "cache" / "matplotlib"
    mpl_dir.mkdir(parents=True, exist_ok=True)
    os.environ["MPLCONFIGDIR"] = str(mpl_dir)
    tempfile.tempdir = None  # tempfile caches its choice: forget it
    try:
        yield folder
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None
        lock.release()
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty: other runs may be using theirs


# ---------------------------------------------------------------------------- crash dumps


def write_crash_dump(text: str, folders: Iterable[Path], tag: str = "") -> Path | None:
    """Write an internal error's details to a new file in the first usable folder.

    The name is unpredictable (a random part) and the file is created exclusively, mode 0600,
    without following symlinks, so nothing planted in advance can redirect it. Without a usable
    folder, a ``tempfile.mkstemp`` file (same guarantees) in ``TMPDIR`` is the last resort.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name_tag = re.sub(r"[^A-Za-z0-9_-]", "", tag)[:40]
    data = text.encode("utf-8", "backslashreplace")
    for folder in folders:
        folder = Path(folder)
        for _ in range(3):
            path = folder / f"crash-{stamp}{'-' + name_tag if name_tag else ''}-{os.getpid()}-" \
                            f"{uuid.uuid4().hex[:12]}.txt"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError:
                break
            try:
                os.write(fd, data)
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()
                break
            os.close(fd)
            return path
    try:
        fd, name = tempfile.mkstemp(prefix="qmri-bids-crash-", suffix=".txt")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return Path(name)
    except OSError:
        return None


# -------------------------------------------------------------------------- work directory


def check_work_dir_private(work_dir: Path) -> str | None:
    """A warning when users other than this one can write into the work dir.

    Nipype loads (unpickles) the result files of a work dir when a run resumes: a file planted
    there runs code as the user. None when the folder is private enough.
    """
    try:
        st = os.stat(work_dir)
    except OSError:
        return None
    others_write = st.st_mode & (stat.S_IWOTH | stat.S_IWGRP)
    if st.st_uid != os.getuid() and os.getuid() != 0:
        return (f"--work-dir {work_dir} belongs to another user (uid {st.st_uid}); the work dir "
                "is trusted (Nipype loads its pickled results on resume): use your own folder")
    if others_write and not st.st_mode & stat.S_ISVTX:
        who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
        return (f"--work-dir {work_dir} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}); "
                "the work dir is trusted (Nipype loads its pickled results on resume), so "
                f"restrict it, e.g. chmod 700 {work_dir}")
    return None


# Hidden temporary files of qmri_bids.artifacts.atomic_write (``.<name>.<8 random>.tmp``, and
# the ``.nii[.gz]`` name nibabel writes beside it): what a killed writer leaves behind.
_PARTIAL = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.nii(\.gz)?)?$")


def remove_partial_files(folder: Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete leftover temporary files of interrupted atomic writes below ``folder``; only call
    it while holding the folder's lock (nobody else is writing there). Returns what was removed.
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    now = time.time()
    for root, dirs, files in os.walk(folder):
        for name in files:
            if not _PARTIAL.match(name):
                continue
            path = Path(root) / name
            try:
                if now - path.lstat().st_mtime >= older_than_s:
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
    return removed
