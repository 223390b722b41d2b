"""Mono-exponential multi-echo spin echo T2 model: S = M0 · exp(−TE/T2)."""

from __future__ import annotations

import torch

from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.models._common import ArrayLike, as_protocol_tensor, like


def loglinear_exponential_fit(
    data: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted log-linear fit of S = S0 · exp(−R · t); returns (S0, R).

    Weights S² undo the noise amplification of the logarithm at low signal (standard WLS for
    exponential decays). Non-positive samples get zero weight.
    """
    tiny = torch.finfo(data.dtype).tiny
    pos = data > 0
    w = torch.where(pos, data**2, torch.zeros_like(data))
    logs = torch.log(torch.where(pos, data, torch.full_like(data, 1.0)).clamp_min(tiny))
    sw = w.sum(-1).clamp_min(tiny)
    tm = (w * t).sum(-1) / sw
    lm = (w * logs).sum(-1) / sw
    cov = (w * (t - tm[..., None]) * (logs - lm[..., None])).sum(-1)
    var = (w * (t - tm[..., None]) ** 2).sum(-1)
    slope = cov / torch.where(var > 0, var, torch.ones_like(var))
    s0 = torch.exp(lm - slope * tm)
    return s0, -slope


class MESEMonoModel(SignalModel):
    name = "mese-mono"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T2", "s", 1e-3, 5.0),
    )

    def __init__(self, echo_time: ArrayLike) -> None:
        self.echo_time = as_protocol_tensor(echo_time)

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        # b1 is accepted for interface uniformity; the mono-exponential model ignores it
        # (that is its known bias with imperfect refocusing, which the EPG model addresses).
        return params[..., 0:1] * torch.exp(-like(self.echo_time, params) / params[..., 1:2])

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        s0, r2 = loglinear_exponential_fit(data, like(self.echo_time, data))
        lo, hi = self.parameters[1].lower, self.parameters[1].upper
        t2 = torch.where(r2 > 0, 1.0 / r2.clamp_min(1e-12), torch.full_like(r2, hi)).clamp(lo, hi)
        s0 = torch.where(torch.isfinite(s0), s0, data.abs().amax(-1))
        return torch.stack([s0, t2], dim=-1)
