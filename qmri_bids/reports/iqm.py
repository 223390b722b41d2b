"""Image quality metrics of one participant, computed from its derivatives and stored, so that
the group level only reads small tables.

Stored as ``sub-<label>/qc/sub-<label>[_ses-<label>]_desc-iqm.tsv`` (``*/qc`` is in
``.bidsignore``), long format: one row per metric, columns ``metric kind item units value``.
``metric`` is the column name the group table uses (``T1w_cnn_cv_after``,
``vfa_T1map_median``, ``vfa_T1map_WM_median``...).

Bias metrics (per anatomical image and method; :mod:`qmri_bids.bias.metrics`):

* ``field_p01``, ``field_p99``, ``field_range`` (p99 - p1): the stored field inside the
  object (the CNN's foreground mask of the uncorrected image);
* ``cv_before``/``cv_after``: within-class CV of the uncorrected and the corrected image, on
  3 k-means classes of the geometric mean of the two corrected images when CNN and N4 both
  ran (neither method decides the segmentation), else of the uncorrected and corrected image;
* ``cjv_before``/``cjv_after``: CJV of the grey/white-matter-like classes (the two brightest
  of T1w, the two darkest of T2w and other images).

The uncorrected image is the corrected one times the field (what the writers store:
corrected = raw / field), so only derivatives are read.

Map metrics (per map, reference estimate and CRB SD map): ``median``, ``q1``, ``q3``,
``iqr`` and ``n`` inside the object (voxels where the collection's primary maps are finite
and non-zero: the voxels the mapping estimated), and the same per label of a segmentation.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmri_bids.reports.layout import (
    AnatDerivatives,
    CollectionDerivatives,
    ParticipantDerivatives,
    participant_folder,
    scan_participant,
    split_name,
)

LOGGER = logging.getLogger("qmri_bids.reports")

IQM_COLUMNS = ("metric", "kind", "item", "units", "value")
MAP_STATS = ("median", "q1", "q3", "iqr", "n")


@dataclass(frozen=True)
class Metric:
    metric: str
    kind: str  # "bias", "map" or "roi"
    item: str  # the image or collection (and map) it belongs to
    units: str
    value: float


def iqm_path(output_dir: Path, subject: str, session: str | None = None) -> Path:
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_desc-iqm.tsv"
    return Path(output_dir) / f"sub-{subject}" / "qc" / name


# ------------------------------------------------------------------------------ loading


def load_volume(path: Path) -> tuple[np.ndarray, object]:
    """Float data (first volume of a 4-D file) and the image."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    return data, img


