"""Group level: a census of the participant-level outputs and the group QC report.

``group_summary.tsv`` lists every participant in ``output_dir`` with the derivatives found for
it and its last run; :func:`qmri_bids.reports.build_group_report` then writes the group IQM
tables (``group_bias.tsv``, ``group_qmri.tsv``, ``group_roi.tsv``) and ``group_report.html``
from the IQM tables the participant level stored (README: "Reports").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qmri_bids.bids.derivatives import atomic_write_text
from qmri_bids.errors import MissingInputError, NothingSelectedError

LOGGER = logging.getLogger("qmri_bids.group")

#: suffixes of qMRI maps counted as maps in the census (the rest are images)
_MAP_ENDINGS = ("map.nii.gz", "MTsat.nii.gz", "UNIT1.nii.gz")


def census(out: Path, subjects: list[str]) -> list[str]:
    """Rows of ``group_summary.tsv``: images and maps per participant, its last run."""
    rows = ["participant_id\tn_images\tn_maps\tlast_run\tlast_exit_code"]
    runs = {}
    for run_file in sorted((out / "logs").glob("run_*.json")):
        try:
            info = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            LOGGER.warning("unreadable run summary %s: skipped", run_file)
            continue
        for sub in info.get("participants", []):
            runs[f"sub-{sub}"] = info
    for sub in subjects:
        files = [p for p in (out / sub).rglob("*.nii.gz")
                 if "log" not in p.relative_to(out / sub).parts[:1]
                 and "qc" not in p.relative_to(out / sub).parts[:1]]
        n_maps = sum(1 for p in files if p.name.endswith(_MAP_ENDINGS))
        info = runs.get(sub, {})
        rows.append(f"{sub}\t{len(files) - n_maps}\t{n_maps}\t{info.get('run_id', 'n/a')}\t"
                    f"{info.get('exit_code', 'n/a')}")
    return rows


def run_group(config) -> int:
    """The ``group`` analysis level on ``config.output_dir`` (``--participant-label``
    restricts it; ``config.roi_dseg``, when the CLI has it, adds per-label statistics)."""
    from qmri_bids.reports import build_group_report

    out = Path(config.output_dir)
    if not (out / "dataset_description.json").is_file():
        raise MissingInputError(f"{out} holds no qmri-bids derivatives: run the participant "
                                "level first")
    subjects = sorted(p.name for p in out.glob("sub-*") if p.is_dir())
    if config.participant_labels:
        subjects = [s for s in subjects if s[4:] in config.participant_labels]
    if not subjects:
        raise NothingSelectedError(f"no participant outputs found in {out}")
    rows = census(out, subjects)
    atomic_write_text(out / "group_summary.tsv", "\n".join(rows) + "\n")
    print("\n".join(rows))
    LOGGER.info("group level: wrote %s", out / "group_summary.tsv")
    roi = getattr(config, "roi_dseg", None)
    result = build_group_report([out], out, roi_dseg=Path(roi) if roi else None,
                                participant_labels=[s[4:] for s in subjects])
    for table in result.tables:
        LOGGER.info("group level: wrote %s", table)
    print(f"group report: {result.html} ({result.n_participants} participants, "
          f"{len(result.outliers)} outlier values)")
    return 0
