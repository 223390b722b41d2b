"""Report figures, returned as strings ready to embed: PNG data URIs (image mosaics) and inline
SVG (plots). Matplotlib's object API with the Agg/SVG canvases is used (no pyplot state, no
display); SVG text is drawn as paths, so a browser needs no font and fetches nothing.

Every figure shows measured data only: the images and maps as stored, their statistics inside
the masks passed in.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np

# Slice positions as fractions of the object's extent along each axis.
SLICE_FRACTIONS = (0.25, 0.42, 0.58, 0.75)
ORIENTATIONS = ("sagittal", "coronal", "axial")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def png_data_uri(fig, dpi: int = 100) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def svg_text(fig) -> str:
    """The figure as an ``<svg>`` element (no XML prolog or DOCTYPE, sized to its container)."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    FigureCanvasSVG(fig)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "qmri-bids"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # Keep matplotlib's size (pt) so text stays legible; CSS only shrinks a wide figure.
    return text.replace("<svg ", '<svg class="plot" ', 1)


# ------------------------------------------------------------------------------ geometry


def canonical(img) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Data (3-D float) in the closest RAS orientation and its voxel sizes."""
    import nibabel as nib

    can = nib.as_closest_canonical(img)
    data = np.asarray(can.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    while data.ndim < 3:
        data = data[..., None]
    zooms = tuple(float(z) for z in can.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))
    return data, zooms  # type: ignore[return-value]


def slice_indices(mask: np.ndarray, axis: int, n: int = len(SLICE_FRACTIONS)) -> list[int]:
    """``n`` slice indices across the object's extent along ``axis``."""
    size = mask.shape[axis]
    if size == 1:
        return [0]
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=other)) if mask.any() else np.arange(size)
    lo, hi = int(present.min()), int(present.max())
    fractions = SLICE_FRACTIONS if n == len(SLICE_FRACTIONS) else np.linspace(0.2, 0.8, n)
    return sorted({round(lo + f * (hi - lo)) for f in fractions})


