"""The project's one inter-process lock: a lock file with its owner written inside.

Used for a participant's output and work folders (:mod:`qmri_bids.cli.run`) and meant for any
other "one process at a time" resource, such as training one protocol into the model cache.

Mutual exclusion comes from ``flock(2)`` on the open lock file: the kernel drops the lock when
its holder dies, however it dies (kill -9, OOM killer), so a dead process can never keep a
resource locked. The file also holds a JSON record of the holder (pid, host, start time,
command, purpose) so that a refusal can say *who* holds the lock, and a new holder can report
that it took over from a process that died without cleaning up. The file is removed when the
lock is released; a holder checks after locking that the path still names the file it locked
(otherwise it raced with a release and tries again).

Where ``flock`` is not supported (some network file systems answer ``ENOLCK``), the lock falls
back to creating the file exclusively (``O_EXCL``); a file left by a dead process is then
detected from its record (same host, pid gone or reused) and taken over.

API::

    with file_lock(path, timeout_s=0, purpose="sub-01 output") as owner: ...
    lock = FileLock(path, timeout_s=3600, poll_s=0.5, purpose="training X"); lock.acquire();
    lock.release()
    read_owner(path) -> LockOwner | None

A lock that stays busy past ``timeout_s`` raises :class:`LockHeldError` (a ``TimeoutError``)
whose ``owner`` is the holder's record and whose message names the path and the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

LOGGER = logging.getLogger("qmri_bids.locks")

#: errors that mean "this file system does not do flock", not "the lock is busy"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
#: largest lock record read back: a planted huge file must not be loaded into memory
_MAX_RECORD = 64 * 1024


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart;
    None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie has exited: it holds nothing any more
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rfind(")") + 2:].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a lock, as written in the lock file."""

    pid: int
    host: str
    started: float  # time.time() when the lock was taken
    command: str = ""
    purpose: str = ""
    process_start: str | None = None  # /proc start time of pid, to detect pid reuse
    token: str = ""  # unique per acquisition

    @classmethod
    def me(cls, purpose: str) -> LockOwner:
        return cls(pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                   command=" ".join(sys.argv)[:500], purpose=purpose,
                   process_start=_process_start(os.getpid()), token=uuid.uuid4().hex)

    def alive(self) -> bool | None:
        """Whether the holder still runs: None when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        if not _pid_alive(self.pid):
            return False
        start = _process_start(self.pid)
        return not (self.process_start and start and start != self.process_start)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        what = f" ({self.purpose})" if self.purpose else ""
        return f"pid {self.pid} on {self.host} since {since}{what}"

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"


class LockHeldError(TimeoutError):
    """The lock stayed busy for longer than the caller was willing to wait."""

    def __init__(self, path: Path, owner: LockOwner | None, waited_s: float):
        self.path = Path(path)
        self.owner = owner
        self.waited_s = waited_s
        who = owner.describe() if owner else "another process"
        wait = f" after waiting {waited_s:.0f} s" if waited_s >= 1 else ""
        super().__init__(f"{path} is locked by {who}{wait}")


def read_owner(path: str | Path) -> LockOwner | None:
    """The record in a lock file; None when absent, empty or not a record (never raises)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        raw = os.read(fd, _MAX_RECORD)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _parse_owner(raw)


