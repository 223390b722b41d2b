"""Multi-echo gradient echo magnitude model: S = S0 · exp(−R2* · TE); T2* = 1/R2*."""

from __future__ import annotations

import torch

from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.models._common import ArrayLike, as_protocol_tensor, like
from qmri_bids.qmri.models.mese import loglinear_exponential_fit


class MEGREModel(SignalModel):
    name = "megre"
    # Fitted in R2* (not T2*) because R2* = 0 is a valid, well-conditioned value (no decay).
    parameters = (
        ParameterSpec("S0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("R2star", "1/s", 0.0, 1000.0),
    )

    def __init__(self, echo_time: ArrayLike) -> None:
        self.echo_time = as_protocol_tensor(echo_time)

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        return params[..., 0:1] * torch.exp(-params[..., 1:2] * like(self.echo_time, params))

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        s0, r2s = loglinear_exponential_fit(data, like(self.echo_time, data))
        r2s = r2s.clamp(self.parameters[1].lower, self.parameters[1].upper)
        s0 = torch.where(torch.isfinite(s0), s0, data.abs().amax(-1))
        return torch.stack([s0, r2s], dim=-1)

    @staticmethod
    def t2star(r2star: torch.Tensor) -> torch.Tensor:
        """T2* [s] from R2* [1/s] (infinite where R2* = 0)."""
        return 1.0 / r2star
