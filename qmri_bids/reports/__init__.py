"""Visual reports, group QC tables and derivative validation (NiPreps style).

Nipype-free: everything here reads the derivatives folder and the run records that the
participant level writes (:mod:`qmri_bids.reports.record`), and never recomputes a result.

* :func:`write_run_record` and friends: the run record (schema: :class:`RunRecord`);
* :func:`build_participant_report`: ``sub-<label>.html`` and the participant's IQM table;
* :func:`build_reports`: all participant reports and ``logs/CITATION.*`` (``--reports-only``);
* :func:`build_group_report`: ``group_report.html`` and the ``group_*.tsv`` tables;
* :func:`render_citation` / :func:`write_citation`: the methods boilerplate;
* :func:`validate_derivatives`: ``bids-validator-deno`` on an output folder.
"""

from __future__ import annotations

from qmri_bids.reports.citation import (
    Citation,
    MethodsInput,
    methods_from,
    render_citation,
    write_citation,
)
from qmri_bids.reports.group import GroupResult, build_group_report
from qmri_bids.reports.iqm import compute_participant_iqms, iqm_path, read_iqms
from qmri_bids.reports.participant import (
    ReportSet,
    build_participant_report,
    build_reports,
    output_citation,
)
from qmri_bids.reports.record import (
    RUN_RECORD_VERSION,
    CrashRecord,
    InputRecord,
    NodeRecord,
    NodeTimer,
    RunRecord,
    SkippedInput,
    Step,
    finish_run_record,
    latest_run_record,
    new_run_record,
    read_run_record,
    write_run_record,
)
from qmri_bids.reports.validate import ValidationResult, validate_derivatives

__all__ = [
    "RUN_RECORD_VERSION", "Citation", "CrashRecord", "GroupResult", "InputRecord",
    "MethodsInput", "NodeRecord", "NodeTimer", "ReportSet", "RunRecord", "SkippedInput",
    "Step", "ValidationResult", "build_group_report", "build_participant_report",
    "build_reports", "compute_participant_iqms", "finish_run_record", "iqm_path",
    "latest_run_record", "methods_from", "new_run_record", "output_citation",
    "read_iqms", "read_run_record", "render_citation", "validate_derivatives",
    "write_citation", "write_run_record",
]