def _parse_owner(raw: bytes) -> LockOwner | None:
    try:
        data = json.loads(raw.decode("utf-8"))
        return LockOwner(pid=int(data["pid"]), host=str(data["host"]),
                         started=float(data["started"]), command=str(data.get("command", "")),
                         purpose=str(data.get("purpose", "")),
                         process_start=data.get("process_start"),
                         token=str(data.get("token", "")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
        return None


class FileLock:
    """An exclusive lock on ``path`` (see the module docstring). Not re-entrant."""

    def __init__(self, path: str | Path, *, timeout_s: float = 0.0, poll_s: float = 0.5,
                 purpose: str = ""):
        self.path = Path(path)
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)
        self.purpose = purpose
        self.owner: LockOwner | None = None
        self.took_over: LockOwner | None = None  # the dead holder this lock replaced, if any
        self._fd: int | None = None
        self._exclusive_file = False  # True in the O_EXCL fallback

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> LockOwner:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this lock is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        unknown = 0
        while True:
            holder = self._try_once()
            if holder is None:
                assert self.owner is not None
                return self.owner
            if holder is True and unknown < 5:
                # A release or a creation raced with us: look again at once.
                unknown += 1
                time.sleep(0.01)
                continue
            waited = time.monotonic() - t0
            if waited >= self.timeout_s:
                raise LockHeldError(self.path, holder if isinstance(holder, LockOwner) else None,
                                    waited)
            unknown = 0
            time.sleep(min(self.poll_s, max(0.01, self.timeout_s - waited)))

    def _try_once(self) -> LockOwner | bool | None:
        """None: acquired; otherwise the current holder (or True when it is unknown)."""
        if self._exclusive_file:
            return self._try_exclusive()
        # O_NOFOLLOW: a symlink planted at the lock path is refused, not followed.
        created = False
        try:
            fd = os.open(self.path, _CREATE, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, _OPEN)
            except FileNotFoundError:
                return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_owner(_read_fd(fd)) or True
            os.close(fd)
            return holder
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_FLOCK:
                raise
            if created:
                self.path.unlink(missing_ok=True)
            LOGGER.debug("%s: no flock on this file system (%s); using exclusive creation",
                         self.path, exc.strerror)
            self._exclusive_file = True
            return self._try_exclusive()
        # Locked; but the holder before us may have removed the file just before we locked
        # our descriptor of it: then we hold a lock on a file nobody else can find. Retry.
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return True
        previous = _parse_owner(_read_fd(fd))
        if previous is not None and previous.token:
            # A record without a live flock: its process ended without releasing (killed).
            self._took_over(previous)
        self._write_record(fd)
        self._fd = fd
        return None

    def _took_over(self, previous: LockOwner) -> None:
        self.took_over = previous
        LOGGER.warning("%s: taking over the lock left by %s, which is no longer running",
                       self.path, previous.describe())

    def _write_record(self, fd: int) -> None:
        self.owner = LockOwner.me(self.purpose)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.owner.to_json().encode(), 0)

    # ------------------------------------------------------------ O_EXCL fallback (no flock)
    def _try_exclusive(self) -> LockOwner | bool | None:
        try:
            fd = os.open(self.path, _CREATE, 0o644)
        except FileExistsError:
            pass
        else:
            self._write_record(fd)
            self._fd = fd
            return None
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return True
        holder = read_owner(self.path)
        if holder is None and time.time() - st.st_mtime < 5:
            return True  # its creator is about to write the record
        if holder is not None and holder.alive() is not False:
            return holder
        # Stale (a dead holder, or an unreadable record older than a few seconds): move it
        # aside atomically; only one contender's rename can succeed.
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        moved = read_owner(aside)
        if (moved.token if moved else None) != (holder.token if holder else None):
            # Between our look and our rename the stale file was replaced by a live lock: put
            # it back (link fails if yet another one appeared; then that one stands).
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return moved or True
        aside.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, _CREATE, 0o644)
        except FileExistsError:
            return read_owner(self.path) or True
        if holder is not None:
            self._took_over(holder)
        self._write_record(fd)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Remove the file while still holding the lock, and only if it is still ours.
            current = read_owner(self.path)
            if current is not None and self.owner is not None and \
                    current.token == self.owner.token:
                self.path.unlink(missing_ok=True)
        finally:
            if not self._exclusive_file:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> LockOwner:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, _MAX_RECORD, 0)
    except OSError:
        return b""


@contextlib.contextmanager
def file_lock(path: str | Path, *, timeout_s: float = 0.0, poll_s: float = 0.5,
              purpose: str = "") -> Iterator[LockOwner]:
    """``with file_lock(path): ...`` — hold :class:`FileLock` ``path`` for the block."""
    lock = FileLock(path, timeout_s=timeout_s, poll_s=poll_s, purpose=purpose)
    owner = lock.acquire()
    try:
        yield owner
    finally:
        lock.release()
