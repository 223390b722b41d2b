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


def model_jacobian(
    model: SignalModel,
    params: torch.Tensor,
    b1: torch.Tensor | None = None,
    mode: str = "rev",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal (real view, [..., M]) and its exact Jacobian ([..., M, P]) by ``torch.func``.

    ``mode="rev"`` uses ``jacrev`` (one backward pass per signal sample: cost ∝ M), ``"fwd"``
    uses ``jacfwd`` (one pass per parameter: cost ∝ P, the better choice for long signals such
    as MRF). M = N for real signals and 2N for complex ones.
    """
    batch = params.shape[:-1]
    p = params.reshape(-1, params.shape[-1])
    if mode not in ("rev", "fwd"):
        raise ValueError(f"mode must be 'rev' or 'fwd', got {mode!r}")
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


def crb(
    model: SignalModel,
    params: torch.Tensor,
    sigma: float | torch.Tensor,
    b1: torch.Tensor | None = None,
    mode: str = "rev",
) -> torch.Tensor:
    """Cramér–Rao lower bound on the *variance* of each parameter, ``[..., P]`` (diag of F⁻¹).

    Works for any batch shape, float32/float64 and any device. Where F is singular (a parameter
    the protocol cannot determine) the bound is +inf.
    """
    fim = fisher_information(model, params, sigma, b1, mode)
    # Equilibrate before inverting: parameters differ by orders of magnitude (M0 ~ 1e3, T1 ~ 1).
    d = torch.sqrt(torch.diagonal(fim, dim1=-2, dim2=-1)).clamp_min(torch.finfo(fim.dtype).tiny)
    scaled = fim / (d[..., :, None] * d[..., None, :])
    inv, info = torch.linalg.inv_ex(scaled)
    var = torch.diagonal(inv, dim1=-2, dim2=-1) / d**2
    bad = (info != 0)[..., None] | ~torch.isfinite(var) | (var < 0)
    return torch.where(bad, torch.full_like(var, float("inf")), var)
