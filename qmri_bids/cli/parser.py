"""Argument parser of the BIDS App (``qmri-bids bids_dir output_dir {participant,group}``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qmri_bids import __version__
from qmri_bids.config import BIAS_METHODS
from qmri_bids.device import DEVICE_CHOICES


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on a usage error; the BIDS-Apps spec asks for 64."""

    def error(self, message: str):
        self.print_usage()
        self.exit(64, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a default only where there is one and the help text does not already say it
    (argparse's ArgumentDefaultsHelpFormatter prints "(default: None)" after every flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _both_spellings(*names: str) -> list[str]:
    """``--participant-label`` and ``--participant_label`` both work, as in fMRIPrep."""
    out = []
    for name in names:
        out.append(name)
        if name.startswith("--") and "-" in name[2:]:
            out.append("--" + name[2:].replace("-", "_"))
    return out


def parse_mem(value: str) -> float:
    """``--mem``: megabytes (``8000``), or with a unit suffix (``8G``, ``8GB``, ``500M``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read memory {value!r}: use e.g. 8000 or 8G")
    number, unit = float(match.group(1)), match.group(2).upper() or "M"
    gb = number * {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]
    if gb <= 0:
        raise argparse.ArgumentTypeError("--mem must be positive")
    return gb


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qmri-bids",
        description=(
            "qmri-bids: bias-field correction (implicitly trained CNN, N4 baseline) and "
            "quantitative MRI mapping (CRB-trained networks) of a BIDS dataset. Other commands: "
            "'qmri-bids demo DIR' writes a demo dataset; 'qmri-bids train ...' trains models."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument(
        "analysis_level", choices=["participant", "group"],
        help="'participant' processes each participant; 'group' summarises a finished "
             "participant-level output folder",
    )
    parser.add_argument("--version", action="version", version=f"qmri-bids {__version__}")

    sel = parser.add_argument_group("selecting inputs")
    sel.add_argument(*_both_spellings("--participant-label"), nargs="+", metavar="LABEL",
                     dest="participant_label",
                     help="participants to process (with or without the 'sub-' prefix); "
                          "default: all")
    sel.add_argument(*_both_spellings("--session-label"), nargs="+", metavar="LABEL",
                     dest="session_label", help="sessions to process (with or without 'ses-')")
    sel.add_argument(*_both_spellings("--bids-filter-file"), type=Path, metavar="FILE",
                     dest="bids_filter_file",
                     help="JSON of pybids queries per suffix, e.g. "
                          '{"t1w": {"acquisition": null}}; null = entity absent, "*" = any')
    sel.add_argument(*_both_spellings("--skip-bids-validation"), action="store_true",
                     dest="skip_bids_validation", help="do not run bids-validator")

    proc = parser.add_argument_group("processing")
    proc.add_argument(*_both_spellings("--bias-method"), choices=BIAS_METHODS, default="cnn",
                      dest="bias_method",
                      help="bias-field correction: the implicitly trained CNN, N4, or both "
                           "side by side")
    proc.add_argument(*_both_spellings("--qmri-estimator"), choices=("nn", "nlls", "dict", "all"),
                      default="nn", dest="qmri_estimator",
                      help="qMRI maps: the CRB-trained network only, or also NLLS (desc-nlls) "
                           "or dictionary matching (desc-dict, MRF and MESE), or all")
    proc.add_argument(*_both_spellings("--model-dir"), type=Path, dest="model_dir",
                      help="cache of estimators trained for protocols that no shipped model "
                           "matches (default: <work-dir>/models)")
    proc.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                      help="where networks run; auto picks a CUDA GPU when one is usable")

    res = parser.add_argument_group("resources and execution")
    res.add_argument("-w", *_both_spellings("--work-dir"), type=Path, dest="work_dir",
                     help="Nipype working directory (intermediate results; reuse it to resume). "
                          "Default: ./work")
    res.add_argument(*_both_spellings("--nprocs", "--n-cpus"), type=_positive_int, dest="nprocs",
                     help="processes Nipype may run at once (default: all CPUs)")
    res.add_argument(*_both_spellings("--omp-nthreads"), type=_positive_int, dest="omp_nthreads",
                     help="threads per process (torch, ITK); default: min(8, nprocs)")
    res.add_argument("--mem", "--mem-mb", "--mem_mb", type=parse_mem, dest="mem_gb",
                     metavar="MEM", help="memory Nipype may use: MB, or with a G suffix")
    res.add_argument(*_both_spellings("--use-plugin"), type=Path, dest="use_plugin",
                     metavar="FILE", help="Nipype plugin YAML (plugin: ..., plugin_args: ...)")
    res.add_argument(*_both_spellings("--stop-on-first-crash"), action="store_true",
                     dest="stop_on_first_crash", help="stop at the first node that fails")
    res.add_argument(*_both_spellings("--write-graph"), action="store_true", dest="write_graph",
                     help="write the workflow graph (dot/png) into the work dir")
    res.add_argument(*_both_spellings("--clean-workdir"), action="store_true",
                     dest="clean_workdir",
                     help="delete this run's Nipype work folder after a successful run (the "
                          "trained-estimator cache in --model-dir is kept)")
    res.add_argument(*_both_spellings("--resource-monitor"), action="store_true",
                     dest="resource_monitor",
                     help="measure each node's memory and CPU (Nipype's resource monitor); "
                          "the peaks appear in the report's timing table")
    res.add_argument(*_both_spellings("--config-file"), type=Path, dest="config_file",
                     metavar="FILE",
                     help="a config.json of an earlier run (sub-<label>/log/<run>/config.json): "
                          "its settings are the defaults, the flags given here win")
    res.add_argument("-v", "--verbose", action="count", default=0,
                     help="more log output (-vv for debug)")

    rep = parser.add_argument_group("reports")
    rep.add_argument(*_both_spellings("--reports-only"), action="store_true",
                     dest="reports_only",
                     help="only (re)build sub-<label>.html, the IQM tables and logs/CITATION.* "
                          "from an existing output folder; nothing is recomputed")
    rep.add_argument(*_both_spellings("--boilerplate-only"), action="store_true",
                     dest="boilerplate_only",
                     help="only write the methods text (logs/CITATION.{md,bib,html}) of what "
                          "this command would run; nothing is run")
    rep.add_argument(*_both_spellings("--roi-dseg"), type=Path, dest="roi_dseg", metavar="FILE",
                     help="a label image (dseg, with its .tsv of names) for per-region map "
                          "statistics in reports and group tables; default: a dseg found in "
                          "the derivatives")
    rep.add_argument("--notrack", action="store_true",
                     help="accepted for fMRIPrep compatibility; qmri-bids never sends anything "
                          "anywhere, so there is nothing to turn off")
    return parser
