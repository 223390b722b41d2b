"""Spoiled gradient echo (SPGR) / DESPOT1 variable flip angle T1 model.

S = M0 · sin(κα) · (1 − E1) / (1 − E1 · cos(κα)),  E1 = exp(−TR/T1)

κ is the relative B1+ (``b1``). TR may differ per member (e.g. the two mt-off images of an MT
protocol acquired with TR 28 and 18 ms), which is why it is stored per flip angle.
"""

from __future__ import annotations

import torch

from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.models._common import DEG, ArrayLike, as_protocol_tensor, b1_factor, like


class VFAModel(SignalModel):
    name = "vfa"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T1", "s", 1e-3, 10.0),
    )

    def __init__(self, flip_angle_deg: ArrayLike, tr: ArrayLike) -> None:
        self.flip_angle_deg = as_protocol_tensor(flip_angle_deg)
        self.tr = torch.broadcast_to(as_protocol_tensor(tr), self.flip_angle_deg.shape).clone()

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        m0, t1 = params[..., 0:1], params[..., 1:2]
        alpha = like(self.flip_angle_deg, params) * DEG * b1_factor(b1, params)
        e1 = torch.exp(-like(self.tr, params) / t1)
        return m0 * torch.sin(alpha) * (1 - e1) / (1 - e1 * torch.cos(alpha))

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        """Linear DESPOT1: S/sin α = E1 · S/tan α + M0(1 − E1), least squares per voxel.

        With different TRs the line is only approximate (mean TR is used); LM then refines it.
        """
        alpha = like(self.flip_angle_deg, data) * DEG * b1_factor(b1, data)
        y = data / torch.sin(alpha)
        x = data / torch.tan(alpha)
        xm, ym = x.mean(-1, keepdim=True), y.mean(-1, keepdim=True)
        var = ((x - xm) ** 2).sum(-1)
        slope = ((x - xm) * (y - ym)).sum(-1) / torch.where(var > 0, var, torch.ones_like(var))
        tiny = torch.finfo(data.dtype).eps
        e1 = slope.clamp(1e-6, 1 - 1e3 * tiny)
        intercept = (ym.squeeze(-1) - slope * xm.squeeze(-1)).clamp_min(0)
        m0 = intercept / (1 - e1)
        tr = like(self.tr, data).mean()
        t1 = (-tr / torch.log(e1)).clamp(self.parameters[1].lower, self.parameters[1].upper)
        # A voxel whose line is degenerate (noise, background) gets M0 from the largest signal.
        m0 = torch.where(torch.isfinite(m0) & (m0 > 0), m0, data.abs().amax(-1) * 10)
        return torch.stack([m0, t1], dim=-1)
