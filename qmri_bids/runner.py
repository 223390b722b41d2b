"""Running the Nipype workflow so that faults end cleanly: workers, signals, failures.

Nipype's MultiProc runs nodes in a ``concurrent.futures.ProcessPoolExecutor`` (forked workers,
``multiproc.process_initializer``). :class:`SupervisedMultiProcPlugin` is that plugin with:

* **workers that die with the main process**: each worker asks the kernel for ``SIGKILL`` when
  its parent dies (``prctl(PR_SET_PDEATHSIG)``, through ctypes; a watchdog thread polling the
  parent pid where prctl is unavailable), so ``kill -9`` of the main process leaves no worker;
* **no hang when a worker fails outside a node**: Nipype's callback re-raises a worker-level
  exception (a result file that cannot be written on a full disk, a worker killed by the
  out-of-memory killer) and then waits forever for a result; here the failure becomes the
  node's result, and a broken pool is replaced so the other nodes still run;
* **every failure recorded in memory** (:attr:`failures`), including when its crash file cannot
  be written (a full output disk);
* :meth:`stop_workers`, which ends the workers (SIGTERM, a grace period, then SIGKILL).

Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group; the main process
decides) and turn SIGTERM into an exception, so writes in progress remove their temporary
files, and exit at most :data:`WORKER_GRACE_S` later.

:func:`interrupt_on_signals` turns SIGTERM/SIGINT in the main process into
:class:`RunInterrupted` (exit 143/130).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer, run_node

LOGGER = logging.getLogger("qmri_bids.runner")

#: seconds a worker has, after SIGTERM, to clean up before it exits regardless
WORKER_GRACE_S = 3.0
_PR_SET_PDEATHSIG = 1


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT in the main process (BaseException: no ``except Exception`` in Nipype
    or a library may swallow it)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class WorkerStopped(BaseException):
    """SIGTERM inside a worker: unwinds the node so that ``finally`` blocks run."""


# --------------------------------------------------------------------------- worker side


def _die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` does (see the module docstring)."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="qmri-bids-parent-watch", daemon=True).start()
    # The parent may have died before the request above took effect.
    if os.getppid() != parent_pid:
        os._exit(1)


def kill_with_parent() -> None:
    """``preexec_fn`` of a child command (bids-validator): SIGKILL when qmri-bids dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL),
                                                    0, 0, 0)


_BUSY = False  # whether this worker is running a node


def _run_node(node, updatehash, taskid):
    """Nipype's ``run_node``, noting that the worker is busy (for the SIGTERM handler)."""
    global _BUSY
    _BUSY = True
    try:
        return run_node(node, updatehash, taskid)
    finally:
        _BUSY = False


def _worker_sigterm(signum: int, frame: Any) -> None:
    if not _BUSY:
        os._exit(128 + signum)  # idle: nothing to clean up
    timer = threading.Timer(WORKER_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough
    raise WorkerStopped(signum)


def init_worker(cwd: str, parent_pid: int) -> None:
    """The pool's initializer: Nipype's, plus the parent-death signal and signal handling."""
    process_initializer(cwd)
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


# ----------------------------------------------------------------------------- main side


@dataclass
class NodeFailure:
    """One node that did not finish, with what the CLI needs to explain it."""

    node: str  # full name (workflow path)
    name: str  # the node's own name
    mem_gb: float
    n_procs: int
    traceback: str
    crash_file: str | None = None


def _signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name} ({-code})"
    except ValueError:
        return f"signal {-code}"


class SupervisedMultiProcPlugin(MultiProcPlugin):
    """MultiProc with the guarantees listed in the module docstring."""

    def __init__(self, plugin_args: dict[str, Any] | None = None):
        super().__init__(plugin_args=plugin_args)
        # The parent's pool has started no process yet (they start at the first submit):
        # replace it by one whose workers are initialised as above.
        self.pool.shutdown(wait=False)
        self.pool = self._new_pool()
        self.failures: list[NodeFailure] = []
        self._nodes: dict[int, Any] = {}  # taskid -> node
        self._workers: dict[int, Any] = {}  # pid -> multiprocessing.Process, every pool's

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processors, initializer=init_worker,
            initargs=(self._cwd, os.getpid()),
            mp_context=mp.get_context(self.plugin_args.get("mp_context")))

    def _submit_job(self, node, updatehash=False):
        self._taskid += 1
        taskid = self._taskid
        if getattr(node.interface, "terminal_output", "") == "stream":
            node.interface.terminal_output = "allatonce"
        self._nodes[taskid] = node
        try:
            future = self.pool.submit(_run_node, node, updatehash, taskid)
        except BrokenProcessPool:
            LOGGER.warning("a worker process died: starting new workers for the other nodes")
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            future = self.pool.submit(_run_node, node, updatehash, taskid)
        self._workers.update(getattr(self.pool, "_processes", None) or {})
        future.add_done_callback(lambda f, t=taskid: self._done(f, t))
        self._task_obj[taskid] = future
        return taskid

    def _done(self, future, taskid: int) -> None:
        """Nipype's ``_async_callback``, except that a failed future is a failed node."""
        try:
            result = future.result()
        except BaseException as exc:  # noqa: BLE001 - any worker fault is this node's failure
            text = "".join(traceback.format_exception(exc))
            if isinstance(exc, BrokenProcessPool):
                text += "\n" + self._death_note(taskid)
            result = {"result": None, "traceback": [text], "taskid": taskid}
        self._taskresult[taskid] = result

    def _death_note(self, taskid: int) -> str:
        node = self._nodes.get(taskid)
        dead = [f"pid {pid}: {_signal_name(p.exitcode)}" for pid, p in self._workers.items()
                if p.exitcode not in (None, 0)]
        name = node.fullname if node is not None else f"task {taskid}"
        return (f"WorkerDied: the worker process running node {name} ended abruptly "
                f"({'; '.join(dead) or 'no exit status'}); a worker killed by SIGKILL was "
                "most often stopped by the system's out-of-memory killer")

    def _report_crash(self, node, result=None):
        tb = (result or {}).get("traceback")
        text = "".join(tb) if isinstance(tb, list) else str(tb or "")
        failure = NodeFailure(node=node.fullname, name=node.name, mem_gb=float(node.mem_gb),
                              n_procs=int(node.n_procs), traceback=text)
        self.failures.append(failure)
        try:
            failure.crash_file = super()._report_crash(node, result=result)
        except OSError as exc:
            # A full or read-only output disk: the failure is still known (self.failures).
            LOGGER.error("the crash file of node %s cannot be written: %s", node.fullname,
                         exc.strerror or exc)
        return failure.crash_file

    def stop_workers(self, grace_s: float = WORKER_GRACE_S + 1.0) -> None:
        """End every worker: cancel what has not started, SIGTERM the rest, SIGKILL after
        ``grace_s``."""
        with contextlib.suppress(Exception):
            self.pool.shutdown(wait=False, cancel_futures=True)
        workers = dict(self._workers)
        workers.update(getattr(self.pool, "_processes", None) or {})
        for proc in workers.values():
            with contextlib.suppress(Exception):
                if proc.is_alive():
                    proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in workers.values():
            with contextlib.suppress(Exception):
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in workers.values():
            with contextlib.suppress(Exception):
                if proc.is_alive():
                    proc.kill()
                    proc.join(1.0)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`RunInterrupted` in the main thread
    (once: a second signal while stopping is only noted); the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            LOGGER.warning("%s received while stopping: still stopping",
                           signal.Signals(signum).name)
            return
        fired.append(signum)
        raise RunInterrupted(signum)

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