def uncorrected(corrected: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The image before correction: the writers store corrected = raw / field."""
    return corrected * field


def bias_mask(before: np.ndarray) -> np.ndarray:
    from qmri_bids.bias.cnn import foreground_mask

    return foreground_mask(before)


def cjv_classes(suffix: str) -> tuple[int, int]:
    """Which two of the three k-means classes (0 darkest) play grey and white matter."""
    return (1, 2) if suffix == "T1w" else (0, 1)


@dataclass
class BiasImages:
    """The arrays of one anatomical image shared by the figures and the metrics."""

    before: np.ndarray
    corrected: dict[str, np.ndarray]
    fields: dict[str, np.ndarray]
    mask: np.ndarray
    classes: np.ndarray
    img: object


def load_bias_images(anat: AnatDerivatives) -> BiasImages:
    corrected, fields = {}, {}
    img = None
    for method, out in anat.methods.items():
        corrected[method], img = load_volume(out.corrected)
        if out.field is not None:
            fields[method] = load_volume(out.field)[0]
    # The uncorrected image from the first method that stored its field.
    first = next((m for m in anat.methods if m in fields), None)
    if first is None:
        raise ValueError(f"{anat.key}: no bias field stored, so the uncorrected image is "
                         "unknown")
    before = uncorrected(corrected[first], fields[first])
    mask = bias_mask(before)
    from qmri_bids.bias.metrics import neutral_classes

    if len(corrected) >= 2:
        a, b = list(corrected.values())[:2]
        classes = neutral_classes(a, b, mask)
    else:
        classes = neutral_classes(before, corrected[first], mask)
    return BiasImages(before, corrected, fields, mask, classes, img)


def bias_metrics(anat: AnatDerivatives, images: BiasImages | None = None) -> list[Metric]:
    from qmri_bids.bias.metrics import coefficient_of_joint_variation, within_class_cv

    im = images if images is not None else load_bias_images(anat)
    item = anat.key.replace(f"sub-{anat.entities.get('sub')}_", "")
    item = item.replace(f"ses-{anat.entities.get('ses')}_", "") if anat.entities.get("ses") \
        else item
    a, b = cjv_classes(anat.suffix)
    ca, cb = im.classes == a, im.classes == b
    out: list[Metric] = []
    cv_before = within_class_cv(im.before, im.classes)
    cjv_before = coefficient_of_joint_variation(im.before, ca, cb) if ca.any() and cb.any() \
        else float("nan")
    for method, corr in im.corrected.items():
        prefix = f"{item}_{method}"
        vals = [("cv_before", cv_before), ("cv_after", within_class_cv(corr, im.classes)),
                ("cjv_before", cjv_before),
                ("cjv_after", coefficient_of_joint_variation(corr, ca, cb)
                 if ca.any() and cb.any() else float("nan"))]
        field = im.fields.get(method)
        if field is not None and im.mask.any():
            f = field[im.mask]
            f = f[np.isfinite(f)]
            p1, p99 = (np.percentile(f, [1, 99]) if f.size else (np.nan, np.nan))
            vals += [("field_p01", float(p1)), ("field_p99", float(p99)),
                     ("field_range", float(p99 - p1))]
        out += [Metric(f"{prefix}_{k}", "bias", item, "", float(v)) for k, v in vals]
    return out


# ------------------------------------------------------------------------------ maps


def collection_mask(col: CollectionDerivatives) -> tuple[np.ndarray, object] | None:
    """The voxels the mapping estimated: finite, non-zero values in every primary map."""
    mask, img = None, None
    for m in col.primary():
        data, img = load_volume(m.path)
        ok = np.isfinite(data) & (data != 0)
        mask = ok if mask is None else (mask & ok if mask.shape == ok.shape else mask)
    if mask is None:
        return None
    return mask, img


def map_label(col: CollectionDerivatives, suffix: str, desc: str | None) -> str:
    base = col.key.rstrip("_")
    for ent in ("sub", "ses"):
        value = col.entities.get(ent)
        if value:
            base = base.replace(f"{ent}-{value}_", "").replace(f"{ent}-{value}", "")
    base = base.replace("acq-", "").strip("_") or col.acq
    return f"{base}_{suffix}" + (f"_{desc}" if desc else "")


def _stats(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"),
                "iqr": float("nan"), "n": 0.0}
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "n": float(values.size)}


@dataclass
class Segmentation:
    """A dseg on the grid of a collection's maps, with its label names."""

    path: Path
    data: np.ndarray
    names: dict[int, str]


def map_metrics(col: CollectionDerivatives, seg: Segmentation | None = None,
                mask_img: tuple[np.ndarray, object] | None = None) -> list[Metric]:
    found = mask_img if mask_img is not None else collection_mask(col)
    if found is None:
        return []
    mask, _ = found
    out: list[Metric] = []
    for m in col.maps:
        data, _ = load_volume(m.path)
        if data.shape != mask.shape:
            LOGGER.warning("%s: shape %s differs from the collection's %s; skipped", m.path,
                           data.shape, mask.shape)
            continue
        name = map_label(col, m.suffix, m.desc)
        for key, value in _stats(data[mask]).items():
            out.append(Metric(f"{name}_{key}", "map", name, "" if key == "n" else m.units,
                              value))
        if seg is not None and m.desc in (None, "nlls", "dict"):
            for index, label in seg.names.items():
                sel = mask & (seg.data == index)
                if not sel.any():
                    continue
                for key in ("median", "iqr", "n"):
                    value = _stats(data[sel])[key]
                    out.append(Metric(f"{name}_{label}_{key}", "roi", f"{name}_{label}",
                                      "" if key == "n" else m.units, value))
    return out


# ------------------------------------------------------------------------------ dsegs


def read_dseg_names(dseg: Path, search_up_to: Path | None = None) -> dict[int, str]:
    """Label names of a dseg: its own ``.tsv`` (``index``, ``name``), else the dataset-level
    ``[desc-<d>_]dseg.tsv`` found in its folder or a parent (up to ``search_up_to``)."""
    name = dseg.name.split(".nii")[0]
    candidates = [dseg.with_name(name + ".tsv")]
    parsed = split_name(dseg.name)
    desc = parsed[0].get("desc") if parsed else None
    folder = dseg.parent
    stop = Path(search_up_to).resolve() if search_up_to else None
    while True:
        candidates += [folder / f"desc-{desc}_dseg.tsv"] if desc else []
        candidates.append(folder / "dseg.tsv")
        if folder.parent == folder or (stop is not None and folder.resolve() == stop):
            break
        folder = folder.parent
    for tsv in candidates:
        if tsv.is_file():
            names: dict[int, str] = {}
            with tsv.open(newline="") as handle:
                for row in csv.DictReader(handle, delimiter="\t"):
                    try:
                        names[int(row["index"])] = str(row["name"]).strip()
                    except (KeyError, ValueError):
                        continue
            if names:
                return {k: v for k, v in names.items() if k != 0 or v.lower() not in
                        ("background", "bg", "n/a")}
    return {}


def dseg_candidates(roi_dseg: Path | None, subject: str, session: str | None,
                    found: Iterable[Path]) -> list[tuple[Path, Path | None]]:
    """(dseg, root for its label table) of a participant: ``roi_dseg`` first (a file, or a
    derivatives folder searched for the participant's ``*_dseg.nii[.gz]``), then the dsegs in
    its own derivatives."""
    out: list[tuple[Path, Path | None]] = []
    if roi_dseg is not None:
        root = Path(roi_dseg)
        if root.is_file():
            out.append((root, root.parent))
        elif root.is_dir():
            base = participant_folder(root, subject, session)
            ses = f"_ses-{session}" if session else ""
            for path in sorted(base.glob(f"anat/sub-{subject}{ses}_*dseg.nii*")):
                out.append((path, root))
    out += [(p, None) for p in found]
    return out


def segmentation_for(col: CollectionDerivatives, shape: tuple[int, ...], affine: np.ndarray,
                     candidates: list[tuple[Path, Path | None]]) -> Segmentation | None:
    """The first candidate on the collection's grid, preferring one with the collection's
    ``acq`` label (qMRI collections are often on their own grid)."""
    import nibabel as nib

    def rank(item: tuple[Path, Path | None]) -> int:
        parsed = split_name(item[0].name)
        acq = parsed[0].get("acq") if parsed else None
        return 0 if acq == col.acq else (1 if acq is None else 2)

    for path, root in sorted(candidates, key=rank):
        parsed = split_name(path.name)
        acq = parsed[0].get("acq") if parsed else None
        if acq not in (None, col.acq):
            continue
        img = nib.load(str(path))
        if tuple(img.shape[:3]) != tuple(shape[:3]) or not np.allclose(img.affine, affine,
                                                                        atol=1e-3):
            continue
        names = read_dseg_names(path, root)
        data = np.rint(np.asarray(img.dataobj)).astype(np.int32)
        if not names:
            names = {int(v): f"label{int(v)}" for v in np.unique(data) if v != 0}
        return Segmentation(path, data, names)
    return None


# ------------------------------------------------------------------------------ files


def compute_participant_iqms(output_dir: Path, subject: str, session: str | None = None, *,
                             roi_dseg: Path | None = None,
                             derivatives: ParticipantDerivatives | None = None,
                             bias_images: Mapping[str, BiasImages] | None = None) -> Path:
    """Compute and store the participant's IQMs; returns the TSV's path.

    ``derivatives`` and ``bias_images`` let the participant report hand over what it loaded
    for its figures (nothing is computed twice).
    """
    deriv = derivatives or scan_participant(output_dir, subject, session)
    metrics: list[Metric] = []
    for anat in deriv.anat:
        try:
            images = (bias_images or {}).get(anat.key)
            metrics += bias_metrics(anat, images)
        except ValueError as exc:
            LOGGER.warning("bias metrics of %s skipped: %s", anat.key, exc)
    candidates = dseg_candidates(roi_dseg, subject, session, deriv.dsegs)
    sources = []
    for col in deriv.collections:
        found = collection_mask(col)
        if found is None:
            continue
        seg = None
        if candidates:
            mask, img = found
            seg = segmentation_for(col, mask.shape, img.affine, candidates)
            if seg is not None:
                sources.append(seg.path)
        metrics += map_metrics(col, seg, found)
    path = iqm_path(output_dir, subject, session)
    write_iqms(path, metrics, {"dseg": ";".join(str(s) for s in dict.fromkeys(sources))})
    return path


def write_iqms(path: Path, metrics: Iterable[Metric],
               provenance: Mapping[str, str] | None = None) -> Path:
    """The TSV (atomic). ``provenance`` goes into ``#``-comment lines before the header (which
    segmentation gave the ROI rows)."""
    from qmri_bids.artifacts import atomic_write_text

    buf = io.StringIO()
    for key, value in (provenance or {}).items():
        if value:
            buf.write(f"# {key}: {value}\n")
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(IQM_COLUMNS)
    for m in metrics:
        writer.writerow([m.metric, m.kind, m.item, m.units,
                         "n/a" if not np.isfinite(m.value) else f"{m.value:.6g}"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
    return path


def read_iqms(path: Path) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """``(metric -> value, metric -> units, provenance)`` of a participant's IQM TSV."""
    values: dict[str, float] = {}
    units: dict[str, str] = {}
    provenance: dict[str, str] = {}
    with Path(path).open(newline="") as handle:
        lines = []
        for line in handle:
            if line.startswith("#"):
                key, _, value = line[1:].partition(":")
                provenance[key.strip()] = value.strip()
            else:
                lines.append(line)
    for row in csv.DictReader(lines, delimiter="\t"):
        raw = row.get("value", "n/a")
        try:
            values[row["metric"]] = float(raw) if raw not in ("n/a", "") else float("nan")
        except (KeyError, ValueError):
            continue
        units[row["metric"]] = row.get("units", "") or ""
    return values, units, provenance
