"""Batched, bounded Levenberg–Marquardt non-linear least squares over any ``SignalModel``.

Every voxel is an independent small problem (P ≲ 5 parameters); all voxels are solved together on
tensors. The Jacobian is exact (``torch.func``, see :func:`qmri_bids.qmri.crb.model_jacobian`);
damping is Marquardt's (λ·diag(JᵀJ)), per voxel, so parameters of very different scales (M0 ~
1e3, T1 ~ 1 s) need no manual scaling. Bounds are enforced by projection (clamping) with an
active set: a parameter sitting on a bound whose gradient points outward is frozen for that step,
which keeps projected steps descent directions. Converged voxels leave the active set, so late
iterations only cost as much as the slow voxels.

Initial values come from the model's ``initial_guess(data, b1)`` (linear DESPOT1 for VFA, a
polarity-restoring T1 grid search for IR, log-linear fits for exponential decays, closed forms
for MTS/MP2RAGE) unless ``init`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.crb import _real_view, model_jacobian

CHUNK_VOXELS = 65536  # bounds peak memory on whole-brain volumes


@dataclass
class NllsFit:
    """Result of :func:`fit_nlls`; voxels outside the mask hold NaN and ``converged=False``.

    ``converged`` means LM stopped at a (possibly bound-constrained) stationary point before
    ``max_iter``; like any local method it can be a local minimum if the start was poor.
    """

    params: torch.Tensor  # [..., P]
    residual_norm: torch.Tensor  # [...]  ‖s(θ̂) − y‖₂
    converged: torch.Tensor  # [...] bool
    n_iterations: torch.Tensor  # [...] int


def _default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    # (ftol, xtol): float64 → (1e-10, 1e-8); float32 → (~1e-5, ~3e-5), just above its rounding.
    eps = torch.finfo(dtype).eps
    return max(1e-10, 100 * eps), max(1e-8, 256 * eps)


def _initial_values(
    model: SignalModel, y: torch.Tensor, b1: torch.Tensor | None, init: torch.Tensor | None
) -> torch.Tensor:
    real = y.real.dtype if y.is_complex() else y.dtype  # parameters are real even for complex data
    lo, hi = model.bounds(real, y.device)
    if init is None:
        guess = getattr(model, "initial_guess", None)
        if guess is None:
            raise ValueError(f"model {model.name!r} has no initial_guess(); pass init=")
        p0 = guess(y, b1)
    else:
        p0 = init.to(dtype=real, device=y.device)
    # Non-finite starts (degenerate voxels) start mid-range (1 where a bound is infinite).
    mid = torch.where(torch.isfinite(lo) & torch.isfinite(hi), (lo + hi) / 2, lo.clamp_min(0) + 1)
    p0 = torch.where(torch.isfinite(p0), p0, mid.expand_as(p0))
    return torch.maximum(torch.minimum(p0, hi), lo)


def _lm(
    model: SignalModel,
    y: torch.Tensor,
    p: torch.Tensor,
    b1: torch.Tensor | None,
    max_iter: int,
    ftol: float,
    xtol: float,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core LM on flat tensors y[V, M] (real view), p[V, P]."""
    v, n_par = p.shape
    lo, hi = model.bounds(p.dtype, p.device)
    lam = torch.full((v,), 1e-3, dtype=p.dtype, device=p.device)
    converged = torch.zeros(v, dtype=torch.bool, device=p.device)
    n_iter = torch.zeros(v, dtype=torch.long, device=p.device)
    eye = torch.eye(n_par, dtype=p.dtype, device=p.device)
    tiny = torch.finfo(p.dtype).tiny
    y_scale = (y**2).sum(-1).clamp_min(tiny)

    def sub(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[idx]

    active = torch.arange(v, device=p.device)
    s, jac = model_jacobian(model, p, b1, mode)
    r = s - y
    cost = (r**2).sum(-1)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        pa, ja, ra, ca, la = p[active], jac[active], r[active], cost[active], lam[active]
        g = (ja.transpose(1, 2) @ ra.unsqueeze(-1)).squeeze(-1)
        # Active set: parameters on a bound with the descent direction pointing outside.
        frozen = ((pa <= lo) & (g > 0)) | ((pa >= hi) & (g < 0))
        ja = ja * (~frozen).unsqueeze(1)
        g = g.masked_fill(frozen, 0)
        h = ja.transpose(1, 2) @ ja
        dh = torch.diagonal(h, dim1=1, dim2=2)
        # Marquardt scaling per parameter; a zero column (parameter without effect) gets unit damping
        # so the system stays solvable. No absolute floor: it would swamp small-scale parameters.
        damp = la[:, None] * torch.where(dh > 0, dh, torch.ones_like(dh))
        step = torch.linalg.solve(h + torch.diag_embed(damp) + frozen.unsqueeze(-1) * eye, -g)
        step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        p_new = torch.maximum(torch.minimum(pa + step, hi), lo)
        s_new = _real_view(model.forward(p_new, sub(b1, active)))
        r_new = s_new - y[active]
        c_new = (r_new**2).sum(-1)
        accept = c_new < ca
        n_iter[active] += 1
        # Convergence: negligible relative cost change or step, or an (essentially) exact fit.
        # A rejected near-Gauss-Newton step (λ ≤ 1) that changes the cost by less than ftol means
        # the cost is flat at working precision (typical in float32): also converged.
        small_f = ((ca - c_new).abs() <= ftol * ca) & (accept | (la <= 1.0))
        small_x = accept & ((p_new - pa).abs() <= xtol * (pa.abs() + xtol)).all(-1)
        exact = torch.minimum(c_new, ca) <= 1e3 * torch.finfo(p.dtype).eps ** 2 * y_scale[active]
        stalled = la > 1e12  # no descent direction left at this precision
        pinned = frozen.all(-1)  # every parameter held on a bound: a constrained optimum
        done = small_f | small_x | exact | stalled | pinned
        la = torch.where(accept, la * 0.3, la * 10).clamp(1e-12, 1e16)
        lam[active] = la
        acc_idx = active[accept]
        if acc_idx.numel():
            p[acc_idx] = p_new[accept]
            s_a, j_a = model_jacobian(model, p[acc_idx], sub(b1, acc_idx), mode)
            jac[acc_idx] = j_a
            r[acc_idx] = s_a - y[acc_idx]
            cost[acc_idx] = (r[acc_idx] ** 2).sum(-1)
        converged[active[done]] = True
        active = active[~done]
    return p, cost.sqrt(), converged, n_iter


def fit_nlls(
    model: SignalModel,
    data: torch.Tensor,
    init: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    max_iter: int = 100,
    ftol: float | None = None,
    xtol: float | None = None,
    jacobian_mode: str = "auto",
) -> NllsFit:
    """Fit ``model`` to ``data[..., N]`` by bounded Levenberg–Marquardt, voxel by voxel.

    ``b1[...]`` is the relative B1+ per voxel, ``mask[...]`` selects the voxels to fit (voxels
    with non-finite data are always skipped), ``init[..., P]`` overrides the model's initial
    guess. Works in the dtype and on the device of ``data`` (complex data for complex models).
    ``jacobian_mode``: see :func:`~qmri_bids.qmri.crb.model_jacobian` (``"auto"``: the mode
    the CRB uses for the same model). Convergence: relative cost decrease ≤ ``ftol``,
    relative step ≤ ``xtol``, an exact fit, or damping beyond 1e12 (no further descent).
    """
    data = torch.as_tensor(data)
    if not (data.is_floating_point() or data.is_complex()):
        data = data.to(torch.get_default_dtype())
    batch = data.shape[:-1]
    real_dtype = data.real.dtype if data.is_complex() else data.dtype
    dflt_f, dflt_x = _default_tolerances(real_dtype)
    ftol = dflt_f if ftol is None else ftol
    xtol = dflt_x if xtol is None else xtol
    flat = data.reshape(-1, data.shape[-1])
    sel = torch.isfinite(flat).all(-1)
    if mask is not None:
        sel &= torch.as_tensor(mask, device=data.device).reshape(-1).bool()
    b1_flat = None
    if b1 is not None:
        b1_flat = torch.broadcast_to(torch.as_tensor(b1).to(real_dtype).to(data.device), batch)
        b1_flat = b1_flat.reshape(-1)
        sel &= torch.isfinite(b1_flat)
    init_flat = None if init is None else init.reshape(-1, model.n_parameters)

    n_vox, n_par = flat.shape[0], model.n_parameters
    params = torch.full((n_vox, n_par), float("nan"), dtype=real_dtype, device=data.device)
    resid = torch.full((n_vox,), float("nan"), dtype=real_dtype, device=data.device)
    conv = torch.zeros(n_vox, dtype=torch.bool, device=data.device)
    iters = torch.zeros(n_vox, dtype=torch.long, device=data.device)
    idx_all = torch.nonzero(sel).flatten()
    for start in range(0, idx_all.numel(), CHUNK_VOXELS):
        idx = idx_all[start : start + CHUNK_VOXELS]
        y = flat[idx]
        kb = None if b1_flat is None else b1_flat[idx]
        with torch.no_grad():
            p0 = _initial_values(model, y, kb, None if init_flat is None else init_flat[idx])
        p, rn, c, it = _lm(model, _real_view(y), p0.clone(), kb, max_iter, ftol, xtol,
                          jacobian_mode)
        params[idx], resid[idx], conv[idx], iters[idx] = p, rn, c, it
    return NllsFit(
        params=params.reshape(*batch, n_par),
        residual_norm=resid.reshape(batch),
        converged=conv.reshape(batch),
        n_iterations=iters.reshape(batch),
    )
