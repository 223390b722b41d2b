"""Synthetic multiplicative bias fields: the one generator used everywhere in qmri-bids.

Simkó et al. (MIDL 2022) train their implicit bias-field CNN with Gaussian random fields (GRF) with
a Gaussian covariance, scaled to mean 1 and a maximum between 1.1 and 1.3. The same generator makes
the known field of the demo dataset and of the benchmark phantom, so that "what the network was
trained on" and "what it is tested on" can never silently drift apart.

Definition used here
--------------------
White Gaussian noise is filtered in the Fourier domain with a Gaussian transfer function. Filtering
with a Gaussian kernel of standard deviation ``sigma`` gives a field whose covariance is
``exp(-r**2 / (2 * length_scale**2))`` with ``length_scale = sigma * sqrt(2)``; ``length_scale`` is the
number users pass (voxels, or mm when ``spacing`` is given). The grid is padded by three kernel
widths before the FFT and cropped afterwards, so the periodic wrap-around of the FFT does not make
opposite borders correlated (a real coil field has no such symmetry).

The zero-mean field ``g`` is turned into ``b = 1 + s * (g - mean(g))`` with ``s`` chosen so that
``max(b) == max_value`` (both statistics inside ``mask`` when one is given). That is exactly the
paper's recipe: mean 1 and a controlled peak. The field is floored at ``MIN_FIELD`` so that it stays
a valid (positive) multiplicative field even in the rare draw whose negative excursion is much
larger than its positive one; the floor is documented rather than hidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MIN_FIELD = 0.05  # floor that keeps a field strictly positive (see module docstring)

#: Paper defaults, expressed for a 256-pixel image (10-50 px); :func:`scaled_length_scale` maps them.
PAPER_LENGTH_SCALE_256 = (10.0, 50.0)
PAPER_MAX_VALUE = (1.1, 1.3)

RangeOrValue = float | tuple[float, float]


def _draw(value: RangeOrValue, rng: np.random.Generator) -> float:
    """A fixed number stays fixed; a (lo, hi) pair is drawn uniformly."""
    if isinstance(value, (tuple, list)):
        lo, hi = float(value[0]), float(value[1])
        if hi < lo:
            raise ValueError(f"range ({lo}, {hi}) has hi < lo")
        return float(rng.uniform(lo, hi))
    return float(value)


def scaled_length_scale(size: int, paper_range: tuple[float, float] = PAPER_LENGTH_SCALE_256
                        ) -> tuple[float, float]:
    """The paper's 10-50 px on 256 px, as the same fraction of an image of ``size`` pixels."""
    return (paper_range[0] * size / 256.0, paper_range[1] * size / 256.0)


