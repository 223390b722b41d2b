"""Mono-exponential multi-echo spin echo T2 model: S = M0 · exp(−TE/T2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from qmri_bids.qmri.base import CollectionSpec, MapSpec, ParameterSpec, SignalModel
from qmri_bids.qmri.models._common import EchoTrainModel, like
from qmri_bids.qmri.models.vfa import M0_OUTPUT
from qmri_bids.qmri.prior import ParameterPrior, PriorRange

if TYPE_CHECKING:
    from qmri_bids.qmri.dictionary import DictionaryGrid

#: T2 map with its reciprocal, shared by the T2 models
T2_OUTPUT = MapSpec("T2", "T2map", "s", ("R2map", "1/s"))
T2_PRIOR = PriorRange("T2", 0.01, 0.5, True, "s")
T2_SOURCES = ("T2 0.01-0.5 s log-uniform: muscle/liver ~30-40 ms, kidney cortex/medulla ~70-120 "
              "ms, brain 70-100 ms, long-T2 fluid-rich tissue up to ~0.5 s at 1.5-3 T "
              "(Stanisz 2005; de Bazelaire et al., Radiology 2004;230:652).")


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


#: shortest CPMG train mapped with the EPG model (below it, T2 and B1 are too correlated for the
#: three-parameter fit to gain over the mono-exponential one)
MIN_EPG_ECHOES = 4


class MESEMonoModel(EchoTrainModel):
    name = "mese-mono"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T2", "s", 1e-3, 5.0),
    )
    collection = CollectionSpec("MESE", ("echo",), ("EchoTime",),
                                description="multi-echo spin echo (T2)")
    outputs = (T2_OUTPUT, M0_OUTPUT)
    # The EPG dictionary (stimulated echoes) is the field's reference for CPMG T2 mapping.
    estimators = ("nn", "nlls", "dict")
    def default_prior(self) -> ParameterPrior:
        return ParameterPrior(self.name, (T2_PRIOR,), "M0", (), None, T2_SOURCES)

    def estimation_model(self, b1_known: bool = False) -> SignalModel:
        """The EPG model of the train when it is a CPMG train (TE_n = n ESP) of at least
        :data:`MIN_EPG_ECHOES` echoes, else this mono-exponential model.

        Why: refocusing below 180 deg (B1 < 1, slice profiles) puts stimulated echoes into every
        real CPMG train; the mono-exponential model cannot describe them and its T2 is biased by
        several CRB standard deviations on long trains (benchmarks/qmri/bench_cpmg.py). The EPG
        model describes them: with a B1 map (``b1_known``) B1 is a network input, without one it
        is estimated from the train itself (the B1 <= 1 branch, see ``mese_epg.py``)."""
        from qmri_bids.qmri.models.mese_epg import MESEEPG

        te = self.echo_time.numpy()
        if te.size < MIN_EPG_ECHOES or not np.allclose(
                te, te[0] * np.arange(1, te.size + 1), rtol=1e-3, atol=1e-6):
            return self
        return MESEEPG.from_echo_times(te.tolist(), estimate_b1=not b1_known)

    def dictionary(self, b1: np.ndarray | None, mask: np.ndarray
                   ) -> tuple[SignalModel, DictionaryGrid, bool]:
        """The EPG model of the same echo train on T2 x B1 (B1 is estimated, not taken from a
        map: the refocusing efficiency is what the dictionary resolves)."""
        from qmri_bids.qmri.dictionary import default_mese_epg_grid
        from qmri_bids.qmri.models.mese_epg import MESEEPG

        return MESEEPG.from_echo_times(self.echo_time.tolist()), default_mese_epg_grid(), False

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