def take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2-D slice shown with rows = up (S, or A for axial) and columns = the other axis,
    neurological convention (left of the subject on the left)."""
    return np.take(volume, index, axis=axis).T


def aspect(zooms: Sequence[float], axis: int) -> float:
    cols, rows = [z for a, z in enumerate(zooms) if a != axis]
    return rows / cols


def window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(values, [lo, hi])
    return float(a), float(b if b > a else a + 1e-6)


# ------------------------------------------------------------------------------ bias


def _extent_ratio(shape: Sequence[int], zooms: Sequence[float], axis: int) -> float:
    """Height / width (in mm) of a slice perpendicular to ``axis`` as :func:`take` shows it."""
    cols, rows = [(n, z) for a, (n, z) in enumerate(zip(shape, zooms)) if a != axis]
    return (rows[0] * rows[1]) / max(cols[0] * cols[1], 1e-6)


def bias_mosaic(before: np.ndarray, after: np.ndarray, field: np.ndarray | None,
                mask: np.ndarray, zooms: Sequence[float], title: str = "") -> str:
    """Before (with the field's contours) and after, in three orientations: a PNG data URI.

    Rows come in pairs per orientation (before, after); each image is shown from its own
    0.5-99.5 percentiles in the object, which is what makes the inhomogeneity visible.
    ``title`` is the figure's alt text in the page, not drawn (the page has a heading).
    """
    del title
    axes_spec = [(axis, slice_indices(mask, axis)) for axis in range(3)]
    ncols = max(len(ix) for _, ix in axes_spec)
    vb = window(before[mask]) if mask.any() else window(before)
    va = window(after[mask]) if mask.any() else window(after)
    levels = None
    if field is not None and mask.any():
        f = field[mask]
        lo, hi = np.percentile(f[np.isfinite(f)], [2, 98])
        if hi - lo > 1e-3:
            levels = np.linspace(lo, hi, 6)
    cell = 1.45  # inches per slice
    ratios = [_extent_ratio(before.shape, zooms, axis) for axis, _ in axes_spec]
    heights = [r * cell for r in ratios for _ in (0, 1)]
    top_pad, left_pad = 0.55, 0.75
    width = left_pad + cell * ncols + 0.1
    height = top_pad + sum(heights) + 0.05 * len(heights) + 0.1
    fig = _figure(width, height)
    grid = fig.add_gridspec(6, ncols, left=left_pad / width, right=1 - 0.1 / width,
                            top=1 - top_pad / height, bottom=0.1 / height, wspace=0.02,
                            hspace=0.05, height_ratios=heights)
    contour_set = None
    for row, (axis, indices) in enumerate(axes_spec):
        for kind in (0, 1):
            r = 2 * row + kind
            for c in range(ncols):
                ax = fig.add_subplot(grid[r, c])
                ax.set_axis_off()
                if c >= len(indices):
                    continue
                k = indices[c]
                image, (lo, hi) = (before, vb) if kind == 0 else (after, va)
                ax.imshow(take(image, axis, k), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                          aspect=aspect(zooms, axis), interpolation="nearest")
                if kind == 0 and levels is not None:
                    fsl = take(np.where(mask, field, np.nan), axis, k)
                    if np.isfinite(fsl).sum() > 4:
                        contour_set = ax.contour(fsl, levels=levels, cmap="RdYlBu_r",
                                                 linewidths=0.9)
                if c == 0:
                    ax.text(-0.05, 0.5, f"{ORIENTATIONS[axis]}\n"
                            f"{'before' if kind == 0 else 'after'}",
                            transform=ax.transAxes, ha="right", va="center", fontsize=8.5)
    if contour_set is not None:
        cax = fig.add_axes((0.3, 1 - 0.3 / height, 0.45, 0.09 / height))
        bar = fig.colorbar(contour_set, cax=cax, orientation="horizontal", format="%.2f")
        bar.ax.tick_params(labelsize=7.5, length=2, pad=1)
        cax.text(-0.02, 0.5, "field (contours)", transform=cax.transAxes, ha="right",
                 va="center", fontsize=8)
    return png_data_uri(fig)


# ------------------------------------------------------------------------------ maps


def map_mosaic(data: np.ndarray, mask: np.ndarray, zooms: Sequence[float], *, label: str,
               units: str, sd: np.ndarray | None = None, cmap: str = "viridis",
               axis: int = 2, n: int = 6) -> str:
    """Axial slices of a map (and below, its CRB SD map) with colour bars in its units."""
    indices = slice_indices(mask, axis, n if mask.shape[axis] > 1 else 1)
    rows = [(data, label, cmap)] + ([(sd, f"{label} CRB SD", "magma")] if sd is not None
                                    else [])
    fig = _figure(1.55 * len(indices) + 1.3, 1.65 * len(rows) + 0.2)
    grid = fig.add_gridspec(len(rows), len(indices) + 1, left=0.01, right=0.93, top=0.9,
                            bottom=0.04, wspace=0.03, hspace=0.18,
                            width_ratios=[1] * len(indices) + [0.07])
    for r, (volume, name, cm) in enumerate(rows):
        vals = volume[mask & np.isfinite(volume)]
        lo, hi = window(vals, 1, 99) if vals.size else (0.0, 1.0)
        if name.endswith("CRB SD"):
            lo = 0.0
        shown = np.where(mask, volume, np.nan)
        im = None
        for c, k in enumerate(indices):
            ax = fig.add_subplot(grid[r, c])
            ax.set_axis_off()
            ax.set_facecolor("black")
            im = ax.imshow(take(shown, axis, k), cmap=cm, vmin=lo, vmax=hi, origin="lower",
                           aspect=aspect(zooms, axis), interpolation="nearest")
            if c == 0:
                ax.set_title(name, fontsize=8, loc="left")
        cax = fig.add_subplot(grid[r, len(indices)])
        bar = fig.colorbar(im, cax=cax)
        bar.ax.tick_params(labelsize=6.5)
        bar.set_label(units or "no unit", fontsize=7)
    return png_data_uri(fig)


def histogram_svg(values: np.ndarray, *, label: str, units: str,
                  overlays: Mapping[str, np.ndarray] | None = None) -> str:
    """Histogram of a map inside the object (1st-99th percentile range), median and IQR
    marked; ``overlays``: the same map from reference estimators, as outlines."""
    fig = _figure(3.6, 2.3)
    ax = fig.add_axes((0.15, 0.22, 0.8, 0.66))
    values = values[np.isfinite(values)]
    series = {"network" if overlays else label: values, **(overlays or {})}
    pooled = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    lo, hi = window(pooled, 1, 99)
    bins = np.linspace(lo, hi, 61)
    for i, (name, v) in enumerate(series.items()):
        v = v[np.isfinite(v)]
        if i == 0:
            ax.hist(v, bins=bins, color="#3b6ea8", alpha=0.85, label=name)
        else:
            ax.hist(v, bins=bins, histtype="step", linewidth=1.2, label=name)
    if values.size:
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        ax.axvline(med, color="k", linewidth=1)
        ax.axvspan(q1, q3, color="k", alpha=0.08)
        ax.set_title(f"{label}: median {med:.4g}, IQR {q1:.4g}-{q3:.4g} {units}".strip(),
                     fontsize=7.5)
    ax.set_xlabel(f"{label} ({units})" if units else label, fontsize=7.5)
    ax.set_ylabel("voxels", fontsize=7.5)
    ax.tick_params(labelsize=6.5)
    if overlays:
        ax.legend(fontsize=6.5, frameon=False)
    return svg_text(fig)


def agreement_svg(reference: np.ndarray, estimate: np.ndarray, *, label: str, units: str,
                  reference_name: str, estimate_name: str = "network") -> tuple[str, dict]:
    """Density plot of ``estimate`` against ``reference`` and a Bland-Altman plot (difference
    against mean) with the median difference and the 2.5-97.5 % range of the differences.

    Returns the SVG and the numbers shown: ``n`` (voxels with both estimates),
    ``median_difference``, ``loa_low``/``loa_high`` (2.5/97.5 % of the differences) and
    ``pearson`` (correlation of the two estimates)."""
    ok = np.isfinite(reference) & np.isfinite(estimate)
    ref, est = reference[ok].astype(np.float64), estimate[ok].astype(np.float64)
    stats = {"n": int(ref.size)}
    fig = _figure(7.2, 2.9)
    if ref.size < 10:
        ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"{ref.size} voxels with both estimates: nothing to compare",
                ha="center", va="center", fontsize=9)
        return svg_text(fig), stats
    diff, mean = est - ref, 0.5 * (est + ref)
    lo, hi = window(np.concatenate([ref, est]), 0.5, 99.5)
    med = float(np.median(diff))
    loa = np.percentile(diff, [2.5, 97.5])
    stats.update(median_difference=med, loa_low=float(loa[0]), loa_high=float(loa[1]),
                 pearson=float(np.corrcoef(ref, est)[0, 1]) if ref.std() > 0 and est.std() > 0
                 else float("nan"))
    from matplotlib.colors import LogNorm

    ax1 = fig.add_axes((0.08, 0.17, 0.36, 0.7))
    ax1.hist2d(ref, est, bins=80, range=[[lo, hi], [lo, hi]], cmap="Blues", norm=LogNorm(),
               rasterized=True)
    ax1.plot([lo, hi], [lo, hi], color="k", linewidth=0.8, linestyle="--")
    ax1.set_xlabel(f"{reference_name} ({units})", fontsize=7.5)
    ax1.set_ylabel(f"{estimate_name} ({units})", fontsize=7.5)
    ax1.set_title(f"{label}: {estimate_name} vs {reference_name}, r = {stats['pearson']:.3f}",
                  fontsize=7.5)
    ax2 = fig.add_axes((0.58, 0.17, 0.38, 0.7))
    dlo, dhi = window(diff, 0.5, 99.5)
    pad = 0.1 * (dhi - dlo)
    ax2.hist2d(mean, diff, bins=80, range=[[lo, hi], [dlo - pad, dhi + pad]], cmap="Blues",
               norm=LogNorm(), rasterized=True)
    ax2.axhline(med, color="crimson", linewidth=1.1, label=f"median {med:.3g}")
    for v in loa:
        ax2.axhline(v, color="crimson", linewidth=0.8, linestyle=":")
    ax2.axhline(0, color="k", linewidth=0.6)
    ax2.set_xlabel(f"mean of the two ({units})", fontsize=7.5)
    ax2.set_ylabel(f"{estimate_name} - {reference_name} ({units})", fontsize=7.5)
    ax2.set_title(f"Bland-Altman: median difference {med:.3g}", fontsize=7.5)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=6.5)
    return svg_text(fig), stats


# ------------------------------------------------------------------------------ group


#: fewer participants than this give no robust z (a median and MAD of 3 values flag noise)
MIN_FOR_OUTLIERS = 5


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); the IQR / 1.349 stands in for a zero MAD; zeros where
    neither spreads (every participant equal: nobody is an outlier); NaN for missing values
    and for columns with fewer than :data:`MIN_FOR_OUTLIERS` values."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    z = np.full(v.shape, np.nan)
    if ok.sum() < MIN_FOR_OUTLIERS:
        return z
    med = np.median(v[ok])
    scale = 1.4826 * np.median(np.abs(v[ok] - med))
    if scale <= 0:
        q1, q3 = np.percentile(v[ok], [25, 75])
        scale = (q3 - q1) / 1.349
    z[ok] = 0.0 if scale <= 0 else (v[ok] - med) / scale
    return z


def strip_plot_svg(columns: Sequence[tuple[str, np.ndarray]], labels: Sequence[str], *,
                   threshold: float = 3.0, title: str = "", max_labels: int = 8) -> str:
    """One strip per metric (its own x axis): every participant a dot, outliers (|robust z| >
    ``threshold``) red and named (at most ``max_labels`` names per strip)."""
    from matplotlib.ticker import MaxNLocator

    n = max(len(columns), 1)
    row_in, head_in = 0.55, 0.35 if title else 0.1
    height = head_in + row_in * n + 0.25
    fig = _figure(7.6, height)
    grid = fig.add_gridspec(n, 1, left=0.33, right=0.98, top=1 - head_in / height,
                            bottom=0.25 / height, hspace=0.9)
    if title:
        fig.text(0.01, 1 - 0.2 / height, title, fontsize=9.5, weight="bold", va="center")
    rng = np.random.default_rng(0)  # fixed jitter: the same table gives the same picture
    for i, (name, values) in enumerate(columns):
        ax = fig.add_subplot(grid[i, 0])
        v = np.asarray(values, dtype=np.float64)
        z = robust_z(v)
        ok = np.isfinite(v)
        out = ok & (np.abs(np.nan_to_num(z)) > threshold)
        jitter = rng.uniform(-0.35, 0.35, v.size)
        many = v.size > 300  # many dots: drawn as one image inside the SVG
        ax.scatter(v[ok & ~out], jitter[ok & ~out], s=10 if not many else 5,
                   color="#3b6ea8", alpha=0.65, linewidths=0, rasterized=many)
        ax.scatter(v[out], jitter[out], s=18, color="crimson", linewidths=0)
        lo, hi = (np.nanmin(v[ok]), np.nanmax(v[ok])) if ok.any() else (0.0, 1.0)
        for j in np.flatnonzero(out)[:max_labels]:
            # Names of dots in the right half go to their left, so they stay in the figure.
            right = v[j] > 0.5 * (lo + hi)
            ax.annotate(labels[j], (v[j], jitter[j]), fontsize=6, color="crimson",
                        xytext=(-3 if right else 3, 2), textcoords="offset points",
                        ha="right" if right else "left")
        if ok.any():
            ax.axvline(np.median(v[ok]), color="k", linewidth=0.7)
        ax.set_ylim(-0.6, 0.6)
        ax.set_yticks([])
        ax.tick_params(labelsize=6.5, length=2, pad=1)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.ticklabel_format(axis="x", useOffset=False)
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        n_out = int(out.sum())
        extra = f" ({n_out} outlier{'s' if n_out != 1 else ''})" if n_out else ""
        ax.text(-0.02, 0.5, f"{name}{extra}", transform=ax.transAxes, ha="right", va="center",
                fontsize=7, color="crimson" if n_out else "black")
    return svg_text(fig)
