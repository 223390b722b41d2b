"""Multi-echo gradient echo magnitude model: S = S0 · exp(−R2* · TE); T2* = 1/R2*."""

from __future__ import annotations

import numpy as np
import torch

from qmri_bids.qmri.base import CollectionSpec, MapSpec, ParameterSpec
from qmri_bids.qmri.models._common import EchoTrainModel, like
from qmri_bids.qmri.models.mese import loglinear_exponential_fit
from qmri_bids.qmri.prior import ParameterPrior, PriorRange


class MEGREModel(EchoTrainModel):
    name = "megre"
    # Fitted in R2* (not T2*) because R2* = 0 is a valid, well-conditioned value (no decay).
    parameters = (
        ParameterSpec("S0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("R2star", "1/s", 0.0, 1000.0),
    )
    collection = CollectionSpec("MEGRE", ("echo",), ("EchoTime",),
                                description="multi-echo gradient echo (T2*)")
    outputs = (MapSpec("T2star", "T2starmap", "s"), MapSpec("R2star", "R2starmap", "1/s"),
               MapSpec("S0", "S0map", "arbitrary"))

    def default_prior(self) -> ParameterPrior:
        return ParameterPrior(
            self.name, (PriorRange("R2star", 5.0, 200.0, True, "1/s"),), "S0", (), None,
            "R2* 5-200 1/s log-uniform: brain 15-30 1/s, deep grey matter ~40 1/s, liver ~30 1/s, "
            "iron overload to ~200 1/s at 3 T (Peran et al., Brain 2007; Wood et al., Blood 2005).")

    def derived_maps(self, values: dict[str, np.ndarray], data: np.ndarray,
                     b1: np.ndarray | None, mask: np.ndarray) -> dict[str, np.ndarray]:
        """T2* = 1/R2* (infinite where R2* = 0: no decay)."""
        if "R2star" not in values:
            return values
        t2star = self.t2star(torch.as_tensor(values["R2star"])).numpy()
        return {**values, "T2star": t2star}

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
