"""Cramér–Rao bound of any ``SignalModel`` (used as the loss normaliser of Zhang et al., MRM 2022).

For data y = s(θ) + ε with i.i.d. Gaussian noise of standard deviation σ per real channel, the
Fisher information is F = Re(JᴴJ)/σ², J = ∂s/∂θ, and CRB(θ_i) = (F⁻¹)_ii — the smallest variance
any unbiased estimator of θ_i can reach. All model parameters (nuisance ones such as M0 or a
phase too) enter F, because not knowing them costs precision on the others.

Magnitude data are Rician; we use the Gaussian (high-SNR) approximation of the Rician likelihood,
accurate when the signal is a few σ above zero (the usual CRB practice in qMRI protocol design).
"""

from __future__ import annotations

import torch
from torch.func import jacfwd, jacrev, vmap

from qmri_bids.qmri.base import SignalModel


def _real_view(signal: torch.Tensor) -> torch.Tensor:
    """Complex signals as [real parts, imaginary parts] so that JᵀJ of the real view = Re(JᴴJ)."""
    if signal.is_complex():
        return torch.cat([signal.real, signal.imag], dim=-1)
    return signal


def jacobian_mode(model: SignalModel, n_params: int) -> str:
    """How to differentiate ``model``: ``"model"`` when it has an exact Jacobian of its own
    (:attr:`~qmri_bids.qmri.base.SignalModel.has_exact_jacobian`), ``"fd"`` for other long
    simulated signals (automatic differentiation through a 500-step EPG loop costs ~1 s per
    sample; central differences need 2P+1 forward runs), ``"fwd"`` when outputs outnumber
    parameters, ``"rev"`` otherwise."""
    if getattr(model, "has_exact_jacobian", False):
        return "model"
    n = getattr(model, "n_timepoints", None) or 0
    if n > 64:
        return "fd"
    return "fwd" if (model.is_complex or n > 4 * n_params) else "rev"


def model_jacobian(
    model: SignalModel,
    params: torch.Tensor,
    b1: torch.Tensor | None = None,
    mode: str = "rev",
    rel_step: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal (real view, [..., M]) and its Jacobian ([..., M, P]).

    ``mode``: ``"rev"`` (``jacrev``, cost ∝ M), ``"fwd"`` (``jacfwd``, cost ∝ P), ``"fd"``
    (float64 central differences with step ``rel_step``·max(|θ|, 1e-3): ~1e-8 relative error,
    no autograd graph), ``"model"`` (the model's own :meth:`~SignalModel.jacobian`) or
    ``"auto"`` (:func:`jacobian_mode`). M = N for real signals and 2N for complex ones.
    """
    if mode == "auto":
        mode = jacobian_mode(model, params.shape[-1])
    batch = params.shape[:-1]
    p = params.reshape(-1, params.shape[-1])
    if mode == "model":
        with torch.no_grad():
            s, j = model.jacobian(p, None if b1 is None else torch.broadcast_to(
                torch.as_tensor(b1).to(p), batch).reshape(-1))
        return s.reshape(*batch, s.shape[-1]), j.reshape(*batch, *j.shape[-2:])
    if mode == "fd":
        s, j = _central_differences(model, p, None if b1 is None else torch.broadcast_to(
            torch.as_tensor(b1).to(p), batch).reshape(-1), rel_step)
        return s.reshape(*batch, s.shape[-1]).to(params.dtype), \
            j.reshape(*batch, *j.shape[-2:]).to(params.dtype)
    jac = jacrev if mode == "rev" else jacfwd

    def f(theta: torch.Tensor, kappa: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = _real_view(model.forward(theta, kappa))
        return s, s  # has_aux returns the value alongside the Jacobian at no extra cost

    if b1 is None:
        j, s = vmap(jac(lambda t: f(t, None), has_aux=True))(p)
    else:
        kappa = torch.broadcast_to(torch.as_tensor(b1).to(p), batch).reshape(-1)
        j, s = vmap(jac(f, has_aux=True))(p, kappa)
    return s.reshape(*batch, s.shape[-1]), j.reshape(*batch, *j.shape[-2:])


def _central_differences(model: SignalModel, params: torch.Tensor, b1: torch.Tensor | None,
                         rel_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = params.to(torch.float64)
    n, n_params = x.shape
    h = rel_step * x.abs().clamp_min(1e-3)
    points = [x]
    for i in range(n_params):
        for sign in (1.0, -1.0):
            xi = x.clone()
            xi[:, i] += sign * h[:, i]
            points.append(xi)
    kb = None if b1 is None else b1.to(torch.float64).repeat(len(points))
    with torch.no_grad():
        sig = _real_view(model.forward(torch.cat(points, 0), kb)).reshape(len(points), n, -1)
    jac = torch.stack([(sig[1 + 2 * i] - sig[2 + 2 * i]) / (2 * h[:, i:i + 1])
                       for i in range(n_params)], -1)
    return sig[0], jac


def fisher_information(
    model: SignalModel,
    params: torch.Tensor,
    sigma: float | torch.Tensor,
    b1: torch.Tensor | None = None,
    mode: str = "rev",
) -> torch.Tensor:
    """Fisher information matrix F[..., P, P] = Re(JᴴJ)/σ² at ``params[..., P]``.

    ``sigma`` is the noise standard deviation per real channel, a scalar or broadcastable to the
    batch shape of ``params``; ``mode`` as in :func:`model_jacobian`.
    """
    _, j = model_jacobian(model, params, b1, mode)
    sigma = torch.as_tensor(sigma, dtype=params.dtype, device=params.device)
    return j.transpose(-1, -2) @ j / (sigma**2)[..., None, None]


def inverse_diagonal(fim: torch.Tensor) -> torch.Tensor:
    """diag(F⁻¹) after equilibration (parameters differ by orders of magnitude: M0 ~ 1e3,
    T1 ~ 1); +inf where F is singular (a parameter the protocol cannot determine)."""
    d = torch.sqrt(torch.diagonal(fim, dim1=-2, dim2=-1)).clamp_min(torch.finfo(fim.dtype).tiny)
    scaled = fim / (d[..., :, None] * d[..., None, :])
    inv, info = torch.linalg.inv_ex(scaled)
    var = torch.diagonal(inv, dim1=-2, dim2=-1) / d**2
    bad = (info != 0)[..., None] | ~torch.isfinite(var) | (var <= 0)
    return torch.where(bad, torch.full_like(var, float("inf")), var)


def crb(
    model: SignalModel,
    params: torch.Tensor,
    sigma: float | torch.Tensor,
    b1: torch.Tensor | None = None,
    mode: str = "rev",
) -> torch.Tensor:
    """Cramér–Rao lower bound on the *variance* of each parameter, ``[..., P]`` (diag of F⁻¹).

    Works for any batch shape, float32/float64 and any device. Where F is singular (a parameter
    the protocol cannot determine) the bound is +inf. ``mode``: see :func:`model_jacobian`.
    """
    return inverse_diagonal(fisher_information(model, params, sigma, b1, mode))
