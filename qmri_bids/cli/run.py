"""Entry point: ``qmri-bids`` (BIDS App), ``qmri-bids demo`` and ``qmri-bids train``.

The flow is one way: arguments → ``RunConfig`` (checked) → participant locks → validation →
scan and discovery → header checks → pre-flight → workflow → execution → exit code. Every
user-caused failure is a ``QmriBidsError`` whose message names the file and the problem and whose
exit code follows the BIDS-Apps execution spec; resource faults (full or read-only disks, a
worker killed for memory, SIGTERM/SIGINT) end the same way (README: "Failures and trust
boundaries"). Only a bug of qmri-bids is an "internal error", whose details go to a new file in
the work dir (or ``<output>/logs``), never to a shared, predictable path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")  # before anything imports nipype: no telemetry

from qmri_bids import __version__
from qmri_bids.errors import (
    EXIT_NODE_FAILED,
    EXIT_OK,
    BadDataError,
    CannotWriteError,
    MissingInputError,
    NodeFailedError,
    NothingSelectedError,
    QmriBidsError,
    UsageError,
    ValidationError,
)
from qmri_bids.runner import RunInterrupted, interrupt_on_signals
from qmri_bids.safety import safe_text, write_crash_dump, write_error

LOGGER = logging.getLogger("qmri_bids")

# Set once the run's folders are known: where an internal error's details go, and which
# folders a write fault may be blamed on.
_DUMP_DIRS: list[Path] = []
_RUN_FOLDERS: list[Path] = []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _DUMP_DIRS.clear()
    _RUN_FOLDERS.clear()
    # ``qmri-bids demo out participant`` on a BIDS folder named "demo" is a BIDS-App call.
    app_call = len(argv) >= 3 and argv[2] in ("participant", "group") and Path(argv[0]).is_dir()
    if argv and argv[0] == "demo" and not app_call:
        from qmri_bids.demo.cli import demo_main

        return _guarded(lambda: demo_main(argv[1:]))
    if argv and argv[0] == "train" and not app_call:
        from qmri_bids.cli.train import train_main

        return _guarded(lambda: train_main(argv[1:]))
    from qmri_bids.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_file is not None:
        return _guarded(lambda: run_app(_with_saved_config(parser, argv, args.config_file)))
    return _guarded(lambda: run_app(args))


def _with_saved_config(parser, argv: list[str], path: Path):
    """``--config-file``: a saved ``config.json`` supplies the defaults (fMRIPrep style); the
    flags on this command line win. Positional arguments are always this command's."""
    from qmri_bids.config import RunConfig

    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise MissingInputError(f"--config-file {path}: cannot read it ({exc.strerror})") from exc
    try:
        saved = RunConfig.from_json(text)
    except UsageError as exc:
        raise UsageError(f"--config-file {path}: {exc}") from exc
    estimators = set(saved.qmri_estimators) - {"nn"}
    defaults = {
        "participant_label": saved.participant_labels,
        "session_label": saved.session_labels,
        "skip_bids_validation": saved.skip_bids_validation,
        "bias_method": "both" if len(saved.bias_methods) > 1 else saved.bias_methods[0],
        "qmri_estimator": ("all" if len(estimators) > 1 else
                           next(iter(estimators)) if estimators else "nn"),
        "model_dir": saved.model_dir, "device": saved.device, "work_dir": saved.work_dir,
        "nprocs": saved.nprocs, "omp_nthreads": saved.omp_nthreads, "mem_gb": saved.mem_gb,
        "stop_on_first_crash": saved.stop_on_first_crash, "write_graph": saved.write_graph,
        "verbose": saved.verbose, "clean_workdir": saved.clean_workdir,
        "resource_monitor": saved.resource_monitor, "roi_dseg": saved.roi_dseg,
    }
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.bids_filter_file is None and saved.bids_filters:
        args.saved_bids_filters = saved.bids_filters
    return args


def _error(message: str) -> None:
    print(f"qmri-bids: error: {safe_text(message)}", file=sys.stderr)