def gaussian_random_field(shape: Sequence[int], rng: np.random.Generator,
                          length_scale: float, spacing: Sequence[float] | None = None
                          ) -> np.ndarray:
    """Zero-mean, unit-variance GRF with Gaussian covariance of correlation length ``length_scale``.

    ``length_scale`` is in voxels when ``spacing`` is None, else in the unit of ``spacing`` (mm).
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"invalid field shape {shape}")
    if length_scale <= 0:
        raise ValueError(f"length_scale must be positive, got {length_scale}")
    spacing_t = tuple(1.0 for _ in shape) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing_t) != len(shape) or any(s <= 0 for s in spacing_t):
        raise ValueError(f"spacing {spacing} does not fit shape {shape}")
    sigma_vox = [length_scale / math.sqrt(2.0) / sp for sp in spacing_t]
    # Pad by 3 sigma per side (capped) so FFT periodicity does not correlate opposite borders.
    pads = [min(math.ceil(3 * s), 4 * n) for s, n in zip(sigma_vox, shape)]
    padded = [n + 2 * p for n, p in zip(shape, pads)]
    noise = rng.standard_normal(padded)
    spec = np.fft.rfftn(noise)
    transfer = np.ones(spec.shape, dtype=float)
    for axis, (n, s) in enumerate(zip(padded, sigma_vox)):
        f = np.fft.rfftfreq(n) if axis == len(padded) - 1 else np.fft.fftfreq(n)
        h = np.exp(-2.0 * (math.pi * s * f) ** 2)
        view = [1] * len(padded)
        view[axis] = h.size
        transfer = transfer * h.reshape(view)
    field = np.fft.irfftn(spec * transfer, s=padded, axes=tuple(range(len(padded))))
    field = field[tuple(slice(p, p + n) for p, n in zip(pads, shape))]
    field = field - field.mean()
    std = field.std()
    return field / std if std > 0 else field


def scale_to_bias(g: np.ndarray, max_value: float, mask: np.ndarray | None = None) -> np.ndarray:
    """``1 + s * (g - mean)`` with mean 1 and maximum ``max_value`` inside ``mask``."""
    if max_value <= 1.0:
        raise ValueError(f"max_value must be > 1, got {max_value}")
    sel = np.ones(g.shape, bool) if mask is None else np.asarray(mask, bool)
    if sel.shape != g.shape:
        raise ValueError(f"mask shape {sel.shape} != field shape {g.shape}")
    if not sel.any():
        raise ValueError("mask is empty")
    centred = g - g[sel].mean()
    peak = centred[sel].max()
    if peak <= 0:  # constant field (e.g. one voxel): the only mean-1 field is 1
        return np.ones_like(g)
    b = 1.0 + (max_value - 1.0) / peak * centred
    return np.maximum(b, MIN_FIELD)


def random_bias_field(shape: Sequence[int], rng: np.random.Generator | int | None = None,
                      length_scale: RangeOrValue | None = None,
                      max_value: RangeOrValue = PAPER_MAX_VALUE,
                      spacing: Sequence[float] | None = None,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """One random multiplicative bias field (2-D or 3-D, any shape), float32, mean 1, max ``max_value``.

    Parameters
    ----------
    shape: grid shape.
    rng: numpy Generator (or a seed) — the field is a pure function of it.
    length_scale: correlation length, a number or a (lo, hi) range drawn uniformly; voxels, or mm
        when ``spacing`` is given. Default: the paper's 10-50 px on 256 px scaled to the largest
        extent of the grid.
    max_value: peak of the field (a number or a range; default the paper's 1.1-1.3). For a demo
        with 20-40 % inhomogeneity pass e.g. ``(1.2, 1.4)``.
    spacing: voxel size; makes ``length_scale`` physical so anisotropic voxels get an isotropic field.
    mask: the mean and maximum are taken inside this mask (e.g. the object, not the air).
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if length_scale is None:
        extent = max(n * (1.0 if spacing is None else float(sp))
                     for n, sp in zip(shape, spacing or [1.0] * len(shape)))
        length_scale = scaled_length_scale(round(extent))
    ell = _draw(length_scale, gen)
    peak = _draw(max_value, gen)
    g = gaussian_random_field(shape, gen, ell, spacing)
    return scale_to_bias(g, peak, mask).astype(np.float32)


def random_bias_field_torch(n: int, shape: tuple[int, int], generator: torch.Generator,
                            length_scale: tuple[float, float],
                            max_value: tuple[float, float] = PAPER_MAX_VALUE,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """A batch of ``n`` 2-D fields ``(n, 1, H, W)`` for training, each with its own length scale
    and peak drawn from the ranges; same definition as :func:`random_bias_field` (pixels).

    ``mask`` ``(n, 1, H, W)``: mean and max are taken inside it (the foreground the loss sees).
    """
    h, w = int(shape[0]), int(shape[1])
    lo, hi = length_scale
    ell = lo + (hi - lo) * torch.rand(n, generator=generator)
    peak = max_value[0] + (max_value[1] - max_value[0]) * torch.rand(n, generator=generator)
    sigma = ell / math.sqrt(2.0)
    pad = math.ceil(3 * float(sigma.max()))
    ph, pw = h + 2 * pad, w + 2 * pad
    noise = torch.randn(n, ph, pw, generator=generator)
    fy = torch.fft.fftfreq(ph).view(1, ph, 1)
    fx = torch.fft.rfftfreq(pw).view(1, 1, pw // 2 + 1)
    s = sigma.view(n, 1, 1)
    transfer = torch.exp(-2.0 * (math.pi * s) ** 2 * (fy ** 2 + fx ** 2))
    g = torch.fft.irfft2(torch.fft.rfft2(noise) * transfer, s=(ph, pw))[:, pad:pad + h, pad:pad + w]
    g = g.unsqueeze(1)
    m = torch.ones_like(g) if mask is None else (mask > 0).to(g.dtype)
    cnt = m.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    centred = g - (g * m).sum(dim=(2, 3), keepdim=True) / cnt
    masked_peak = torch.where(m > 0, centred, torch.full_like(centred, -torch.inf))
    top = masked_peak.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    b = 1.0 + (peak.view(n, 1, 1, 1) - 1.0) / top * centred
    return b.clamp_min(MIN_FIELD)


def random_coil_field_torch(n: int, shape: tuple[int, int], generator: torch.Generator,
                            max_ratio: tuple[float, float] = (1.3, 3.0),
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """A batch of ``n`` receive-coil-like 2-D fields ``(n, 1, H, W)``, geometric mean 1 in ``mask``.

    Why a second kind: Gaussian random fields are symmetric around their mean, but surface and
    array coils give one-sided profiles, bright near the elements and falling off with depth (a
    knee or spine coil, a 32-channel head array at 7 T). Each field is the root-sum-of-squares
    of 1-4 element sensitivities ``(1 + (d / d0)**2) ** -1.5`` (the on-axis profile of a loop of
    radius ``d0``), with elements on a ring around the image centre, then its log is scaled so that
    ``max / min`` inside ``mask`` equals a ratio drawn from ``max_ratio``.
    """
    h, w = int(shape[0]), int(shape[1])
    yy = (torch.arange(h, dtype=torch.float32) + 0.5) / max(h, w) - 0.5 * h / max(h, w)
    xx = (torch.arange(w, dtype=torch.float32) + 0.5) / max(h, w) - 0.5 * w / max(h, w)
    yy, xx = yy.view(1, h, 1), xx.view(1, 1, w)
    out = torch.empty(n, 1, h, w)
    m = torch.ones(n, 1, h, w) if mask is None else (mask > 0).float()
    for i in range(n):
        k = int(torch.randint(1, 5, (1,), generator=generator))
        ang = 2 * math.pi * torch.rand(k, generator=generator)
        rad = 0.45 + 0.35 * torch.rand(k, generator=generator)
        d0 = 0.15 + 0.5 * torch.rand(k, generator=generator)
        cy, cx = (rad * torch.sin(ang)).view(k, 1, 1), (rad * torch.cos(ang)).view(k, 1, 1)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        sens = (1.0 + d2 / d0.view(k, 1, 1) ** 2) ** -1.5
        lf = 0.5 * torch.log((sens ** 2).sum(0) + 1e-12)
        sel = m[i, 0] > 0
        if not bool(sel.any()):
            sel = torch.ones_like(sel)
        lf = lf - lf[sel].mean()
        span = float(lf[sel].max() - lf[sel].min())
        ratio = max_ratio[0] + (max_ratio[1] - max_ratio[0]) * float(
            torch.rand(1, generator=generator))
        if span > 1e-6:
            lf = lf * (math.log(ratio) / span)
        out[i, 0] = torch.exp(lf)
    return out
