"""The participant report ``sub-<label>[_ses-<label>].html`` at the root of the output folder.

Built from the participant's derivatives and its newest run record (:mod:`.record`), never
from the work dir; the IQM table (:mod:`.iqm`) is written at the same time from the arrays
loaded for the figures.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmri_bids.reports import figures as fg
from qmri_bids.reports.citation import Citation, methods_from, render_citation
from qmri_bids.reports.iqm import (
    Metric,
    bias_metrics,
    collection_mask,
    dseg_candidates,
    iqm_path,
    load_bias_images,
    load_volume,
    map_metrics,
    segmentation_for,
    write_iqms,
)
from qmri_bids.reports.layout import (
    CRBSD,
    AnatDerivatives,
    CollectionDerivatives,
    ParticipantDerivatives,
    scan_participant,
)
from qmri_bids.reports.record import (
    CrashRecord,
    InputRecord,
    RunRecord,
    collect_crashes,
    find_run_records,
    read_run_record,
)

LOGGER = logging.getLogger("qmri_bids.reports")

#: protocol fields shown per collection, in this order, with their units
PROTOCOL_FIELDS = (("MagneticFieldStrength", "T"), ("FlipAngle", "deg"),
                   ("RefocusingFlipAngle", "deg"), ("RepetitionTimeExcitation", "s"),
                   ("RepetitionTime", "s"), ("RepetitionTimePreparation", "s"),
                   ("InversionTime", "s"), ("EchoTime", "s"),
                   ("MTState", ""), ("NumberShots", ""), ("B1Map", ""),
                   ("ExcludedSources", ""))
REFERENCE_NAMES = {"nlls": "NLLS", "dict": "dictionary"}
CRASH_TEXT_LIMIT = 20000


@dataclass
class Figure:
    id: str
    kind: str  # "png" (data URI) or "svg" (inline element)
    data: str
    title: str = ""
    caption: str = ""
    alt: str = ""


def anchor(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower()


_SVG_ID = re.compile(r'\bid="([^"]+)"')


def scope_svg_ids(svg: str, prefix: str) -> str:
    """Prefix every ``id`` of an inline SVG and the references to it: several matplotlib SVGs
    in one page otherwise share ids (``figure_1``, clip paths), and a ``url(#...)`` could
    resolve into another figure."""
    ids = set(_SVG_ID.findall(svg))
    if not ids:
        return svg

    def sub_id(m: re.Match) -> str:
        return f'id="{prefix}{m.group(1)}"'

    svg = _SVG_ID.sub(sub_id, svg)
    return re.sub(r"(url\(#|href=\"#)([^)\"]+)",
                  lambda m: m.group(1) + (prefix + m.group(2) if m.group(2) in ids
                                          else m.group(2)), svg)


class _Figures:
    """Unique ids for the figures of one page."""

    def __init__(self) -> None:
        self.count = 0

    def png(self, data: str, **kw: str) -> Figure:
        self.count += 1
        return Figure(f"fig{self.count}", "png", data, **kw)

    def svg(self, data: str, **kw: str) -> Figure:
        self.count += 1
        return Figure(f"fig{self.count}", "svg", scope_svg_ids(data, f"f{self.count}-"), **kw)


# ------------------------------------------------------------------------------ summary


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 60:
        return f"{value:.1f} s"
    minutes, sec = divmod(round(value), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else \
        f"{minutes // 60} h {minutes % 60:02d} min"


def _wall(record: RunRecord) -> str:
    try:
        start = _dt.datetime.fromisoformat(record.started)
        end = _dt.datetime.fromisoformat(record.finished or "")
    except ValueError:
        return ""
    return _seconds((end - start).total_seconds())


def _matches_sources(meta: dict[str, Any], files: Iterable[str]) -> bool:
    names = {Path(str(s)).name for s in meta.get("Sources", []) or []}
    return bool(names & {Path(f).name for f in files})


def match_anat(item: InputRecord, deriv: ParticipantDerivatives) -> AnatDerivatives | None:
    for anat in deriv.anat:
        if any(_matches_sources(o.meta, item.files) for o in anat.methods.values()):
            return anat
    return None


def match_collection(item: InputRecord,
                     deriv: ParticipantDerivatives) -> CollectionDerivatives | None:
    for col in deriv.collections:
        if col.collection == item.suffix and any(_matches_sources(m.meta, item.files)
                                                 for m in col.maps):
            return col
    return None


def step_view(item: InputRecord, deriv: ParticipantDerivatives, record: RunRecord
              ) -> list[dict[str, str]]:
    """Per step: ran (its outputs exist), failed (a node of the input crashed), skipped (with
    the reason) or not run (the run stopped before it)."""
    mine = [f".{w}." for w in (item.workflow, item.sink_workflow) if w]
    crashed = any(k in f".{c.node}." for c in record.crashes for k in mine)
    anat = match_anat(item, deriv) if item.kind == "anat" else None
    col = match_collection(item, deriv) if item.kind == "collection" else None
    out = []
    for step in item.steps:
        name = step.name.replace("bias-", "")
        if step.status == "skipped":
            out.append({"css": "skipped", "text": f"{name}: skipped", "reason": step.reason})
            continue
        if item.kind == "anat":
            done = anat is not None and name in anat.methods
        elif step.name in ("nn", "closed-form", "train"):
            done = col is not None and bool(col.primary())
        else:
            done = col is not None and step.name in col.references()
        if done:
            out.append({"css": "ok", "text": name, "reason": ""})
        elif crashed:
            out.append({"css": "failed", "text": f"{name}: failed", "reason": ""})
        else:
            out.append({"css": "notrun", "text": f"{name}: not run", "reason": ""})
    return out


def timing_rows(record: RunRecord) -> list[dict[str, str]]:
    owner: dict[str, str] = {}
    for item in record.inputs:
        for node in record.nodes_of(item):
            owner[node.name] = item.label
    rows = []
    for node in record.nodes:
        parts = node.name.split(".")
        # Drop the top and participant workflow names: they are the same on every row.
        short = ".".join(parts[2:]) if len(parts) > 2 else node.name
        css = {"done": "ok", "cached": "notrun", "failed": "failed"}.get(node.status, "notrun")
        rows.append({"input": owner.get(node.name, "-"), "node": short, "status": node.status,
                     "css": css, "duration": _seconds(node.duration_s),
                     "mem": "n/a" if node.mem_gb is None else f"{node.mem_gb:.2f} GB",
                     "peak": "n/a" if node.peak_mem_gb is None else f"{node.peak_mem_gb:.2f} GB"})
    return rows


def _efficiency_text(validation: Any) -> str:
    """``validation.efficiency_median`` of a model card as ``SNR 20: T1 1.01; ...``."""
    if not isinstance(validation, dict):
        return ""
    eff = validation.get("efficiency_median")
    if not isinstance(eff, dict):
        return ""
    parts = []
    for snr, values in sorted(eff.items(), key=lambda kv: float(kv[0])):
        if isinstance(values, dict):
            inner = ", ".join(f"{p} {float(v):.3f}" for p, v in values.items())
            parts.append(f"SNR {snr}: {inner}")
    return ("efficiency CRB/MSE, median over the validation grid: " + "; ".join(parts)) \
        if parts else ""


def _network_step(record: RunRecord | None, collection: str) -> dict[str, Any]:
    if record is None:
        return {}
    for item in record.inputs:
        if item.kind == "collection" and item.suffix == collection:
            for step in item.steps:
                if step.name in ("nn", "train") and step.detail:
                    return dict(step.detail)
    return {}


def model_rows(record: RunRecord | None, deriv: ParticipantDerivatives) -> list[dict[str, str]]:
    rows = []
    seen = set()
    for anat in deriv.anat:
        out = anat.methods.get("cnn")
        if out is not None and out.meta.get("Model") and out.meta["Model"] not in seen:
            seen.add(out.meta["Model"])
            rows.append({"used_for": "bias-field CNN", "name": str(out.meta["Model"]),
                         "origin": "shipped", "sha256": str(out.meta.get("ModelSHA256", "")),
                         "validation": ""})
    for col in deriv.collections:
        est = col.common_meta.get("Estimator")
        if not isinstance(est, dict) or est.get("Name") in seen:
            continue
        seen.add(est.get("Name"))
        detail = _network_step(record, col.collection)
        origin = ("trained on demand" if detail.get("train_on_demand") else
                  "shipped" if detail.get("shipped") else
                  "model cache" if detail else "n/a")
        validation = _efficiency_text(est.get("Validation")) or \
            _efficiency_text(detail.get("validation"))
        rows.append({"used_for": f"{col.collection} network", "name": str(est.get("Name", "")),
                     "origin": origin, "sha256": str(est.get("SHA256", "")),
                     "validation": validation or "not recorded"})
    return rows


# ------------------------------------------------------------------------------ sections


def _fmt_value(value: Any, unit: str) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return f"{value:g}" + (f" {unit}" if unit else "")
    if isinstance(value, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            text = ", ".join(f"{v:g}" for v in value)
            return text + (f" {unit}" if unit else "")
        return "; ".join(str(v) for v in value)
    return str(value)


def protocol_rows(col: CollectionDerivatives) -> list[tuple[str, str]]:
    """The acquisition parameters in the maps' sidecar; ``SourceParameters`` holds those that
    vary across the members but must be single numbers in BIDS (InversionTime...)."""
    meta = col.common_meta
    units = dict(PROTOCOL_FIELDS)
    per_source = meta.get("SourceParameters")
    per_source = per_source if isinstance(per_source, dict) else {}
    rows = [(key, _fmt_value(meta[key], unit)) for key, unit in PROTOCOL_FIELDS
            if key in meta and meta[key] not in (None, [], "")]
    rows += [(f"{key} (per source file)", _fmt_value(value, units.get(key, "")))
             for key, value in per_source.items()]
    return rows or [("(none recorded)", "")]


def estimator_rows(col: CollectionDerivatives, record: RunRecord | None
                   ) -> list[tuple[str, str]]:
    meta = col.common_meta
    rows = [("Algorithm", str(meta.get("EstimationAlgorithm", "n/a")))]
    est = meta.get("Estimator")
    if isinstance(est, dict):
        detail = _network_step(record, col.collection)
        origin = ("trained on demand for this protocol" if detail.get("train_on_demand") else
                  "shipped with qmri-bids" if detail.get("shipped") else
                  "from the model cache" if detail else "")
        rows.append(("Network", f"{est.get('Name', 'n/a')}" + (f" ({origin})" if origin
                                                              else "")))
        rows.append(("Training loss", str(est.get("Loss", "n/a"))))
        validation = _efficiency_text(est.get("Validation")) or \
            _efficiency_text(detail.get("validation"))
        rows.append(("Validation", validation or "not recorded"))
    sigma = meta.get("NoiseSigma")
    rows.append(("Noise sigma", "n/a" if sigma is None else f"{float(sigma):.4g} "
                 "(image intensity units)"))
    rows.append(("Noise estimation", str(meta.get("NoiseEstimation", "n/a"))))
    refs = col.references()
    rows.append(("Reference estimators", ", ".join(REFERENCE_NAMES[r] for r in refs) or
                 "none ran"))
    if record is not None:
        skipped = [f"{s.name} ({s.reason})" for item in record.inputs
                   if item.kind == "collection" and item.suffix == col.collection
                   for s in item.steps if s.status == "skipped"]
        if skipped:
            rows.append(("Skipped", "; ".join(skipped)))
    return rows


def bias_section(anat: AnatDerivatives, figs: _Figures, metrics: list[Metric]
                 ) -> dict[str, Any] | None:
    try:
        images = load_bias_images(anat)
    except ValueError as exc:
        LOGGER.warning("bias figures of %s skipped: %s", anat.key, exc)
        return None
    found = bias_metrics(anat, images)
    metrics += found
    values = {m.metric: m.value for m in found}
    data_before, zooms = fg.canonical(_like(images.before, images.img))
    mask_c = fg.canonical(_like(images.mask.astype(np.float32), images.img))[0] > 0.5
    rows, panels = [], []
    prefix = found[0].item if found else anat.key
    for method in anat.methods:
        after = fg.canonical(_like(images.corrected[method], images.img))[0]
        field_ = images.fields.get(method)
        field_c = fg.canonical(_like(field_, images.img))[0] if field_ is not None else None
        title = {"cnn": "CNN (implicitly trained)", "n4": "N4 (SimpleITK)"}.get(method, method)
        uri = fg.bias_mosaic(data_before, after, field_c, mask_c, zooms,
                             f"{anat.suffix}: {title}")
        panels.append(figs.png(uri, title=title, alt=f"{anat.key} {method} before and after",
                               caption=("Rows: uncorrected image with the estimated field as "
                                        "contours (levels from its 2nd to 98th percentile in "
                                        "the object), then the corrected image; each image "
                                        "windowed to its own 0.5-99.5th percentiles.")))
        rows.append({"method": title, **{k: values.get(f"{prefix}_{method}_{k}")
                                         for k in ("field_p01", "field_p99", "cv_before",
                                                   "cv_after", "cjv_before", "cjv_after")}})
    both = len(images.corrected) >= 2
    caption = ("Inside the object (foreground mask of the uncorrected image). Classes: 3-class "
               "k-means of " + ("the geometric mean of the CNN- and N4-corrected images, so "
                                "neither method decides the segmentation" if both else
                                "the geometric mean of the uncorrected and corrected images")
               + ". CJV between the classes playing grey and white matter ("
               + ("two brightest" if anat.suffix == "T1w" else "two darkest")
               + f" for {anat.suffix}). Lower is more uniform.")
    return {"anchor": anchor(f"bias-{anat.key}"), "title": f"{anat.suffix} ({anat.key})",
            "rows": rows, "figures": panels, "metrics_caption": caption}


def _like(data: np.ndarray, img: Any):
    import nibabel as nib

    return nib.Nifti1Image(np.asarray(data, np.float32), img.affine)


def collection_section(col: CollectionDerivatives, figs: _Figures, metrics: list[Metric],
                       record: RunRecord | None, candidates: list,
                       used_segs: list[Path]) -> dict[str, Any] | None:
    found = collection_mask(col)
    if found is None:
        return None
    mask, img = found
    seg = segmentation_for(col, mask.shape, img.affine, candidates) if candidates else None
    if seg is not None:
        used_segs.append(seg.path)
    metrics += map_metrics(col, seg, found)
    mask_c, zooms = fg.canonical(_like(mask.astype(np.float32), img))
    mask_c = mask_c > 0.5
    maps = []
    for pmap in [*col.primary(), *col.others()]:
        data = fg.canonical(_like(load_volume(pmap.path)[0], img))[0]
        sd_file = col.get(pmap.suffix, CRBSD) if pmap.desc is None else None
        sd = fg.canonical(_like(load_volume(sd_file.path)[0], img))[0] if sd_file else None
        units = pmap.units
        mosaic = figs.png(
            fg.map_mosaic(data, mask_c, zooms, label=pmap.suffix, units=units, sd=sd),
            alt=f"{pmap.suffix} map", caption=(
                f"{pmap.path.name}" + (f" and its Cramér-Rao SD map {sd_file.path.name}"
                                       if sd_file else " (no CRB SD map)")
                + f"; colour bars in {units or 'no unit'} (sidecar Units), range 1st-99th "
                  "percentile inside the object (voxels the mapping estimated)."))
        refs = {REFERENCE_NAMES[d]: fg.canonical(_like(load_volume(r.path)[0], img))[0]
                for d in col.references()
                if pmap.desc is None and (r := col.get(pmap.suffix, d)) is not None}
        plots = [figs.svg(fg.histogram_svg(data[mask_c], label=pmap.suffix, units=units,
                                           overlays={k: v[mask_c] for k, v in refs.items()}),
                          caption="Histogram inside the object; black line: median, grey: "
                                  "interquartile range" + ("; outlines: reference estimates"
                                                           if refs else "") + ".")]
        for name, ref in refs.items():
            svg, stats = fg.agreement_svg(ref[mask_c], data[mask_c], label=pmap.suffix,
                                          units=units, reference_name=name)
            med = stats.get("median_difference")
            spread = (f"; dotted: 95 % of the differences within [{stats['loa_low']:.4g}, "
                      f"{stats['loa_high']:.4g}] {units}" if med is not None else "")
            plots.append(figs.svg(svg, caption=(
                f"Network against {name} in {stats['n']} voxels: density (dashed: identity) "
                f"and Bland-Altman (red: median difference"
                + (f" {med:.4g} {units}" if med is not None else "") + spread + ").")))
        label = pmap.suffix + (f" (desc-{pmap.desc})" if pmap.desc else "")
        maps.append({"anchor": anchor(f"map-{col.key}-{pmap.suffix}-{pmap.desc or ''}"),
                     "title": label + (f", {units}" if units else ""),
                     "mosaic": mosaic, "plots": plots})
    entity_text = ", ".join(f"{k}-{v}" for k, v in col.entities.items()
                            if k not in ("sub", "ses"))
    return {"anchor": anchor(f"qmri-{col.key}"),
            "title": f"{col.collection} ({entity_text})",
            "protocol": protocol_rows(col), "estimator": estimator_rows(col, record),
            "maps": maps}


def crash_views(crashes: Iterable[CrashRecord], output_dir: Path) -> list[dict[str, str]]:
    out = []
    for c in crashes:
        text = ""
        if c.path and Path(c.path).is_file():
            text = Path(c.path).read_text(errors="replace")[:CRASH_TEXT_LIMIT]
        path = c.path or ""
        try:
            path = str(Path(path).resolve().relative_to(Path(output_dir).resolve())) if path \
                else ""
        except ValueError:
            pass
        out.append({"node": c.node, "message": c.message, "path": path, "text": text})
    return out


# ------------------------------------------------------------------------------ build


def report_path(output_dir: Path, subject: str, session: str | None = None) -> Path:
    return Path(output_dir) / (f"sub-{subject}" + (f"_ses-{session}" if session else "")
                               + ".html")


def build_participant_report(output_dir: Path, subject: str, session: str | None = None, *,
                             roi_dseg: Path | None = None,
                             record: RunRecord | None = None) -> Path:
    """Write ``sub-<subject>[_ses-<session>].html`` (and the IQM table) into ``output_dir``.

    ``record``: the run record to report (default: the participant's newest one). Returns the
    report's path. Reads only ``output_dir`` (and ``roi_dseg``).
    """
    from qmri_bids import __version__
    from qmri_bids.reports.templates import CSS, environment

    output_dir = Path(output_dir)
    subject = subject.removeprefix("sub-")
    deriv = scan_participant(output_dir, subject, session)
    paths = find_run_records(output_dir, subject, session)
    history = []
    for p in paths:
        try:
            history.append(read_run_record(p))
        except ValueError as exc:
            LOGGER.warning("%s", exc)
    if record is None and history:
        record = history[-1]
    problems = []
    crashes: list[CrashRecord] = []
    if record is not None:
        crashes = list(record.crashes)
        if record.status != "finished" or record.exit_code not in (0, None):
            problems.append(f"The run {record.run_id} ended with status '{record.status}'"
                            + (f" (exit code {record.exit_code})"
                               if record.exit_code is not None else "") + ".")
    else:
        logs = sorted((output_dir / f"sub-{subject}" / "log").glob("*/"))
        if logs:
            crashes = collect_crashes(logs[-1])
    if deriv.empty:
        problems.append("No derivatives were found for this participant.")
    if crashes:
        problems.append(f"{len(crashes)} node(s) failed: see Errors.")

    figs = _Figures()
    metrics: list[Metric] = []
    bias = [s for a in deriv.anat if (s := bias_section(a, figs, metrics)) is not None]
    candidates = dseg_candidates(roi_dseg, subject, session, deriv.dsegs)
    used_segs: list[Path] = []
    collections = [s for c in deriv.collections
                   if (s := collection_section(c, figs, metrics, record, candidates,
                                               used_segs)) is not None]
    write_iqms(iqm_path(output_dir, subject, session), metrics,
               {"dseg": ";".join(str(p) for p in dict.fromkeys(used_segs))})

    citation = render_citation(methods_from([record] if record else [], [deriv]))
    inputs = []
    if record is not None:
        for item in record.inputs:
            inputs.append({"label": item.label, "suffix": item.suffix,
                           "n_files": len(item.files),
                           "steps": step_view(item, deriv, record),
                           "excluded": [tuple(e) for e in item.excluded]})
    software = list((record.software if record else {}).items())
    if record is not None and record.python:
        software.append(("python", record.python))
    participant = f"sub-{subject}" + (f" ses-{session}" if session else "")
    nav = [("summary", "Summary")]
    if bias:
        nav.append(("bias", "Bias correction"))
    if collections:
        nav.append(("qmri", "qMRI"))
    nav += [("methods", "Methods"), ("errors", f"Errors ({len(crashes)})")]
    settings = ""
    if record is not None:
        s = record.settings
        settings = (f"bias methods: {', '.join(s.get('bias_methods', []) or ['none'])}; "
                    f"qMRI estimators requested: "
                    f"{', '.join(s.get('qmri_estimators', []) or ['none'])}; "
                    f"{s.get('nprocs', '?')} processes x {s.get('omp_nthreads', '?')} threads, "
                    f"{s.get('mem_gb', '?')} GB")
    html = environment().get_template("participant.html").render(
        title=f"{participant}: qmri-bids report", css=CSS, version=__version__,
        generated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        source=str(paths[-1].relative_to(output_dir)) if paths else "", nav=nav,
        participant=participant, record=record, wall=_wall(record) if record else "",
        settings=settings, problems=problems, inputs=inputs,
        skipped=record.skipped if record else [], software=software,
        models=model_rows(record, deriv), timings=timing_rows(record) if record else [],
        history=[{"run_id": r.run_id, "status": r.status, "exit_code": r.exit_code,
                  "started": r.started} for r in history],
        bias=bias, collections=collections, boilerplate=citation.html,
        crashes=crash_views(crashes, output_dir))
    from qmri_bids.artifacts import atomic_write_text

    out = report_path(output_dir, subject, session)
    atomic_write_text(out, html)
    LOGGER.info("participant report: %s (%d figures)", out, figs.count)
    return out


def output_citation(output_dir: Path,
                    participants: Iterable[tuple[str, str | None]] | None = None) -> Citation:
    """The methods of a whole output folder: every participant's newest run record and
    derivatives (what ran anywhere is described once)."""
    from qmri_bids.reports.layout import participants as all_participants

    chosen = list(participants) if participants is not None else all_participants(output_dir)
    records, derivs = [], []
    for subject, session in chosen:
        paths = find_run_records(output_dir, subject, session)
        for p in reversed(paths):
            try:
                records.append(read_run_record(p))
                break
            except ValueError as exc:
                LOGGER.warning("%s", exc)
        derivs.append(scan_participant(output_dir, subject, session))
    return render_citation(methods_from(records, derivs))


@dataclass
class ReportSet:
    """What :func:`build_reports` wrote, and which participants failed (label, why)."""

    reports: list[Path] = field(default_factory=list)
    citation: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def build_reports(output_dir: Path, participant_labels: Iterable[str] | None = None, *,
                  roi_dseg: Path | None = None) -> ReportSet:
    """Every participant report of ``output_dir`` (or of ``participant_labels``) and
    ``logs/CITATION.{md,bib,html}``: what ``--reports-only`` does. A participant whose report
    fails is logged and listed in ``failed``; the others are still written."""
    from qmri_bids.reports.citation import write_citation
    from qmri_bids.reports.layout import participants as all_participants

    wanted = None if participant_labels is None else {
        str(x).removeprefix("sub-") for x in participant_labels}
    chosen = [(s, ses) for s, ses in all_participants(output_dir)
              if wanted is None or s in wanted]
    result = ReportSet()
    for subject, session in chosen:
        try:
            result.reports.append(build_participant_report(output_dir, subject, session,
                                                           roi_dseg=roi_dseg))
        except Exception as exc:  # noqa: BLE001 - one broken participant must not stop the rest
            LOGGER.error("report of sub-%s%s failed: %s", subject,
                         f" ses-{session}" if session else "", exc)
            result.failed.append((subject if not session else f"{subject}_ses-{session}",
                                  f"{type(exc).__name__}: {exc}"))
    if chosen:
        result.citation = write_citation(output_dir, output_citation(output_dir, chosen))
    return result