def _guarded(func: Callable[[], int | None]) -> int:
    try:
        with interrupt_on_signals():
            return int(func() or EXIT_OK)
    except QmriBidsError as exc:
        LOGGER.error("%s", exc) if LOGGER.handlers else None
        _error(str(exc))
        return exc.exit_code
    except RunInterrupted as exc:
        detail = getattr(exc, "detail", "")
        print(f"qmri-bids: {exc}" + (f"; {safe_text(detail)}" if detail else ""),
              file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # outside the signal handlers (e.g. a non-main thread)
        print("qmri-bids: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a fault or an internal error: say which
        fault = write_error(exc, _RUN_FOLDERS) if _RUN_FOLDERS else None
        if fault is not None:
            _error(str(fault))
            return fault.exit_code
        detail = traceback.format_exc()
        LOGGER.debug("%s", detail)
        crash = write_crash_dump(detail, _DUMP_DIRS, tag="internal")
        where = f"; details in {crash}" if crash else ""
        print(f"qmri-bids: internal error ({type(exc).__name__}: {safe_text(str(exc))}){where}. "
              "Please report it with the command you ran.", file=sys.stderr)
        return EXIT_NODE_FAILED


class _LogFile(logging.FileHandler):
    """The run's log file; when it cannot be written any more (a full or read-only work dir)
    it says so once and stops, instead of printing a logging traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        for name in ("qmri_bids", "nipype"):
            logging.getLogger(name).removeHandler(self)
        print(f"qmri-bids: warning: the log file {self.baseFilename} cannot be written any "
              f"more ({getattr(exc, 'strerror', None) or exc}); logging to the terminal only",
              file=sys.stderr)


def _setup_logging(verbose: int, log_file: Path | None = None) -> None:
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose < 2 else logging.DEBUG)
    root = logging.getLogger("qmri_bids")
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s | %(message)s",
                            "%y%m%d-%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace: a file name that is not UTF-8 must not break the log
        handler = _LogFile(log_file, encoding="utf-8", errors="backslashreplace")
        handler.setFormatter(fmt)
        handler.setLevel(logging.DEBUG)
        root.addHandler(handler)
    logging.getLogger("nipype.workflow").setLevel(logging.INFO if verbose else logging.WARNING)


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_dataset_description(bids_dir: Path) -> None:
    """Exit 16 unless ``dataset_description.json`` is a readable JSON object (checked whether or
    not bids-validator runs: it is what says that the folder is a BIDS dataset)."""
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise ValidationError(
            f"{bids_dir} is not a BIDS dataset: dataset_description.json is missing at its root"
        )
    try:
        value = json.loads(desc.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{desc} is not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{desc} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                              f"column {exc.colno}") from exc
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"{desc} is not usable JSON: {exc}") from exc
    except OSError as exc:
        raise ValidationError(f"{desc} cannot be read: {exc.strerror or exc}") from exc
    if not isinstance(value, dict):
        raise ValidationError(f"{desc} must hold a JSON object, not a {type(value).__name__}")


def build_config(args):
    """Check the arguments against the file system and turn them into a ``RunConfig``."""
    from qmri_bids.bids.discovery import load_filters, normalise_labels
    from qmri_bids.config import RunConfig
    from qmri_bids.device import select_device
    from qmri_bids.resources import default_resources, read_plugin_file

    bids_dir = args.bids_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        raise MissingInputError(f"bids_dir {args.bids_dir} does not exist or is not a folder")
    _check_dataset_description(bids_dir)
    output_dir = args.output_dir.expanduser().resolve()
    if output_dir == bids_dir or (
        _is_within(output_dir, bids_dir) and not _is_within(output_dir, bids_dir / "derivatives")
    ):
        raise UsageError(
            f"output_dir {output_dir} is inside bids_dir {bids_dir}: choose a folder outside it "
            "or under its derivatives/ folder"
        )
    work_dir = (args.work_dir or Path.cwd() / "work").expanduser().resolve()
    if work_dir == bids_dir or _is_within(work_dir, bids_dir):
        raise UsageError(f"--work-dir {work_dir} is inside bids_dir {bids_dir}: choose another")
    if _is_within(output_dir, work_dir) or _is_within(work_dir, output_dir):
        raise UsageError(f"--work-dir {work_dir} and output_dir {output_dir} must not contain "
                         "each other")
    model_dir = args.model_dir.expanduser().resolve() if args.model_dir else None
    if model_dir is not None:
        if model_dir.exists() and not model_dir.is_dir():
            raise UsageError(f"--model-dir {model_dir} is not a folder (it must be the folder of "
                             "the trained-estimator cache)")
        if model_dir == bids_dir or _is_within(model_dir, bids_dir):
            raise UsageError(f"--model-dir {model_dir} is inside bids_dir {bids_dir}: the input "
                             "dataset is never written to; choose another folder")

    nprocs, omp, mem_gb = default_resources(args.nprocs, args.omp_nthreads, args.mem_gb)
    device, device_reason = select_device(args.device)
    methods = ("cnn", "n4") if args.bias_method == "both" else (args.bias_method,)
    roi_dseg = args.roi_dseg.expanduser().resolve() if args.roi_dseg else None
    if roi_dseg is not None and not roi_dseg.is_file():
        raise MissingInputError(f"--roi-dseg {args.roi_dseg} does not exist or is not a file")
    if "cnn" in methods and not args.reports_only:
        from qmri_bids.workflows.bias_cnn import cnn_available

        ok, why = cnn_available()
        if not ok:
            raise UsageError(f"--bias-method {args.bias_method} is not available: {why}; "
                             "use --bias-method n4")
        _verify_bias_model()

    # Last of the checks, as they create the folders.
    for label, folder in (("output_dir", output_dir), ("--work-dir", work_dir),
                          ("--model-dir", model_dir)):
        if folder is not None:
            _check_writable(label, folder)
    plugin, plugin_args = "MultiProc", {"n_procs": nprocs, "memory_gb": mem_gb,
                                        "raise_insufficient": False}
    if device == "cuda":
        plugin_args["n_gpu_procs"] = 1
    if args.use_plugin:
        plugin, plugin_args = read_plugin_file(args.use_plugin)
    if args.stop_on_first_crash:
        plugin_args = {**plugin_args}
    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=args.analysis_level,
        work_dir=work_dir,
        participant_labels=normalise_labels(args.participant_label, "sub-"),
        session_labels=normalise_labels(args.session_label, "ses-"),
        bids_filters=getattr(args, "saved_bids_filters", None) or load_filters(
            args.bids_filter_file),
        nprocs=nprocs,
        omp_nthreads=omp,
        mem_gb=mem_gb,
        device=device,
        device_reason=device_reason,
        bias_methods=methods,
        qmri_estimators=(("nn", "nlls", "dict") if args.qmri_estimator == "all"
                         else tuple(dict.fromkeys(("nn", args.qmri_estimator)))),
        model_dir=model_dir,
        skip_bids_validation=args.skip_bids_validation,
        stop_on_first_crash=args.stop_on_first_crash,
        plugin=plugin,
        plugin_args=plugin_args,
        write_graph=args.write_graph,
        verbose=args.verbose,
        clean_workdir=args.clean_workdir,
        resource_monitor=args.resource_monitor,
        roi_dseg=roi_dseg,
    )


def _verify_bias_model() -> None:
    """Check the shipped bias-field CNN against its card (sha256) before anything runs: a
    corrupt, truncated or replaced weights file is one exit-65 line now rather than a crash of
    every CNN node. No torch operation runs here: torch's OpenMP thread pool, once started in
    this process, deadlocks the forked workers that later run the CNN."""
    from qmri_bids.artifacts import verify_weights
    from qmri_bids.bias.weights import resolve_model_path

    verify_weights(resolve_model_path(), kind="bias-cnn", required=("architecture",))


def _check_writable(label: str, folder: Path) -> None:
    """Exit 73 at start when ``folder`` cannot be created or written, or is full."""
    from qmri_bids.safety import probe_space

    probe_space(label, folder)


def run_app(args) -> int:
    config = build_config(args)
    _RUN_FOLDERS[:] = [f for f in (config.output_dir, config.work_dir, config.model_dir) if f]
    _DUMP_DIRS[:] = [config.work_dir / "logs", config.output_dir / "logs"]
    log_file = config.work_dir / "logs" / f"qmri-bids_{config.run_id}.log"
    _setup_logging(config.verbose + 1, log_file)
    LOGGER.info("qmri-bids %s, run %s", __version__, config.run_id)
    LOGGER.info("device: %s (%s)", config.device, config.device_reason)
    from qmri_bids.safety import check_work_dir_private, private_tmpdir

    warning = check_work_dir_private(config.work_dir)
    if warning:
        LOGGER.warning("%s", warning)
    # Temporary files of this process, its workers and libraries stay inside the work dir.
    with private_tmpdir(config.work_dir, config.run_id) as tmp:
        LOGGER.debug("temporary folder: %s", tmp)
        if config.analysis_level == "group":
            from qmri_bids.group import run_group

            return run_group(config)
        if args.reports_only:
            return run_reports_only(config)
        return run_participant_level(config, log_file,
                                     boilerplate_only=args.boilerplate_only)


# -------------------------------------------------------------------------- participant level


def _lock_participants(config, participants: list[str]) -> list:
    """One lock per participant in the output folder and one in the work folder, or exit 73
    naming the run that holds them (a lock of a dead process is taken over)."""
    from qmri_bids.locks import FileLock, LockHeldError
    from qmri_bids.safety import remove_partial_files

    held: list = []
    try:
        for label in participants:
            for folder, where in ((config.output_dir, "output folder"),
                                  (config.work_dir, "work folder")):
                lock = FileLock(folder / "logs" / "locks" / f"sub-{label}.lock",
                                purpose=f"qmri-bids run {config.run_id}, sub-{label}")
                try:
                    lock.acquire()
                except LockHeldError as exc:
                    who = exc.owner.describe() if exc.owner else "another process"
                    raise CannotWriteError(
                        f"sub-{label} is already being processed into the {where} {folder} by "
                        f"{who} (lock {exc.path}); wait for that run to finish, or give this "
                        "one another output folder and work dir") from exc
                except OSError as exc:
                    raise write_error(exc, _RUN_FOLDERS, "taking the participant lock") or \
                        CannotWriteError(f"cannot create the lock {lock.path}: "
                                         f"{exc.strerror or exc}") from exc
                held.append(lock)
    except BaseException:
        _release(held)
        raise
    for label in participants:
        # Holding the lock, nobody else writes there: debris of a killed run can go.
        for path in remove_partial_files(config.output_dir / f"sub-{label}"):
            LOGGER.info("removed %s, left by an interrupted write", path)
    return held


def _release(locks: Iterable) -> None:
    for lock in locks:
        try:
            lock.release()
        except OSError as exc:
            LOGGER.warning("cannot remove the lock %s: %s", lock.path, exc.strerror or exc)


def _subject_of(path: Path) -> str | None:
    for part in path.parts:
        if part.startswith("sub-"):
            return part[4:]
    return None


def _apply_scan(subjects, scan) -> list[str]:
    """Skip what the dataset scan found unusable: images whose JSON sidecar is broken (and
    collections with such a member), images whose name is not UTF-8. Returns the messages of
    problems that belong to no discovered participant."""
    from qmri_bids.bids.discovery import Skipped

    def reason(broken: list[tuple[Path, str]]) -> str:
        return "; ".join(f"its JSON sidecar {path} {why}" for path, why in broken)

    orphans: list[str] = []
    by_subject = {inputs.subject: inputs for inputs in subjects}
    for inputs in subjects:
        kept = []
        for anat in inputs.anat:
            broken = scan.broken_sidecars_of(anat.path)
            if broken:
                inputs.skipped.append(Skipped(anat.suffix, anat.path, reason(broken)))
                LOGGER.error("skipping %s: %s", anat.path, reason(broken))
                continue
            kept.append(anat)
        inputs.anat = kept
        kept_collections = []
        for col in inputs.collections:
            bad = [(m.path, scan.broken_sidecars_of(m.path)) for m in col.members]
            bad = [(p, b) for p, b in bad if b]
            if bad:
                path, broken = bad[0]
                inputs.skipped.append(Skipped(col.label, path, reason(broken)))
                LOGGER.error("skipping collection %s: %s: %s", col.label, path, reason(broken))
                continue
            kept_collections.append(col)
        inputs.collections = kept_collections
        for skip in inputs.skipped:
            # A collection or B1 map discovery skipped for a "missing" field whose real cause
            # is a sidecar that could not be parsed: say so, and count it as unusable.
            broken = scan.broken_sidecars_of(skip.path) if skip.path is not None else []
            if broken and not skip.reason.startswith("its JSON sidecar "):
                skip.reason = reason(broken)
                skip.unusable = True
    for problem in scan.problems:
        if not problem.unusable:
            LOGGER.warning("%s", problem.message())
            continue
        inputs = by_subject.get(_subject_of(problem.path) or "")
        if inputs is not None:
            inputs.skipped.append(Skipped("image", problem.path, problem.reason))
        else:
            orphans.append(problem.message())
        LOGGER.error("skipping %s", problem.message())
    return orphans


def _discover(config, participants, scan):
    """Discovery, with its failures worded for the user: a filter pybids refuses is a usage
    error; nothing usable because of what the scan found is bad data; a full work dir is 73."""
    from qmri_bids.bids.discovery import discover

    found = scan.unusable_messages()
    try:
        return discover(config.bids_dir, config.work_dir / "bids_db" / config.run_id,
                        participants, config.session_labels, config.bids_filters)
    except (BadDataError, NothingSelectedError) as exc:
        if found:
            raise BadDataError("no usable input:\n  " + "\n  ".join(found)
                               + f"\n  {exc}") from exc
        raise
    except ValueError as exc:
        match = re.search(r"'([^']+)' is not a recognized entity", str(exc))
        if match:
            raise UsageError(f"--bids-filter-file: {match.group(1)!r} is neither an entity nor "
                             f"a sidecar field of {config.bids_dir}") from exc
        raise


def _write_finally(what: str, func: Callable[[], object]) -> None:
    """A bookkeeping write at the end of a run: a failure (full disk) is reported, and must not
    hide the error that ended the run."""
    try:
        func()
    except (OSError, QmriBidsError) as exc:
        LOGGER.warning("could not write %s: %s", what, getattr(exc, "strerror", None) or exc)


def run_reports_only(config) -> int:
    """``--reports-only``: rebuild the participant reports, IQM tables and ``logs/CITATION.*``
    of an existing output folder from its derivatives and run records; nothing is recomputed.
    """
    from qmri_bids.reports import build_reports

    out = config.output_dir
    if not (out / "dataset_description.json").is_file():
        raise MissingInputError(f"{out} holds no qmri-bids derivatives: run the participant "
                                "level first")
    labels = config.participant_labels or None
    result = build_reports(out, labels, roi_dseg=config.roi_dseg)
    if not result.reports and not result.failed:
        raise NothingSelectedError(f"no participant outputs to report on in {out}"
                                   + (f" for {', '.join(labels)}" if labels else ""))
    for path in result.reports:
        print(f"report: {path}")
    if result.failed:
        raise BadDataError("some reports could not be built:\n  " + "\n  ".join(
            f"sub-{who}: {why}" for who, why in result.failed))
    return EXIT_OK


class NodeProgress:
    """One log line per finished node (``[3/11] sub-01 MRF mapping done in 72 s``), chained to
    the :class:`~qmri_bids.reports.NodeTimer`, whose record of the node gives its status and
    duration, so a long run is never silent between its steps."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.done = 0

    def __call__(self, node, status: str, record=None) -> None:
        if record is None or status not in ("end", "exception"):
            return  # a start, or a MapNode's sub-node (its MapNode is reported)
        self.done += 1
        self.total = max(self.total, self.done)
        if record.status == "failed":
            what = "FAILED"
        elif record.status == "cached":
            what = "cached"
        elif record.duration_s is None:
            what = "done"
        else:  # sub-second nodes (the sinks, a small image's CNN) would all read "0 s"
            d = record.duration_s
            what = f"done in {d:.1f} s" if d < 10 else f"done in {d:.0f} s"
        LOGGER.info("[%d/%d] %s %s", self.done, self.total, _readable_node(record.name), what)


def _readable_node(fullname: str) -> str:
    """``qmri_bids_0_1_wf.sub_01_wf.vfa_0_wf.map_nn`` -> ``sub-01 vfa_0 map_nn``."""
    parts = fullname.split(".")
    match = next((_SUBJECT_IN_NODE.fullmatch(p) for p in parts
                  if _SUBJECT_IN_NODE.fullmatch(p)), None)
    if match is None:
        return fullname
    rest = parts[parts.index(match.group(0)) + 1:]
    return " ".join([f"sub-{match.group(1)}", *(p.removesuffix("_wf") for p in rest)])


def run_participant_level(config, log_file: Path, *, boilerplate_only: bool = False) -> int:
    from qmri_bids.bids.derivatives import (
        atomic_copy,
        atomic_write_json,
        atomic_write_text,
        container_info,
        write_dataset_description,
    )
    from qmri_bids.bids.discovery import select_participants, summary_table
    from qmri_bids.bids.scan import scan_dataset
    from qmri_bids.bids.validation import validate_dataset
    from qmri_bids.preflight import preflight
    from qmri_bids.safety import remove_partial_files

    os.environ["OMP_NUM_THREADS"] = str(config.omp_nthreads)
    participants = select_participants(config.bids_dir, config.participant_labels)
    locks = _lock_participants(config, participants)
    subjects: list = []
    to_run: list = []
    exit_code = EXIT_OK
    status = "failed"
    submitted = False
    records: list = []
    execution: dict = {}
    try:
        # Written first, so that a failed run still leaves a valid derivatives dataset.
        write_dataset_description(config.output_dir, config.bids_dir, container_info())
        if not config.skip_bids_validation:
            validate_dataset(config.bids_dir, participants, config.work_dir, config.output_dir,
                             config.run_id)
        else:
            LOGGER.warning("BIDS validation skipped (--skip-bids-validation)")
        scan = scan_dataset(config.bids_dir, participants)
        subjects = _discover(config, participants, scan)
        orphans = _apply_scan(subjects, scan)
        bad = preflight(subjects, config) + orphans

        from qmri_bids import reports
        from qmri_bids.workflows.base import init_qmri_bids_wf, planned_outputs

        print(safe_text(summary_table(subjects, planned_outputs(config, subjects))), flush=True)
        to_run = [s for s in subjects if not s.empty]
        records = [reports.new_run_record(config, s) for s in to_run]
        if boilerplate_only:
            citation = reports.render_citation(reports.methods_from(records, planned=True))
            for path in reports.write_citation(config.output_dir, citation):
                print(f"methods: {path}")
            records, to_run, status = [], [], "finished"
        if to_run:
            # Before the workflow exists: Nipype copies its global config into every node at
            # creation, and those copies win at run time.
            _configure_nipype(config)
            workflow = init_qmri_bids_wf(config=config, subjects=to_run)
            if config.write_graph:
                workflow.write_graph(graph2use="colored", format="svg", simple_form=True)
            _warn_large_nodes(workflow, config)
            # Nipype's resource monitor (and any library writing to the working directory)
            # writes relative to the process's cwd: run inside the work dir, never the caller's.
            caller_cwd = os.getcwd()
            os.chdir(config.work_dir)
            try:
                _execute(workflow, config, subjects, execution)
            finally:
                os.chdir(caller_cwd)
            if config.plugin.endswith("Graph"):
                # Graph plugins (SLURMGraph, SGEGraph...) only submit jobs and return.
                submitted = True
                LOGGER.warning("the %s plugin submitted the jobs and returned: outputs appear "
                               "when the cluster has run them; check them with 'qmri-bids %s "
                               "%s group'", config.plugin, config.bids_dir, config.output_dir)
        if bad:
            raise BadDataError(
                "some inputs were unusable and skipped (the rest was processed):\n  "
                + "\n  ".join(bad)
            )
        status = "submitted" if submitted else "finished"
    except RunInterrupted as exc:
        exit_code, status = exc.exit_code, "interrupted"
        exc.detail = (f"what had finished is kept in the work dir {config.work_dir}: run the "
                      "same command again to resume")
        LOGGER.error("%s; %s", exc, exc.detail)
        raise
    except QmriBidsError as exc:
        exit_code = exc.exit_code
        LOGGER.error("%s", exc)
        _error(str(exc))
    except Exception as exc:
        fault = write_error(exc, _RUN_FOLDERS)
        if fault is None:
            exit_code = EXIT_NODE_FAILED  # an internal error: _guarded reports it
            raise
        exit_code = fault.exit_code
        LOGGER.error("%s", fault)
        _error(str(fault))
    finally:
        for inputs in subjects:
            log_dir = config.log_dir(inputs.subject)
            _write_finally(f"{log_dir}/config.json",
                           lambda d=log_dir: atomic_write_text(d / "config.json",
                                                               config.to_json()))
            if log_file.exists():
                _write_finally(f"the log copy in {log_dir}",
                               lambda d=log_dir: atomic_copy(log_file, d / log_file.name))
        _finish_records(config, records, execution, status, exit_code)
        _write_finally(f"run_{config.run_id}.json", lambda: atomic_write_json(
            config.output_dir / "logs" / f"run_{config.run_id}.json",
            {"run_id": config.run_id, "exit_code": exit_code, "status": status,
             "participants": [s.subject for s in subjects] or participants}))
        if exit_code != EXIT_OK or status == "interrupted":
            for label in participants:
                remove_partial_files(config.output_dir / f"sub-{label}")
        if records and not submitted and status != "interrupted":
            # Also after a failure: the report is where the user sees which node failed.
            _write_finally("the reports", lambda: _build_reports(config, records))
        if exit_code == EXIT_OK and config.clean_workdir and not submitted and to_run:
            _write_finally("(cleaning) the work folder", lambda: _clean_workdir(config))
        _release(locks)
    if exit_code == EXIT_OK and not submitted:
        LOGGER.info("done: derivatives in %s", config.output_dir)
    return exit_code


def _finish_records(config, records: list, execution: dict, status: str,
                    exit_code: int) -> None:
    """Close and write each participant's run record (what ran, how long, what failed)."""
    from qmri_bids import reports

    plugin, timer = execution.get("plugin"), execution.get("timer")
    failures = [{"fullname": f.node, "text": f.traceback, "crash_file": f.crash_file}
                for f in (plugin.failures if plugin is not None else [])]
    nodes = timer.records if timer is not None else []
    record_status = status if status in ("finished", "submitted", "interrupted") else "failed"
    for record in records:
        reports.finish_run_record(record, status=record_status, exit_code=exit_code,
                                  nodes=nodes, log_dir=config.log_dir(record.subject),
                                  failures=failures)
        _write_finally(f"the run record of sub-{record.subject}",
                       lambda r=record: reports.write_run_record(r, config.output_dir))


def _build_reports(config, records: list) -> None:
    from qmri_bids.reports import build_reports

    result = build_reports(config.output_dir, sorted({r.subject for r in records}),
                           roi_dseg=config.roi_dseg)
    for path in result.reports:
        LOGGER.info("report: %s", path)
    for who, why in result.failed:
        LOGGER.warning("the report of sub-%s could not be built: %s", who, why)


def _clean_workdir(config) -> None:
    """``--clean-workdir``: remove this version's Nipype folder (never the model cache)."""
    import shutil

    from qmri_bids.workflows.base import top_wf_name

    folder = config.work_dir / top_wf_name()
    if folder.is_dir() and not _is_within(config.model_dir, folder):
        shutil.rmtree(folder, ignore_errors=True)
        LOGGER.info("removed the work folder %s (--clean-workdir)", folder)


def _execute(workflow, config, subjects, execution: dict | None = None) -> None:
    """Run the workflow; turn node failures into one error whose exit code says why.
    ``execution`` receives the plugin (its failure records) and the node timer."""
    from qmri_bids.reports import NodeTimer
    from qmri_bids.runner import SupervisedMultiProcPlugin

    timer = NodeTimer(chain=NodeProgress(len(list(workflow._get_all_nodes()))))
    plugin_args = {**config.plugin_args, "status_callback": timer}
    plugin = None
    if config.plugin == "MultiProc":
        plugin = SupervisedMultiProcPlugin(plugin_args=plugin_args)
    if execution is not None:
        execution.update(plugin=plugin, timer=timer)
    LOGGER.info("running %d participant(s) with the %s plugin %s",
                sum(1 for s in subjects if not s.empty), config.plugin, config.plugin_args)
    try:
        if plugin is not None:
            workflow.run(plugin=plugin)
        else:
            workflow.run(plugin=config.plugin, plugin_args=plugin_args)
    except RunInterrupted:
        if plugin is not None:
            plugin.stop_workers()
        raise
    except (RuntimeError, OSError) as exc:
        if plugin is not None:
            plugin.stop_workers()
        failures = _failures(plugin, config, subjects)
        if not failures and isinstance(exc, OSError):
            raise
        raise _failure_error(failures, config, exc) from exc
    finally:
        if plugin is not None:
            plugin.pool.shutdown(wait=False, cancel_futures=True)


_SUBJECT_IN_NODE = re.compile(r"sub_([A-Za-z0-9]+)(?:_ses_[A-Za-z0-9]+)?_wf")


def _failures(plugin, config, subjects) -> list[dict]:
    """What each failed node said: from the plugin's records, else from the crash files."""
    if plugin is not None and plugin.failures:
        out = []
        for f in plugin.failures:
            match = _SUBJECT_IN_NODE.search(f.node)
            out.append({"node": f.name, "fullname": f.node, "mem_gb": f.mem_gb,
                        "subject": match.group(1) if match else "?", "text": f.traceback})
        return out
    out = []
    for inputs in subjects:
        for crash in sorted(config.log_dir(inputs.subject).glob("crash-*.txt")):
            node = crash.name.split("-")[4] if crash.name.count("-") >= 5 else crash.name
            out.append({"node": node, "fullname": node, "mem_gb": None,
                        "subject": inputs.subject, "text": crash.read_text(errors="replace")})
    return out


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if "Error" in ln.split(":", 1)[0]),
                lines[-1] if lines else "")


