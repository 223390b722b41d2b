"""Spoiled gradient echo (SPGR) / DESPOT1 variable flip angle T1 model.

S = M0 · sin(κα) · (1 − E1) / (1 − E1 · cos(κα)),  E1 = exp(−TR/T1)

κ is the relative B1+ (``b1``). TR may differ per member (e.g. the two mt-off images of an MT
protocol acquired with TR 28 and 18 ms), which is why it is stored per flip angle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qmri_bids.qmri import sidecar
from qmri_bids.qmri.base import (
    CollectionSpec,
    MapSpec,
    ParameterSpec,
    ProtonDensitySpec,
    SignalModel,
    floats,
)
from qmri_bids.qmri.models._common import DEG, ArrayLike, as_protocol_tensor, b1_factor, like
from qmri_bids.qmri.prior import B1_RANGE, B1_SOURCES, T1_BRAIN_SOURCES, ParameterPrior, PriorRange

#: T1 map with its reciprocal, shared by every T1 model
T1_OUTPUT = MapSpec("T1", "T1map", "s", ("R1map", "1/s"))
M0_OUTPUT = MapSpec("M0", "M0map", "arbitrary")
#: T1 prior shared by the T1 models (log-uniform over brain tissue at 1.5-7 T)
T1_PRIOR = PriorRange("T1", 0.2, 5.0, True, "s")


class VFAModel(SignalModel):
    name = "vfa"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T1", "s", 1e-3, 10.0),
    )
    collection = CollectionSpec("VFA", ("flip",), ("FlipAngle", "RepetitionTimeExcitation"),
                                description="variable flip angle SPGR (T1, M0)")
    outputs = (T1_OUTPUT, M0_OUTPUT)
    # M0 = PD x receive field: mapping adds the receive-corrected PDmap (qmri.receive)
    proton_density = ProtonDensitySpec()
    order_field = "FlipAngle"
    varying_fields = frozenset({"FlipAngle", "RepetitionTime", "RepetitionTimeExcitation"})

    def __init__(self, flip_angle_deg: ArrayLike, tr: ArrayLike) -> None:
        self.flip_angle_deg = as_protocol_tensor(flip_angle_deg)
        self.tr = torch.broadcast_to(as_protocol_tensor(tr), self.flip_angle_deg.shape).clone()

    def to_protocol(self) -> dict[str, Any]:
        return {"flip_angle_deg": floats(self.flip_angle_deg), "tr": floats(self.tr)}

    @classmethod
    def from_sidecars(cls, members: Sequence[sidecar.Member]) -> VFAModel:
        sidecar.require_members(members, 2, "VFA")
        fa = sidecar.numbers(members, "FlipAngle")
        tr = [sidecar.repetition_time(m, True, True) for m in members]
        sidecar.require_variation(members, "FlipAngle", fa)
        return cls(fa, tr)

    def default_prior(self) -> ParameterPrior:
        return ParameterPrior(self.name, (T1_PRIOR,), "M0", (), B1_RANGE,
                              T1_BRAIN_SOURCES + " " + B1_SOURCES)

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
