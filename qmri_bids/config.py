"""The run configuration: everything the CLI decided, in one serialisable object.

The CLI builds a ``RunConfig``, checks it (paths, resources, device), and hands it to discovery
and the workflow factories; it is saved as JSON beside each participant's logs so a run can be
audited and repeated (:meth:`RunConfig.from_json` reads it back).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import types
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from qmri_bids import __version__
from qmri_bids.errors import UsageError

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
    clean_workdir: bool = False
    resource_monitor: bool = False
    roi_dseg: Path | None = None
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

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """The configuration :meth:`to_json` wrote (paths and tuples restored; the recorded
        ``environment`` is information, not configuration, and is ignored). A key this version
        does not know, or a missing required one, is a UsageError naming it."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"configuration is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise UsageError("configuration must be a JSON object")
        payload.pop("environment", None)
        hints = get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - names)
        if unknown:
            raise UsageError(f"unknown configuration key(s) {unknown}")
        try:
            return cls(**{k: _restore(hints[k], v) for k, v in payload.items()})
        except TypeError as exc:  # a required field is missing
            raise UsageError(f"incomplete configuration: {exc}") from exc


def _restore(hint: Any, value: Any) -> Any:
    """A JSON value back into the field's type: ``Path`` (or ``Path | None``), ``tuple[...]``."""
    if value is None:
        return None
    options = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if Path in options:
        return Path(value)
    if any(get_origin(o) is tuple for o in options):
        return tuple(value)
    return value


def version_tag() -> str:
    """``0_1``: major.minor, used in the top workflow name so versions never share a cache."""
    major, minor = __version__.split(".")[:2]
    return f"{major}_{minor}"