def memory_advice(node: str, mem_gb: float | None, config,
                  what: str = "ran out of memory") -> str:
    """How to give a node that ran out of memory what it needs (``--mem``, ``--nprocs``)."""
    asked = f"it asked for {mem_gb:.1f} GB" if mem_gb is not None else "it used its estimate"
    more = max(math.ceil(2 * (mem_gb or 0)), math.ceil(config.mem_gb * 1.5))
    return (f"node {node} {what}: {asked}, and this run lets its nodes use "
            f"{config.mem_gb:.1f} GB in total with up to {config.nprocs} at once; give it more "
            f"with --mem (e.g. --mem {more}G, if the machine has it) or run fewer nodes at once "
            f"with --nprocs {max(1, config.nprocs // 2)}")


def _worker_death(text: str) -> str | None:
    """How a node's worker died, from the plugin's ``WorkerDied`` note (None: it did not)."""
    match = re.search(r"WorkerDied: .*?ended abruptly \(([^)]*\)?)", text)
    if not match:
        return None
    return (f"did not finish: its worker process ended abruptly ({match.group(1)}; SIGKILL is "
            "most often the system's out-of-memory killer)")


def _failure_error(failures: list[dict], config, exc: BaseException) -> QmriBidsError:
    from qmri_bids.safety import write_fault_in_text

    for failure in failures:
        fault = write_fault_in_text(failure["text"], _RUN_FOLDERS)
        if fault is not None:
            return CannotWriteError(
                f"{fault}; the files written so far are complete (each is written under a "
                "temporary name and renamed): free space or fix the folder, then run the same "
                "command again to resume")
    causes, kinds = [], []
    for failure in failures:
        text = failure["text"]
        line = _last_error_line(text)
        died = _worker_death(text)
        if died or "MemoryError" in line:
            line = memory_advice(failure["fullname"], failure["mem_gb"], config,
                                 died or "ran out of memory")
            kinds.append("memory")
        else:
            kinds.append("bad" if line.split(":", 1)[0].endswith("BadDataError") else "node")
        causes.append(f"{line} (node {failure['node']}, sub-{failure['subject']})")
    error = BadDataError if kinds and all(k == "bad" for k in kinds) else NodeFailedError
    return error("processing failed:\n  " + "\n  ".join(causes or [_last_error_line(str(exc))])
                 + f"\ncrash files are in {config.output_dir}/sub-<label>/log/"
                   f"{config.run_id}/")


