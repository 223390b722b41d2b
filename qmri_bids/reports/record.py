"""The run record: what a participant-level run found, planned, ran and how long it took.

The reports read the derivatives folder and this record, nothing else (no work dir, no Nipype
result files), so they can be rebuilt from an output folder alone (``--reports-only``). One
record is written per participant (and session) and run, as
``sub-<label>/log/<run-id>/run_record[_ses-<label>].json``; ``sub-*/log`` is in ``.bidsignore``.

Writing one is four calls in the CLI (see :func:`new_run_record`, :class:`NodeTimer`,
:func:`finish_run_record`, :func:`write_run_record`). The schema is the dataclasses below,
serialised with :func:`dataclasses.asdict`; :data:`RUN_RECORD_VERSION` changes when a field is
renamed or removed (new optional fields keep it), and :func:`read_run_record` refuses another
major version with a message instead of guessing.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

#: schema version of the run record (major.minor; readers accept the same major)
RUN_RECORD_VERSION = "1.0"
RUN_RECORD_NAME = "run_record"

#: distributions whose versions the methods text and the summary report
SOFTWARE = ("qmri-bids", "nipype", "pybids", "torch", "numpy", "scipy", "nibabel", "SimpleITK")

STEP_STATUSES = ("planned", "skipped")
NODE_STATUSES = ("running", "done", "failed", "cached")
RUN_STATUSES = ("running", "finished", "failed", "interrupted", "submitted")


@dataclass
class Step:
    """One processing step planned for an input, or skipped with the reason.

    ``name``: ``bias-cnn``, ``bias-n4``, ``train`` (network trained on demand), ``nn``,
    ``nlls``, ``dict`` or ``closed-form`` (:mod:`qmri_bids.qmri.estimators` names).
    ``detail``: what the methods text and the report show about it (network file and sha256,
    validation efficiency of the network, bias model name...).
    """

    name: str
    status: str = "planned"
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class InputRecord:
    """One anatomical image (``kind="anat"``) or qMRI collection (``kind="collection"``).

    ``workflow``/``sink_workflow``: names of its processing and derivative-sink sub-workflows
    (the nodes whose full name contains ``.<name>.`` belong to it); ``files``: raw files
    (collection members in model order);
    ``excluded``: (file name, reason) of members left out of the fit.
    """

    kind: str
    label: str
    suffix: str
    files: list[str]
    workflow: str | None = None
    sink_workflow: str | None = None
    steps: list[Step] = field(default_factory=list)
    b1map: str | None = None
    excluded: list[list[str]] = field(default_factory=list)
    model: str | None = None


@dataclass
class SkippedInput:
    """An input discovery or the checks left out (``unusable``: a problem of the data)."""

    what: str
    path: str | None
    reason: str
    unusable: bool = True


@dataclass
class NodeRecord:
    """One Nipype node: wall-clock times from the status callback (seconds since the epoch),
    ``duration_s`` the interface's own run time when Nipype reported it, and the memory it
    asked for and (with the resource monitor) used."""

    name: str
    status: str = "running"
    started: float | None = None
    finished: float | None = None
    duration_s: float | None = None
    mem_gb: float | None = None
    peak_mem_gb: float | None = None


@dataclass
class CrashRecord:
    """A node that failed: its name, the last error line, and its crash file (if written)."""

    node: str
    message: str
    path: str | None = None


@dataclass
class RunRecord:
    """Everything the participant report needs besides the derivatives (see module doc)."""

    run_id: str
    subject: str
    session: str | None = None
    status: str = "running"
    exit_code: int | None = None
    started: str = ""
    finished: str | None = None
    command: list[str] = field(default_factory=list)
    bids_dir: str = ""
    output_dir: str = ""
    software: dict[str, str] = field(default_factory=dict)
    python: str = ""
    device: str = ""
    device_reason: str = ""
    hardware: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputRecord] = field(default_factory=list)
    skipped: list[SkippedInput] = field(default_factory=list)
    nodes: list[NodeRecord] = field(default_factory=list)
    crashes: list[CrashRecord] = field(default_factory=list)
    schema_version: str = RUN_RECORD_VERSION

    @property
    def participant(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    def nodes_of(self, item: InputRecord) -> list[NodeRecord]:
        """The nodes of one input's sub-workflows (by name, see :class:`InputRecord`)."""
        keys = [f".{w}." for w in (item.workflow, item.sink_workflow) if w]
        return [n for n in self.nodes if any(k in f".{n.name}." for k in keys)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RunRecord:
        version = str(payload.get("schema_version", ""))
        if version.split(".")[0] != RUN_RECORD_VERSION.split(".")[0]:
            raise ValueError(f"run record schema {version or '(none)'} is not readable by this "
                             f"version (reads {RUN_RECORD_VERSION.split('.')[0]}.x)")
        data = _known(cls, payload)
        data["inputs"] = [InputRecord(**{**_known(InputRecord, i),
                                         "steps": [Step(**_known(Step, s))
                                                   for s in i.get("steps", [])]})
                          for i in payload.get("inputs", [])]
        data["skipped"] = [SkippedInput(**_known(SkippedInput, s))
                           for s in payload.get("skipped", [])]
        data["nodes"] = [NodeRecord(**_known(NodeRecord, n)) for n in payload.get("nodes", [])]
        data["crashes"] = [CrashRecord(**_known(CrashRecord, c))
                           for c in payload.get("crashes", [])]
        return cls(**data)


def _known(cls: type, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``payload`` that ``cls`` has: a newer minor version's extra fields are
    dropped, not an error."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in payload.items() if k in names}


# ------------------------------------------------------------------------------ building


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    """Installed versions of :data:`SOFTWARE` (``"not installed"`` for a missing one)."""
    out = {}
    for dist in SOFTWARE:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def anat_workflow_names(index: int, suffix: str) -> tuple[str, str]:
    """Names of the bias and sink sub-workflows of the ``index``-th anatomical image; the
    same rule as ``qmri_bids.workflows.base.init_single_subject_wf`` (a test builds that
    workflow and checks they agree)."""
    return f"anat_{index:02d}_{suffix}_bias_wf", f"ds_anat_{index:02d}_{suffix}_wf"


def collection_workflow_names(index: int, suffix: str) -> tuple[str, str]:
    """Names of the mapping and sink sub-workflows of the ``index``-th collection."""
    return f"qmri_{index:02d}_{suffix}_wf", f"ds_qmri_{index:02d}_{suffix}_wf"


_ESTIMATOR_STEP = {"closed_form": "closed-form", "closed-form": "closed-form"}


def _network_detail(network: Any) -> dict[str, Any]:
    """What the report shows of a plan's network: its file, sha256, whether it is trained on
    demand, and the validation its model card records (read from the card beside it)."""
    if network is None:
        return {}
    detail: dict[str, Any] = {"network": network.stem, "model": network.model_name,
                              "train_on_demand": bool(network.train_on_demand)}
    if network.weights is not None:
        weights = Path(network.weights)
        detail["weights"] = str(weights)
        detail["sha256"] = network.sha256
        detail["shipped"] = "models" in weights.parts and "qmri_bids" in weights.parts
        card = weights.with_suffix(".json")
        try:
            payload = json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            payload = {}
        if isinstance(payload.get("validation"), dict):
            detail["validation"] = payload["validation"]
        for key in ("loss", "snr_range", "created"):
            if key in payload:
                detail[key] = payload[key]
    return detail


def new_run_record(config: Any, inputs: Any, *, command: Iterable[str] | None = None,
                   requested_estimators: Iterable[str] | None = None) -> RunRecord:
    """The record of one participant (a discovery ``SubjectInputs``) at the start of a run.

    ``config``: the run's ``RunConfig``. Every anatomical image gets one step per bias method;
    every collection one step per planned estimator (and ``train`` when its network is
    trained on demand), and one ``skipped`` step, with the reason, per requested estimator
    that the collection's model does not have. Inputs that discovery or the checks skipped
    are listed with their reasons. Nothing is read but the model cards beside the networks.
    """
    from qmri_bids.qmri.models import model_class

    requested = tuple(requested_estimators if requested_estimators is not None
                      else getattr(config, "qmri_estimators", ("nn",)))
    record = RunRecord(
        run_id=str(config.run_id), subject=str(inputs.subject), session=inputs.session,
        started=now_iso(), command=list(command if command is not None else sys.argv),
        bids_dir=str(config.bids_dir), output_dir=str(config.output_dir),
        software=software_versions(), python=sys.version.split()[0],
        device=str(config.device), device_reason=str(getattr(config, "device_reason", "")),
        hardware=_hardware(str(config.device)),
        settings={"bias_methods": list(config.bias_methods),
                  "qmri_estimators": list(requested),
                  "nprocs": getattr(config, "nprocs", None),
                  "omp_nthreads": getattr(config, "omp_nthreads", None),
                  "mem_gb": getattr(config, "mem_gb", None),
                  "plugin": getattr(config, "plugin", None)},
    )
    bias_model = _bias_model_detail() if "cnn" in config.bias_methods else {}
    for index, anat in enumerate(inputs.anat):
        workflow, sink = anat_workflow_names(index, anat.suffix)
        record.inputs.append(InputRecord(
            kind="anat", label=Path(anat.path).name, suffix=anat.suffix,
            files=[str(anat.path)], workflow=workflow, sink_workflow=sink,
            steps=[Step(f"bias-{m}", detail=dict(bias_model) if m == "cnn" else {})
                   for m in config.bias_methods]))
    for index, col in enumerate(inputs.collections):
        plan = col.plan
        steps: list[Step] = []
        model_name = None
        if plan is not None:
            model_name = plan.model_name
            if plan.network is not None and plan.network.train_on_demand:
                steps.append(Step("train", detail=_network_detail(plan.network)))
            for name in plan.estimators:
                detail = _network_detail(plan.network) if name == "nn" else {}
                steps.append(Step(_ESTIMATOR_STEP.get(name, name), detail=detail))
            if not plan.closed_form:
                known = model_class(plan.model_name).estimators
                for name in dict.fromkeys(requested):
                    if name not in plan.estimators:
                        why = ("not an estimator of the {} model (it has {})"
                               .format(plan.model_name, ", ".join(known)))
                        steps.append(Step(name, status="skipped", reason=why))
        workflow, sink = collection_workflow_names(index, col.suffix)
        record.inputs.append(InputRecord(
            kind="collection", label=str(col.label), suffix=col.suffix,
            files=[str(m) for m in (plan.members if plan is not None else
                                    [m.path for m in col.members])],
            workflow=workflow, sink_workflow=sink, steps=steps,
            b1map=str(col.b1map) if getattr(col, "b1map", None) else None,
            excluded=[list(e) for e in (plan.excluded if plan is not None else ())],
            model=model_name))
    for skip in inputs.skipped:
        record.skipped.append(SkippedInput(str(skip.what), None if skip.path is None
                                           else str(skip.path), str(skip.reason),
                                           bool(getattr(skip, "unusable", True))))
    return record


def _bias_model_detail() -> dict[str, Any]:
    """The shipped bias CNN: its name, sha256 and training steps, from its model card."""
    from qmri_bids.bias.weights import DEFAULT_MODEL

    card = Path(__file__).resolve().parents[1] / "models" / f"{DEFAULT_MODEL}.json"
    detail: dict[str, Any] = {"model": DEFAULT_MODEL}
    try:
        payload = json.loads(card.read_text())
    except (OSError, json.JSONDecodeError):
        return detail
    detail["sha256"] = payload.get("sha256")
    training = payload.get("training")
    if isinstance(training, dict) and "steps" in training:
        detail["training_steps"] = training["steps"]
    return detail


def _hardware(device: str) -> str:
    try:
        from qmri_bids.provenance import hardware_string

        return hardware_string(device)
    except Exception:  # noqa: BLE001 - information only: a record is written regardless
        return ""


# ------------------------------------------------------------------------------ timing


class NodeTimer:
    """A Nipype ``status_callback``: records when each node started and ended, and how.

    Pass it as ``plugin_args["status_callback"]`` (MultiProc, Linear, the cluster plugins);
    ``chain`` is called after it with the same node and status and a copy of the node's record
    (None for a MapNode's sub-node): the progress printer reads its status and duration from
    there. It is a plain callable, so this module does not import Nipype; it is called in the
    main process only.
    """

    def __init__(self, chain: Callable[[Any, str, NodeRecord | None], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.chain = chain
        self.clock = clock
        self._nodes: dict[str, NodeRecord] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A MapNode keeps the plugin arguments (this callback among them) and pickles itself
        # into its work folder: the copy must pickle, and need not keep recording.
        return {"chain": None, "clock": time.time, "_nodes": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, node: Any, status: str) -> None:
        name = str(getattr(node, "fullname", None) or getattr(node, "name", node))
        if name.startswith("_") and "." not in name:
            # A MapNode's sub-node (named _<node><i>, without its workflow path): the MapNode
            # itself is recorded.
            if self.chain is not None:
                self.chain(node, status, None)
            return
        now = self.clock()
        with self._lock:
            rec = self._nodes.get(name)
            if rec is None:
                rec = self._nodes[name] = NodeRecord(name, mem_gb=_float(getattr(node, "mem_gb",
                                                                                  None)))
            if status == "start":
                rec.started, rec.status = now, "running"
            elif status in ("end", "exception"):
                rec.finished = now
                # Nipype reports "end" without "start" for a cached node, and for a node run
                # in the main process (run_without_submitting, e.g. the derivative sinks).
                ran_here = bool(getattr(node, "run_without_submitting", False))
                rec.status = ("failed" if status == "exception" else
                              "done" if rec.started is not None or ran_here else "cached")
                runtime = _runtime(node) if status == "end" else None
                # A MapNode's runtime is the list of its sub-nodes' runtimes.
                runs = runtime if isinstance(runtime, list) else [runtime]
                durations = [getattr(r, "duration", None) for r in runs if r is not None]
                peaks = [getattr(r, "mem_peak_gb", None) for r in runs if r is not None]
                if durations and all(d is not None for d in durations):
                    rec.duration_s = _float(sum(durations))
                if any(p is not None for p in peaks):
                    rec.peak_mem_gb = _float(max(p for p in peaks if p is not None))
                if rec.duration_s is None and rec.started is not None:
                    rec.duration_s = round(now - rec.started, 3)
            copy = NodeRecord(**asdict(rec))
        if self.chain is not None:
            self.chain(node, status, copy)

    @property
    def records(self) -> list[NodeRecord]:
        with self._lock:
            return [NodeRecord(**asdict(r)) for r in self._nodes.values()]

    def records_for(self, workflow_prefix: str) -> list[NodeRecord]:
        """Records of the nodes inside ``workflow_prefix`` (e.g. a subject workflow name)."""
        key = f".{workflow_prefix}."
        return [r for r in self.records if key in f".{r.name}."]


def _float(value: Any) -> float | None:
    try:
        return None if value is None else round(float(value), 4)
    except (TypeError, ValueError):
        return None


def _runtime(node: Any) -> Any:
    """The interface runtime Nipype stored for a finished node (None when unavailable: the
    result file is read lazily and may be gone on a full disk)."""
    try:
        result = node.result
    except Exception:  # noqa: BLE001 - timing is best effort, the wall clock remains
        return None
    return getattr(result, "runtime", None)


# ------------------------------------------------------------------------------ crashes

_NODE_LINE = re.compile(r"^Node:\s*(\S+)", re.MULTILINE)


def last_error_line(text: str) -> str:
    """The line of a traceback that says what went wrong (``SomeError: message``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Interrupt", "WorkerDied")):
            return line
    return lines[-1] if lines else ""


def read_crash_file(path: Path) -> CrashRecord:
    """A Nipype text crash file: ``Node: <full name>`` on its first line, the traceback
    after it."""
    text = Path(path).read_text(errors="replace")
    match = _NODE_LINE.search(text)
    node = match.group(1) if match else Path(path).stem
    return CrashRecord(node=node, message=last_error_line(text), path=str(path))


def collect_crashes(log_dir: Path) -> list[CrashRecord]:
    """Every ``crash-*.txt`` in ``log_dir`` (a participant's ``log/<run-id>`` folder)."""
    return [read_crash_file(p) for p in sorted(Path(log_dir).glob("crash-*.txt"))]


def finish_run_record(record: RunRecord, *, status: str, exit_code: int,
                      nodes: Iterable[NodeRecord] = (), log_dir: Path | None = None,
                      failures: Iterable[Mapping[str, Any]] = ()) -> RunRecord:
    """Close ``record`` at the end of the run: status, exit code, end time, the node records
    of this participant, and the crashes: crash files in ``log_dir`` and ``failures`` (the
    plugin's records: ``fullname``, ``text``, ``crash_file``) for those that have none (a
    crash file cannot be written on a full disk)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r} (one of {RUN_STATUSES})")
    record.status, record.exit_code, record.finished = status, int(exit_code), now_iso()
    prefix = _subject_workflow(record)
    mine = [n for n in nodes if prefix is None or f".{prefix}." in f".{n.name}."]
    record.nodes = sorted(mine, key=lambda n: (n.started or n.finished or 0.0, n.name))
    crashes = collect_crashes(log_dir) if log_dir is not None else []
    seen = {c.node for c in crashes}
    for failure in failures:
        name = str(failure.get("fullname") or failure.get("node") or "?")
        if prefix is not None and f".{prefix}." not in f".{name}.":
            continue
        if name not in seen:
            crashes.append(CrashRecord(name, last_error_line(str(failure.get("text", ""))),
                                       failure.get("crash_file")))
            seen.add(name)
    record.crashes = crashes
    failed = {c.node for c in crashes}
    for node in record.nodes:
        if node.name in failed:
            node.status = "failed"
    return record


def _subject_workflow(record: RunRecord) -> str | None:
    """Name of the participant's workflow (``sub_<label>[_ses_<label>]_wf``, as
    ``qmri_bids.workflows.base.subject_wf_name``)."""
    ses = f"_ses_{record.session}" if record.session else ""
    return f"sub_{record.subject}{ses}_wf"


# ------------------------------------------------------------------------------ files


def run_record_path(output_dir: Path, subject: str, run_id: str,
                    session: str | None = None) -> Path:
    name = RUN_RECORD_NAME + (f"_ses-{session}" if session else "") + ".json"
    return Path(output_dir) / f"sub-{subject}" / "log" / run_id / name


def write_run_record(record: RunRecord, output_dir: Path | None = None) -> Path:
    """Write ``record`` (atomically) into the participant's log folder of its run."""
    from qmri_bids.artifacts import atomic_write_json

    out = Path(output_dir if output_dir is not None else record.output_dir)
    path = run_record_path(out, record.subject, record.run_id, record.session)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record.to_dict())
    return path


def read_run_record(path: Path) -> RunRecord:
    """The record at ``path``; ValueError naming the file when it is not one."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable run record ({exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: a run record is a JSON object")  # noqa: TRY004 - one type
    try:
        return RunRecord.from_dict(payload)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def find_run_records(output_dir: Path, subject: str, session: str | None = None) -> list[Path]:
    """The participant's run records, oldest run first (run ids sort by their start time)."""
    name = RUN_RECORD_NAME + (f"_ses-{session}" if session else "") + ".json"
    base = Path(output_dir) / f"sub-{subject}" / "log"
    return sorted(base.glob(f"*/{name}"), key=lambda p: p.parent.name)


def latest_run_record(output_dir: Path, subject: str,
                      session: str | None = None) -> RunRecord | None:
    """The newest readable record of the participant (None when it has none)."""
    for path in reversed(find_run_records(output_dir, subject, session)):
        try:
            return read_run_record(path)
        except ValueError:
            continue
    return None
