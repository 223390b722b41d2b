"""The run configuration: everything the CLI decided, in one serialisable object.

The CLI builds a ``RunConfig``, checks it (paths, resources, device), and hands it to discovery
and the workflow factories; it is saved as JSON beside each participant's logs so a run can be
audited and repeated.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qmri_bids import __version__

BIAS_METHODS = ("cnn", "n4", "both")


def make_run_id() -> str:
    """Sortable, unique id of one invocation (``20261121-151515_1a2b3c4d``)."""
    now = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{now}_{uuid.uuid4().hex[:8]}"


@dataclass
class RunConfig:
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_labels: list[str] | None = None
    session_labels: list[str] | None = None
    bids_filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float = 4.0
    device: str = "cpu"
    device_reason: str = ""
    bias_methods: tuple[str, ...] = ("cnn",)
    qmri_estimators: tuple[str, ...] = ("nn",)
    model_dir: Path | None = None
    skip_bids_validation: bool = False
    stop_on_first_crash: bool = False
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    write_graph: bool = False
    verbose: int = 0
    run_id: str = field(default_factory=make_run_id)
    version: str = __version__

    def __post_init__(self) -> None:
        if self.model_dir is None:
            self.model_dir = self.work_dir / "models"

    @property
    def use_gpu(self) -> bool:
        return self.device == "cuda"

    def log_dir(self, subject: str) -> Path:
        return self.output_dir / f"sub-{subject}" / "log" / self.run_id

    def to_json(self) -> str:
        def conv(obj: Any) -> Any:
            if isinstance(obj, Path):
                return str(obj)
            if isinstance(obj, tuple):
                return list(obj)
            raise TypeError(type(obj).__name__)

        payload = asdict(self)
        payload["environment"] = {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "NIPYPE_NO_ET", "CUDA_VISIBLE_DEVICES")
            if k in os.environ
        }
        return json.dumps(payload, indent=2, default=conv) + "\n"


def version_tag() -> str:
    """``0_1``: major.minor, used in the top workflow name so versions never share a cache."""
    major, minor = __version__.split(".")[:2]
    return f"{major}_{minor}"