def _warn_large_nodes(workflow, config) -> None:
    """A node that asks for more memory than ``--mem`` runs alone and may still run out."""
    try:
        nodes = workflow._get_all_nodes()
    except AttributeError:
        return
    for node in nodes:
        mem = float(getattr(node, "mem_gb", 0) or 0)
        if mem > config.mem_gb:
            LOGGER.warning("node %s asks for %.1f GB, more than --mem %.1f GB: it will run alone "
                           "and may run out of memory; give more with --mem", node.fullname,
                           mem, config.mem_gb)


def _configure_nipype(config) -> None:
    from nipype import config as ncfg

    ncfg.set("execution", "crashfile_format", "txt")
    ncfg.set("execution", "stop_on_first_crash", str(config.stop_on_first_crash).lower())
    ncfg.set("execution", "remove_unnecessary_outputs", "false")
    ncfg.set("execution", "hash_method", "content")
    ncfg.set("execution", "create_report", "false")
    ncfg.set("monitoring", "enabled", str(config.resource_monitor).lower())
    # Nipype caches the monitor switch at its first use: set it through its own API too.
    if config.resource_monitor:
        ncfg.enable_resource_monitor()
    else:
        ncfg.disable_resource_monitor()
    ncfg.set("logging", "log_to_file", "false")
    ncfg.set("logging", "workflow_level", "INFO" if config.verbose else "WARNING")
    ncfg.set("logging", "interface_level", "INFO" if config.verbose > 1 else "WARNING")
    from nipype import logging as nlogging

    nlogging.update_logging(ncfg)
    _route_nipype_logs()


class _CurrentStdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record comes (not the one at creation)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _NoTraceback(logging.Formatter):
    """Nipype logs each crash with its traceback; on the terminal the first lines are enough
    (the traceback goes to the log file and the crash file)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        cut = text.find("Traceback (most recent call last)")
        if cut < 0:
            cut = text.find("concurrent.futures.process._RemoteTraceback")
        if cut >= 0:
            text = text[:cut].rstrip() + "\n\t (traceback in the run's log file)"
        return safe_text(text)


def _route_nipype_logs() -> None:
    """Nipype's records: on the terminal without tracebacks, in full in the run's log file."""
    from nipype.utils.logger import Logging

    nipype = logging.getLogger("nipype")
    for handler in list(nipype.handlers):
        nipype.removeHandler(handler)
    console = _CurrentStdout()
    console.setFormatter(_NoTraceback(Logging.fmt, Logging.datefmt))
    nipype.addHandler(console)
    for handler in logging.getLogger("qmri_bids").handlers:
        if isinstance(handler, _LogFile):
            nipype.addHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
