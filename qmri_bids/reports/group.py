"""Group level: one row per participant of the IQMs the participant level stored, strip plots
across participants with outliers flagged, ``group_report.html``.

Only the participants' IQM tables (``sub-*/qc/*_desc-iqm.tsv``, :mod:`.iqm`) and run records
are read, so a thousand participants take seconds. A participant without a table (its
report was never built) or without the ROI rows of a requested segmentation gets one
computed from its derivatives now, and the report says so.

Outputs in ``out_dir``: ``group_bias.tsv`` (bias IQMs), ``group_qmri.tsv`` (median, quartiles
and IQR of every map inside the object), ``group_roi.tsv`` (per label, when a segmentation
was found or given) -- each with ``participant_id`` (and ``session_id`` when there are
sessions), the metric columns, and ``outliers`` (the metrics of the row with |robust z| > the
threshold) -- and ``group_report.html``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmri_bids.reports import figures as fg
from qmri_bids.reports.iqm import compute_participant_iqms, iqm_path, read_iqms
from qmri_bids.reports.layout import participants as list_participants
from qmri_bids.reports.record import RUN_RECORD_NAME

LOGGER = logging.getLogger("qmri_bids.reports")

ROBUST_Z = 3.0
TABLES = {"bias": "group_bias.tsv", "map": "group_qmri.tsv", "roi": "group_roi.tsv"}
#: at most this many outlier rows in the HTML (all are in the TSVs)
MAX_OUTLIER_ROWS = 200
#: metrics per strip-plot figure (more make one figure per chunk)
STRIPS_PER_FIGURE = 16


@dataclass
class ParticipantRow:
    subject: str
    session: str | None
    output_dir: Path
    values: dict[str, float]
    units: dict[str, str]
    kinds: dict[str, str]
    run_id: str = "n/a"
    status: str = "n/a"
    computed_now: bool = False

    @property
    def participant(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


@dataclass
class GroupResult:
    """What :func:`build_group_report` wrote and found."""

    html: Path
    tables: list[Path] = field(default_factory=list)
    n_participants: int = 0
    outliers: list[tuple[str, str, float, float]] = field(default_factory=list)
    computed_now: list[str] = field(default_factory=list)


def _last_run(output_dir: Path, subject: str, session: str | None) -> tuple[str, str]:
    """(run id, status) of the participant's newest run record, without parsing the whole
    record (only its two fields are needed here)."""
    import json

    name = RUN_RECORD_NAME + (f"_ses-{session}" if session else "") + ".json"
    log = Path(output_dir) / f"sub-{subject}" / "log"
    try:
        runs = sorted(d for d in os.listdir(log) if (log / d / name).is_file())
    except OSError:
        return "n/a", "n/a"
    if not runs:
        return "n/a", "n/a"
    try:
        payload = json.loads((log / runs[-1] / name).read_text())
        return str(payload.get("run_id", runs[-1])), str(payload.get("status", "n/a"))
    except (OSError, ValueError):
        return runs[-1], "unreadable"


def _needs_rois(provenance: dict[str, str], roi_dseg: Path | None) -> bool:
    """A requested segmentation whose ROI rows the stored table does not have."""
    if roi_dseg is None:
        return False
    used = provenance.get("dseg", "")
    return str(Path(roi_dseg)) not in used


def collect(output_dirs: Sequence[Path], *, roi_dseg: Path | None = None,
            participant_labels: Iterable[str] | None = None) -> tuple[list[ParticipantRow],
                                                                      list[str]]:
    """The rows of every participant in ``output_dirs`` and notes for the report. The same
    participant in several folders: the newest IQM table wins (noted)."""
    wanted = None if participant_labels is None else {
        str(x).removeprefix("sub-") for x in participant_labels}
    rows: dict[tuple[str, str | None], ParticipantRow] = {}
    notes: list[str] = []
    mtimes: dict[tuple[str, str | None], float] = {}
    for out in output_dirs:
        out = Path(out)
        for subject, session in list_participants(out):
            if wanted is not None and subject not in wanted:
                continue
            path = iqm_path(out, subject, session)
            computed = False
            provenance: dict[str, str] = {}
            if path.is_file():
                values, units, provenance = read_iqms(path)
            if not path.is_file() or _needs_rois(provenance, roi_dseg):
                try:
                    path = compute_participant_iqms(out, subject, session, roi_dseg=roi_dseg)
                except Exception as exc:  # noqa: BLE001 - a broken participant is reported
                    notes.append(f"sub-{subject}: IQMs could not be computed ({exc})")
                    continue
                computed = True
                values, units, provenance = read_iqms(path)
            kinds = _kinds(path)
            run_id, status = _last_run(out, subject, session)
            key = (subject, session)
            mtime = path.stat().st_mtime
            if key in rows:
                older, newer = (rows[key].output_dir, out) if mtime >= mtimes[key] else \
                    (out, rows[key].output_dir)
                notes.append(f"sub-{subject}{f' ses-{session}' if session else ''} is in "
                             f"{older} and {newer}: the newer table ({newer}) is used")
                if mtime < mtimes[key]:
                    continue
            mtimes[key] = mtime
            rows[key] = ParticipantRow(subject, session, out, values, units, kinds, run_id,
                                       status, computed)
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] or ""))]
    computed = [r.participant for r in ordered if r.computed_now]
    if computed:
        notes.append(f"{len(computed)} participant(s) had no stored IQM table for this "
                     "request, computed now from their derivatives: "
                     + ", ".join(computed[:20]) + (" ..." if len(computed) > 20 else ""))
    return ordered, notes


def _kinds(path: Path) -> dict[str, str]:
    kinds = {}
    with Path(path).open(newline="") as handle:
        lines = [ln for ln in handle if not ln.startswith("#")]
    for row in csv.DictReader(lines, delimiter="\t"):
        if "metric" in row:
            kinds[row["metric"]] = row.get("kind", "") or ""
    return kinds


def _write_table(path: Path, rows: Sequence[ParticipantRow], metrics: Sequence[str],
                 outliers: dict[tuple[int, str], float], sessions: bool) -> Path:
    from qmri_bids.artifacts import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(["participant_id", *(["session_id"] if sessions else []), *metrics,
                     "outliers"])
    for i, r in enumerate(rows):
        vals = [r.values.get(m, float("nan")) for m in metrics]
        flagged = [m for m in metrics if (i, m) in outliers]
        writer.writerow([f"sub-{r.subject}", *([f"ses-{r.session}" if r.session else "n/a"]
                                              if sessions else []),
                         *("n/a" if not np.isfinite(v) else f"{v:.6g}" for v in vals),
                         ",".join(flagged) or "n/a"])
    return atomic_write_text(path, buf.getvalue())


#: bias metrics shown as strips (the field's percentiles stay in the table)
BIAS_PLOTTED = ("cv_before", "cv_after", "cjv_before", "cjv_after", "field_range")


def _plot_order(metric: str) -> tuple:
    """Strips in reading order: per image/collection, per map in MAP_ORDER, then the
    statistic in a fixed order."""
    from qmri_bids.reports.layout import MAP_ORDER

    stats = (*BIAS_PLOTTED, "median", "iqr")
    stat = next((s for s in stats if metric.endswith("_" + s)), "")
    base = metric[: -len(stat) - 1] if stat else metric
    parts = base.split("_")
    map_rank = next((MAP_ORDER.index(p) for p in parts if p in MAP_ORDER), len(MAP_ORDER))
    return (parts[0], map_rank, base, stats.index(stat) if stat else len(stats))


def _sections(metrics_by_kind: dict[str, list[str]], matrix: dict[str, np.ndarray],
              labels: list[str], units: dict[str, str], threshold: float) -> list[dict]:
    """Figures grouped by image / collection: bias metrics per image type, map metrics per
    collection (median and IQR of each map), ROI medians per collection."""
    from qmri_bids.reports.participant import _Figures

    figs = _Figures()
    out = []
    red = f"Each dot is a participant; red: |robust z| > {threshold:g}."
    titles = {"bias": ("bias", "Bias-field correction",
                       ("Per anatomical image and method: within-class CV and CJV before and "
                        "after correction, and the spread of the estimated field (p99 - p1) "
                        f"inside the object. {red}")),
              "map": ("qmri", "Quantitative maps",
                      ("Median and interquartile range of every map inside the object "
                       f"(voxels the mapping estimated), per collection. {red}")),
              "roi": ("roi", "Maps per label",
                      f"Median of each map per label of the segmentation. {red}")}
    for kind in ("bias", "map", "roi"):
        names = sorted(metrics_by_kind.get(kind, []), key=_plot_order)
        wanted = {"bias": BIAS_PLOTTED, "map": ("median", "iqr"), "roi": ("median",)}[kind]
        names = [m for m in names if m.rsplit("_", 1)[-1] in wanted
                 or any(m.endswith("_" + w) for w in wanted)]
        if not names:
            continue
        groups: dict[str, list[str]] = {}
        for m in names:
            groups.setdefault(m.split("_", 1)[0], []).append(m)
        anchor, title, caption = titles[kind]
        section_figs = []
        for group, members in groups.items():
            for start in range(0, len(members), STRIPS_PER_FIGURE):
                chunk = members[start:start + STRIPS_PER_FIGURE]
                cols = [(f"{m}" + (f" ({units[m]})" if units.get(m) else ""), matrix[m])
                        for m in chunk]
                svg = fg.strip_plot_svg(cols, labels, threshold=threshold,
                                        title=f"{group}" + (f" ({start // STRIPS_PER_FIGURE + 1})"
                                                            if len(members) > STRIPS_PER_FIGURE
                                                            else ""))
                section_figs.append(figs.svg(svg, title="", alt=f"{group} strip plot"))
        out.append({"anchor": anchor, "title": title, "caption": caption,
                    "figures": section_figs})
    return out


def build_group_report(output_dirs: Path | Sequence[Path], out_dir: Path | None = None, *,
                       roi_dseg: Path | None = None,
                       participant_labels: Iterable[str] | None = None,
                       threshold: float = ROBUST_Z) -> GroupResult:
    """Group tables and ``group_report.html`` of the participants in ``output_dirs`` (one
    folder or several: outputs of several runs), written to ``out_dir`` (default: the first
    folder). ``roi_dseg``: a segmentation (file, or a derivatives folder with per-participant
    ``*_dseg.nii.gz``) for per-label statistics; dsegs inside the outputs are used anyway.
    """
    from qmri_bids import __version__
    from qmri_bids.reports.templates import CSS, environment

    dirs = [Path(output_dirs)] if isinstance(output_dirs, (str, Path)) else \
        [Path(d) for d in output_dirs]
    if not dirs:
        raise ValueError("no output folder given")
    out_dir = Path(out_dir) if out_dir is not None else dirs[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, notes = collect(dirs, roi_dseg=roi_dseg, participant_labels=participant_labels)
    result = GroupResult(out_dir / "group_report.html", n_participants=len(rows),
                         computed_now=[r.participant for r in rows if r.computed_now])
    units: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for r in rows:
        units.update(r.units)
        kinds.update(r.kinds)
    by_kind: dict[str, list[str]] = {}
    for metric in sorted(kinds):
        by_kind.setdefault(kinds[metric], []).append(metric)
    matrix = {m: np.array([r.values.get(m, np.nan) for r in rows], dtype=np.float64)
              for m in kinds}
    outliers: dict[tuple[int, str], float] = {}
    for m, column in matrix.items():
        if m.endswith("_n"):
            continue  # voxel counts: a field-of-view difference, not a quality problem
        z = fg.robust_z(column)
        for i in np.flatnonzero(np.abs(np.nan_to_num(z)) > threshold):
            outliers[(int(i), m)] = float(z[i])
    sessions = any(r.session for r in rows)
    for kind, name in TABLES.items():
        metrics = by_kind.get(kind, [])
        if metrics:
            result.tables.append(_write_table(out_dir / name, rows, metrics,
                                              {k: v for k, v in outliers.items()
                                               if kinds.get(k[1]) == kind}, sessions))
    labels = [r.participant for r in rows]
    sections = _sections(by_kind, matrix, labels, units, threshold)
    ordered = sorted(outliers.items(), key=lambda kv: -abs(kv[1]))
    result.outliers = [(labels[i], m, float(matrix[m][i]), z) for (i, m), z in ordered]

    def link(r: ParticipantRow) -> str:
        report = r.output_dir / (r.participant + ".html")
        if not report.is_file():
            return ""
        return os.path.relpath(report, out_dir)

    links = {r.participant: link(r) for r in rows}
    n_out = {lab: 0 for lab in labels}
    for (i, _m) in outliers:
        n_out[labels[i]] += 1
    nav = [("summary", "Summary")] + ([("outliers", "Outliers")] if outliers else []) + \
        [(s["anchor"], s["title"]) for s in sections] + [("participants", "Participants")]
    if not rows:
        notes.append("No participant with derivatives was found.")
    elif len(rows) < fg.MIN_FOR_OUTLIERS:
        notes.append(f"Outliers are flagged from {fg.MIN_FOR_OUTLIERS} participants on "
                     f"(a median and MAD of {len(rows)} values do not separate outliers "
                     "from noise).")
    html = environment().get_template("group.html").render(
        title="qmri-bids group report", css=CSS, version=__version__,
        generated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), source="",
        nav=nav, n_participants=len(rows), output_dirs=[str(d) for d in dirs],
        tables=[t.name for t in result.tables], threshold=f"{threshold:g}",
        n_outliers=len(outliers), notes=notes,
        outliers=[{"participant": p, "metric": m, "value": v, "z": z,
                   "link": links.get(p, "")} for p, m, v, z in
                  result.outliers[:MAX_OUTLIER_ROWS]],
        more_outliers=max(0, len(result.outliers) - MAX_OUTLIER_ROWS),
        sections=sections,
        participants=[{"participant": r.participant, "run_id": r.run_id, "status": r.status,
                       "n_outliers": n_out[r.participant], "link": links[r.participant]}
                      for r in rows])
    from qmri_bids.artifacts import atomic_write_text

    atomic_write_text(result.html, html)
    LOGGER.info("group report: %s (%d participants, %d outlier values)", result.html,
                len(rows), len(outliers))
    return result
