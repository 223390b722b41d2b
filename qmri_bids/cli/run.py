"""Entry point: ``qmri-bids`` (BIDS App), ``qmri-bids demo`` and ``qmri-bids train``.

The flow is one way: arguments → ``RunConfig`` (checked) → validation → discovery → workflow →
execution → exit code. Every user-caused failure is a ``QmriBidsError`` whose message names the
file and the problem and whose exit code follows the BIDS-Apps execution spec.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
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
    QmriBidsError,
    UsageError,
    ValidationError,
)

LOGGER = logging.getLogger("qmri_bids")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # ``qmri-bids demo out participant`` on a BIDS folder named "demo" is a BIDS-App call.
    app_call = len(argv) >= 3 and argv[2] in ("participant", "group") and Path(argv[0]).is_dir()
    if argv and argv[0] == "demo" and not app_call:
        from qmri_bids.demo.cli import demo_main

        return _guarded(lambda: demo_main(argv[1:]))
    if argv and argv[0] == "train" and not app_call:
        from qmri_bids.cli.train import train_main

        return _guarded(lambda: train_main(argv[1:]))
    from qmri_bids.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    return _guarded(lambda: run_app(args))


def _guarded(func) -> int:
    try:
        return int(func() or EXIT_OK)
    except QmriBidsError as exc:
        LOGGER.error("%s", exc) if LOGGER.handlers else None
        print(f"qmri-bids: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qmri-bids: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - an internal error: say so, keep the details
        detail = traceback.format_exc()
        LOGGER.debug("%s", detail)
        crash = Path(os.environ.get("TMPDIR", "/tmp")) / f"qmri-bids-crash-{os.getpid()}.txt"
        try:
            crash.write_text(detail)
            where = f"; details in {crash}"
        except OSError:
            where = ""
        print(f"qmri-bids: internal error ({type(exc).__name__}: {exc}){where}. Please report "
              "it with the command you ran.", file=sys.stderr)
        return EXIT_NODE_FAILED


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
        handler = logging.FileHandler(log_file)
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


def build_config(args):
    """Check the arguments against the file system and turn them into a ``RunConfig``."""
    from qmri_bids.bids.discovery import load_filters, normalise_labels
    from qmri_bids.config import RunConfig
    from qmri_bids.device import select_device
    from qmri_bids.resources import default_resources, read_plugin_file

    bids_dir = args.bids_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        raise MissingInputError(f"bids_dir {args.bids_dir} does not exist or is not a folder")
    if not (bids_dir / "dataset_description.json").is_file():
        raise ValidationError(
            f"{bids_dir} is not a BIDS dataset: dataset_description.json is missing at its root"
        )
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

    for label, folder in (("output_dir", output_dir), ("--work-dir", work_dir)):
        _check_writable(label, folder)

    nprocs, omp, mem_gb = default_resources(args.nprocs, args.omp_nthreads, args.mem_gb)
    device, device_reason = select_device(args.device)
    methods = ("cnn", "n4") if args.bias_method == "both" else (args.bias_method,)
    if "cnn" in methods:
        from qmri_bids.workflows.bias_cnn import cnn_available

        ok, why = cnn_available()
        if not ok:
            raise UsageError(f"--bias-method {args.bias_method} is not available: {why}; "
                             "use --bias-method n4")
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
        bids_filters=load_filters(args.bids_filter_file),
        nprocs=nprocs,
        omp_nthreads=omp,
        mem_gb=mem_gb,
        device=device,
        device_reason=device_reason,
        bias_methods=methods,
        qmri_estimators=(("nn", "nlls", "dict") if args.qmri_estimator == "all"
                         else tuple(dict.fromkeys(("nn", args.qmri_estimator)))),
        model_dir=args.model_dir.expanduser().resolve() if args.model_dir else None,
        skip_bids_validation=args.skip_bids_validation,
        stop_on_first_crash=args.stop_on_first_crash,
        plugin=plugin,
        plugin_args=plugin_args,
        write_graph=args.write_graph,
        verbose=args.verbose,
    )


def _check_writable(label: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".qmri-bids-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CannotWriteError(f"{label} {folder} cannot be written: "
                               f"{exc.strerror or exc}") from exc


def run_app(args) -> int:
    config = build_config(args)
    log_file = config.work_dir / "logs" / f"qmri-bids_{config.run_id}.log"
    _setup_logging(config.verbose + 1, log_file)
    LOGGER.info("qmri-bids %s, run %s", __version__, config.run_id)
    LOGGER.info("device: %s (%s)", config.device, config.device_reason)
    if config.analysis_level == "group":
        from qmri_bids.group import run_group

        return run_group(config)
    return run_participant_level(config, log_file)


def run_participant_level(config, log_file: Path) -> int:
    from qmri_bids.bids.derivatives import (
        atomic_copy,
        atomic_write_json,
        atomic_write_text,
        container_info,
        write_dataset_description,
    )
    from qmri_bids.bids.discovery import discover, select_participants, summary_table
    from qmri_bids.bids.validation import validate_dataset
    from qmri_bids.preflight import preflight

    os.environ["OMP_NUM_THREADS"] = str(config.omp_nthreads)
    participants = select_participants(config.bids_dir, config.participant_labels)
    # Written first, so that a failed run still leaves a valid derivatives dataset.
    write_dataset_description(config.output_dir, config.bids_dir, container_info())
    if not config.skip_bids_validation:
        validate_dataset(config.bids_dir, participants, config.work_dir, config.output_dir,
                         config.run_id)
    else:
        LOGGER.warning("BIDS validation skipped (--skip-bids-validation)")
    subjects = discover(config.bids_dir, config.work_dir / "bids_db" / config.run_id,
                        participants, config.session_labels, config.bids_filters)
    bad = preflight(subjects, config)

    from qmri_bids.workflows.base import describe, init_qmri_bids_wf, planned_outputs

    print(summary_table(subjects, planned_outputs(config, subjects)), flush=True)
    to_run = [s for s in subjects if not s.empty]
    exit_code = EXIT_OK
    submitted = False
    try:
        if to_run:
            # Before the workflow exists: Nipype copies its global config into every node at
            # creation, and those copies win at run time.
            _configure_nipype(config)
            workflow = init_qmri_bids_wf(config, to_run)
            if config.write_graph:
                workflow.write_graph(graph2use="colored", format="svg", simple_form=True)
            LOGGER.info("running %d participant(s) with the %s plugin %s",
                        len(to_run), config.plugin, config.plugin_args)
            try:
                workflow.run(plugin=config.plugin, plugin_args=config.plugin_args)
            except RuntimeError as exc:
                causes = _crash_causes(config, subjects)
                error = BadDataError if causes and all(
                    c.split(":", 1)[0].endswith("BadDataError") for c in causes) \
                    else NodeFailedError
                raise error(
                    "processing failed:\n  " + "\n  ".join(causes or [str(exc)])
                    + f"\ncrash files are in {config.output_dir}/sub-<label>/log/"
                      f"{config.run_id}/") from exc
            boilerplate = describe(workflow)
            if config.plugin.endswith("Graph"):
                # Graph plugins (SLURMGraph, SGEGraph...) only submit jobs and return.
                submitted = True
                LOGGER.warning("the %s plugin submitted the jobs and returned: outputs appear "
                               "when the cluster has run them; check them with 'qmri-bids %s "
                               "%s group'", config.plugin, config.bids_dir, config.output_dir)
        else:
            boilerplate = ""
        if bad:
            raise BadDataError(
                "some inputs were unusable and skipped (the rest was processed):\n  "
                + "\n  ".join(bad)
            )
    except QmriBidsError as exc:
        exit_code = exc.exit_code
        LOGGER.error("%s", exc)
        print(f"qmri-bids: error: {exc}", file=sys.stderr)
    finally:
        for inputs in subjects:
            log_dir = config.log_dir(inputs.subject)
            atomic_write_text(log_dir / "config.json", config.to_json())
            if log_file.exists():
                atomic_copy(log_file, log_dir / log_file.name)
        if to_run and exit_code == EXIT_OK:
            atomic_write_text(config.output_dir / "logs" / "CITATION.md", boilerplate + "\n")
        atomic_write_json(config.output_dir / "logs" / f"run_{config.run_id}.json",
                          {"run_id": config.run_id, "exit_code": exit_code,
                           "status": "submitted" if submitted else (
                               "finished" if exit_code == EXIT_OK else "failed"),
                           "participants": [s.subject for s in subjects]})
    if exit_code == EXIT_OK and not submitted:
        LOGGER.info("done: derivatives in %s", config.output_dir)
    return exit_code


def _crash_causes(config, subjects) -> list[str]:
    """The final exception line of each text crash file of this run (what the user must read)."""
    causes = []
    for inputs in subjects:
        for crash in sorted(config.log_dir(inputs.subject).glob("crash-*.txt")):
            lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines()
                     if ln.strip()]
            last = next((ln for ln in reversed(lines) if "Error" in ln.split(":", 1)[0]),
                        lines[-1] if lines else "")
            node = crash.name.split("-")[4] if crash.name.count("-") >= 5 else crash.name
            causes.append(f"{last} (node {node}, sub-{inputs.subject})")
    return causes


def _configure_nipype(config) -> None:
    from nipype import config as ncfg

    ncfg.set("execution", "crashfile_format", "txt")
    ncfg.set("execution", "stop_on_first_crash", str(config.stop_on_first_crash).lower())
    ncfg.set("execution", "remove_unnecessary_outputs", "false")
    ncfg.set("execution", "hash_method", "content")
    ncfg.set("execution", "create_report", "false")
    ncfg.set("monitoring", "enabled", "false")
    ncfg.set("logging", "log_to_file", "false")
    ncfg.set("logging", "workflow_level", "INFO" if config.verbose else "WARNING")
    ncfg.set("logging", "interface_level", "INFO" if config.verbose > 1 else "WARNING")
    from nipype import logging as nlogging

    nlogging.update_logging(ncfg)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
