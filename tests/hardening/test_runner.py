"""The supervised MultiProc plugin and the signal handling (qmri_bids.runner), on tiny Nipype
workflows of function nodes: a worker killed by SIGKILL (what the out-of-memory killer does),
a node out of memory, a result file that cannot be written (a full work dir) all end the run
quickly with the node named, instead of hanging; workers die with their parent."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qmri_bids.config import RunConfig
from qmri_bids.errors import EXIT_CANNOT_WRITE, EXIT_NODE_FAILED
from qmri_bids.runner import RunInterrupted, SupervisedMultiProcPlugin, interrupt_on_signals

from ._procs import alive, wait_for


def _killed_by_oom() -> int:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def _out_of_memory() -> int:
    raise MemoryError("cannot allocate 64 GiB")


def _fine() -> int:
    return 42


def _workflow(base: Path, nodes: dict):
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name="wf", base_dir=str(base))
    # Crash files go under the test's folder, never into the working directory.
    wf.config["execution"] = {"crashdump_dir": str(base / "crash"), "crashfile_format": "txt"}
    for name, (func, mem_gb) in nodes.items():
        wf.add_nodes([pe.Node(Function(function=func, input_names=[], output_names=["out"]),
                              name=name, mem_gb=mem_gb)])
    return wf


def _run(wf, plugin, timeout_s: float = 90.0) -> float:
    """Run; the plugin must end the run with an error (never hang). Returns the seconds."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        wf.run(plugin=plugin)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout_s
    return elapsed


def _config(tmp_path) -> RunConfig:
    return RunConfig(bids_dir=tmp_path / "ds", output_dir=tmp_path / "out",
                     analysis_level="participant", work_dir=tmp_path, nprocs=2, mem_gb=4.0)


def test_worker_killed_by_sigkill_fails_its_node_and_the_rest_runs(tmp_path):
    from qmri_bids.cli.run import _failure_error, _failures

    wf = _workflow(tmp_path, {"hog": (_killed_by_oom, 3.0), "fine": (_fine, 0.1)})
    plugin = SupervisedMultiProcPlugin({"n_procs": 1, "memory_gb": 4.0,
                                        "raise_insufficient": False})
    _run(wf, plugin)
    (failure,) = plugin.failures
    assert failure.name == "hog" and failure.mem_gb == 3.0
    assert "SIGKILL" in failure.traceback
    # the node after it ran in new workers
    assert list((tmp_path / "wf" / "fine").glob("result_fine.pklz"))
    error = _failure_error(_failures(plugin, _config(tmp_path), []), _config(tmp_path),
                           RuntimeError())
    text = str(error)
    assert error.exit_code == EXIT_NODE_FAILED
    assert "node wf.hog" in text and "3.0 GB" in text and "SIGKILL" in text
    assert "--mem" in text and "--nprocs" in text


def test_memory_error_names_node_memory_and_options(tmp_path):
    from qmri_bids.cli.run import _failure_error, _failures

    wf = _workflow(tmp_path, {"big": (_out_of_memory, 2.5)})
    plugin = SupervisedMultiProcPlugin({"n_procs": 1, "memory_gb": 4.0})
    _run(wf, plugin)
    config = _config(tmp_path)
    text = str(_failure_error(_failures(plugin, config, []), config, RuntimeError()))
    assert "node wf.big ran out of memory" in text and "asked for 2.5 GB" in text
    assert "4.0 GB in total" in text and "--mem" in text and "--nprocs 1" in text


def test_result_file_that_cannot_be_written_ends_the_run(tmp_path, monkeypatch):
    """A full work dir: the worker cannot save the node's result file, and Nipype's own
    callback re-raises in a thread and waits forever; here it is the node's failure, and the
    CLI turns it into exit 73 naming the work dir."""
    from nipype.pipeline.engine import nodes

    from qmri_bids.cli import run as cli_run
    from qmri_bids.cli.run import _failure_error, _failures

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Patched before the pool forks its workers, so they inherit it.
    monkeypatch.setattr(nodes, "_save_resultfile", full)
    wf = _workflow(tmp_path, {"cnn": (_fine, 0.1)})
    plugin = SupervisedMultiProcPlugin({"n_procs": 1, "memory_gb": 4.0})
    assert _run(wf, plugin, timeout_s=60) < 60
    config = _config(tmp_path)
    monkeypatch.setattr(cli_run, "_RUN_FOLDERS", [tmp_path])
    error = _failure_error(_failures(plugin, config, []), config, RuntimeError())
    assert error.exit_code == EXIT_CANNOT_WRITE
    assert str(error).startswith(f"no space left on {tmp_path}")


def test_unwritable_crash_folder_is_not_fatal(tmp_path):
    """The crash file goes to the output folder; on a full disk it cannot be written, and the
    failure must still be known."""
    wf = _workflow(tmp_path, {"big": (_out_of_memory, 1.0)})
    blocker = tmp_path / "file"
    blocker.write_text("a file, so no folder can be made below it\n")
    for node in wf._get_all_nodes():
        node.config = {"execution": {"crashdump_dir": str(blocker / "crash"),
                                     "crashfile_format": "txt"}}
    plugin = SupervisedMultiProcPlugin({"n_procs": 1, "memory_gb": 4.0})
    _run(wf, plugin)
    (failure,) = plugin.failures
    assert failure.crash_file is None and "MemoryError" in failure.traceback


WORKER_PARENT = textwrap.dedent("""
    import os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from qmri_bids.runner import init_worker
    pool = ProcessPoolExecutor(2, initializer=init_worker, initargs=(os.getcwd(), os.getpid()))
    futures = [pool.submit(time.sleep, 60) for _ in range(2)]
    time.sleep(0.5)
    print(" ".join(str(p) for p in pool._processes), flush=True)
    time.sleep(60)
""")


def test_workers_die_with_their_parent(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WORKER_PARENT], stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(alive(p) for p in workers)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: not any(alive(p) for p in workers), 5.0), \
        f"workers {workers} still alive 5 s after kill -9 of their parent"


def test_stop_workers_ends_busy_workers(tmp_path):
    plugin = SupervisedMultiProcPlugin({"n_procs": 2, "memory_gb": 4.0})
    futures = [plugin.pool.submit(time.sleep, 60) for _ in range(2)]
    plugin._workers.update(plugin.pool._processes)
    pids = list(plugin._workers)
    assert wait_for(lambda: all(alive(p) for p in pids), 5)
    t0 = time.monotonic()
    plugin.stop_workers()
    assert time.monotonic() - t0 < 10
    assert not any(alive(p) for p in pids)
    assert all(f.done() for f in futures)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_raise_run_interrupted(sig, code):
    before = signal.getsignal(sig)
    with pytest.raises(RunInterrupted) as info, interrupt_on_signals():
        os.kill(os.getpid(), sig)
        time.sleep(5)
    assert info.value.exit_code == code and info.value.signum == sig
    assert signal.getsignal(sig) is before  # handlers restored


def test_second_signal_while_stopping_is_ignored():
    with pytest.raises(RunInterrupted), interrupt_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # cleanup is not interrupted
            time.sleep(0.1)
