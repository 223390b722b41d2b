"""Applying a trained estimator to images, noise estimation and CRB standard-deviation maps.

* :func:`estimate_maps` — every parameter map of the model from ``data[..., N]`` in chunks of
  voxels (bounded memory), NaN outside the mask and where the data are not finite.
* :func:`noise_sigma_from_background` — σ per real channel from the background of magnitude
  images: background magnitude is Rayleigh distributed, median = σ·√(2 ln 2) (the median is
  used instead of the mean, σ = mean/√(π/2), because it is robust to ghosts and the odd
  bright artefact voxel); exact zeros (zero-filled regions outside the FOV) are ignored.
* :func:`noise_sigma_from_residuals` — fallback when there is no usable background (cropped
  or skull-stripped images, complex MRF data): σ² = Σ‖y − s(θ̂)‖² / Σ(M − P) over the mask
  (M real data values, P parameters per voxel; Gaussian approximation of Rician data).
* :func:`crb_sd_maps` — √CRB per voxel at the estimated parameters and σ.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.progress import progress
from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.crb import _real_view, crb
from qmri_bids.qmri.estimator import (
    CrbEstimator,
    assemble_params,
    scale_least_squares,
    unit_signal,
)

log = logging.getLogger("qmri_bids.qmri")

MIN_BACKGROUND_VOXELS = 100


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def _selection(data: torch.Tensor, mask: Any, b1: torch.Tensor | None) -> torch.Tensor:
    batch = data.shape[:-1]
    sel = torch.isfinite(data).all(-1)
    if mask is not None:
        m = _as_tensor(mask).to(torch.bool)
        if m.shape != batch:
            raise BadDataError(f"mask shape {tuple(m.shape)} does not match the data "
                               f"{tuple(batch)}")
        sel &= m
    if b1 is not None:
        sel &= torch.isfinite(b1)
    return sel


def estimate_maps(
    net: CrbEstimator,
    data: Any,
    b1: Any = None,
    mask: Any = None,
    chunk: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """All parameter maps ``{name: array[...]}`` (float64) of ``net``'s model for ``data[..., N]``.

    ``data``: magnitude images (real) or, for MRF, complex images, numpy or torch, any leading
    shape; the last axis must follow the protocol order the network was trained for. ``b1``:
    relative B1+ ``[...]`` for networks with a B1 input (ignored otherwise; 1 when None).
    Voxels outside ``mask`` or with non-finite data/B1 are NaN. Quantities derived from the
    parameters (MEGRE's T2*) are the model's ``derived_maps``. ``chunk``: voxels per batch
    (default 2048 on the CPU, where a batch's activations then stay in cache: 1.7-2.5x the
    throughput of 65536-voxel batches on the demo networks, one thread; 65536 on a GPU).
    """
    y = _as_tensor(data)
    if y.ndim < 1 or y.shape[-1] != net.config.n_inputs:
        raise BadDataError(f"data have {y.shape[-1] if y.ndim else 0} members along the last "
                           f"axis; the estimator was trained for {net.config.n_inputs}")
    if not (y.is_floating_point() or y.is_complex()):
        y = y.to(torch.float64)
    if net.config.is_complex and not y.is_complex():
        log.warning("estimate_maps: real data given to a complex-signal estimator")
    batch = y.shape[:-1]
    kb = None
    if b1 is not None:
        kb = torch.broadcast_to(_as_tensor(b1).to(torch.float64), batch)
    sel = _selection(y, mask, kb).reshape(-1)
    flat = y.reshape(-1, y.shape[-1])
    kb_flat = None if kb is None else kb.reshape(-1)
    names = net.signal_model.parameter_names
    out = torch.full((flat.shape[0], len(names)), float("nan"), dtype=torch.float64)
    idx_all = torch.nonzero(sel).flatten()
    if chunk is None:
        chunk = 2048 if torch.device(device).type == "cpu" else 65536
    net = net.to(device).eval()
    in_dtype = torch.complex64 if y.is_complex() else torch.float32
    for s in progress(range(0, idx_all.numel(), chunk), desc=f"network ({net.config.model_name})",
                      unit="chunks"):
        idx = idx_all[s: s + chunk]
        yc = flat[idx].to(device)
        bc = None if kb_flat is None else kb_flat[idx].to(device)
        with torch.no_grad():
            if net.has_m0_table:  # M0 from the tabulated SVD coefficients (no simulation)
                out[idx] = net.estimate(yc.to(in_dtype), None if bc is None else bc.float()).cpu()
            else:
                yy = flat[idx].to(torch.complex128 if yc.is_complex() else torch.float64)
                out[idx] = _estimate_cpu64(net, yc, in_dtype, bc, yy)
    return {n: out[:, i].reshape(batch).numpy() for i, n in enumerate(names)}


def _estimate_cpu64(net: CrbEstimator, yc: torch.Tensor, in_dtype: torch.dtype,
                    bc: torch.Tensor | None, yy: torch.Tensor) -> torch.Tensor:
    """Network on ``device``, then the scale by least squares in float64 on the CPU."""
    shape = net(yc.to(in_dtype), None if bc is None else bc.float())
    shape64 = shape.detach().double().cpu()
    b64 = None if bc is None or not net.use_b1 else bc.double().cpu()
    s1 = unit_signal(net.signal_model, net.prior, shape64, b64)
    m0 = scale_least_squares(s1, yy)
    if net.prior.scale != "complex" and m0.is_complex():
        m0 = m0.real
    return assemble_params(net.signal_model, net.prior, shape64, m0)


def noise_sigma_from_background(images: Any, mask: Any) -> float | None:
    """σ per real channel from the background (``~mask``) of magnitude ``images[..., (N)]``.

    Uses the Rayleigh median σ = median/√(2 ln 2) over all background voxels of all volumes,
    ignoring exact zeros and non-finite values. Returns None when fewer than
    ``MIN_BACKGROUND_VOXELS`` usable voxels remain (then use :func:`noise_sigma_from_residuals`).
    """
    img = np.abs(np.asarray(images, dtype=np.float64))
    m = np.asarray(mask, dtype=bool)
    if img.shape[: m.ndim] != m.shape:
        raise BadDataError(f"mask shape {m.shape} does not match the images {img.shape}")
    bg = img[~m]
    bg = bg[np.isfinite(bg) & (bg > 0)]
    if bg.size < MIN_BACKGROUND_VOXELS:
        return None
    return float(np.median(bg) / math.sqrt(2 * math.log(2)))


def noise_sigma_from_residuals(
    model: SignalModel, data: Any, params: Any, mask: Any = None, b1: Any = None
) -> float | None:
    """σ from the fit residuals over the mask: √(Σ‖y − s(θ̂)‖² / Σ(M − P)); None if no voxel."""
    y = _as_tensor(data)
    y = y.to(torch.complex128 if y.is_complex() else torch.float64)
    p = _as_tensor(params).to(torch.float64)
    kb = None if b1 is None else torch.broadcast_to(_as_tensor(b1).to(torch.float64),
                                                    y.shape[:-1])
    sel = _selection(y, mask, kb) & torch.isfinite(p).all(-1)
    if not bool(sel.any()):
        return None
    s = model.forward(p[sel], None if kb is None else kb[sel])
    r = _real_view(s) - _real_view(y[sel])
    m = r.shape[-1]
    dof = sel.sum().item() * (m - p.shape[-1])
    if dof <= 0:
        return None
    return float(torch.sqrt((r**2).sum() / dof))


def crb_sd_maps(
    model: SignalModel,
    params: Any,
    sigma: float | Any,
    b1: Any = None,
    mask: Any = None,
    chunk: int = 65536,
) -> dict[str, np.ndarray]:
    """√CRB of every model parameter per voxel at ``params[..., P]`` and noise ``sigma`` (a
    scalar or a map). NaN where params are not finite or outside the mask; +inf where the
    Fisher matrix is singular."""
    p = _as_tensor(params).to(torch.float64)
    batch = p.shape[:-1]
    sig = torch.broadcast_to(_as_tensor(sigma).to(torch.float64), batch).reshape(-1)
    kb = None if b1 is None else torch.broadcast_to(_as_tensor(b1).to(torch.float64),
                                                    batch).reshape(-1)
    sel = torch.isfinite(p).all(-1).reshape(-1) & torch.isfinite(sig)
    if mask is not None:
        sel &= _as_tensor(mask).to(torch.bool).reshape(-1)
    if kb is not None:
        sel &= torch.isfinite(kb)
    flat = p.reshape(-1, p.shape[-1])
    out = torch.full_like(flat, float("nan"))
    idx_all = torch.nonzero(sel).flatten()
    if idx_all.numel():
        # Jacobians of long signals (MRF: 1000 real values x 4 parameters per voxel) in chunks
        # of at most ~256 MB.
        with torch.no_grad():
            n_out = _real_view(model.forward(flat[idx_all[:1]], None if kb is None
                                             else kb[idx_all[:1]])).shape[-1]
        chunk = max(1024, min(chunk, 2**25 // max(1, n_out * flat.shape[-1])))
    for s in progress(range(0, idx_all.numel(), chunk), desc=f"CRB SD ({model.name})",
                      unit="chunks"):
        idx = idx_all[s: s + chunk]
        with torch.no_grad():
            var = crb(model, flat[idx], sig[idx], None if kb is None else kb[idx], mode="auto")
        out[idx] = var.sqrt()
    return {n: out[:, i].reshape(batch).numpy() for i, n in enumerate(model.parameter_names)}
