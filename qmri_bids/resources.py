"""CPU, memory and Nipype plugin settings (``--nprocs``, ``--omp-nthreads``, ``--mem``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qmri_bids.errors import UsageError


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def total_memory_gb() -> float:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages / 1024**3
    except (ValueError, OSError, AttributeError):
        return 8.0


def default_resources(nprocs: int | None, omp: int | None, mem_gb: float | None
                      ) -> tuple[int, int, float]:
    nprocs = nprocs or available_cpus()
    omp = omp or min(8, nprocs)
    if omp > nprocs:
        raise UsageError(f"--omp-nthreads {omp} exceeds --nprocs {nprocs}")
    mem_gb = mem_gb or round(0.9 * total_memory_gb(), 1)
    return nprocs, omp, mem_gb


def read_plugin_file(path: Path) -> tuple[str, dict[str, Any]]:
    """A Nipype plugin YAML: ``plugin: MultiProc`` and ``plugin_args: {n_procs: 8, ...}``."""
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"--use-plugin {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"--use-plugin {path} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict) or "plugin" not in spec:
        raise UsageError(f"--use-plugin {path} must hold a mapping with a 'plugin' key")
    args = spec.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError(f"--use-plugin {path}: plugin_args must be a mapping")
    return str(spec["plugin"]), args
