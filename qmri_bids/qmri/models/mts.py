"""Magnetisation transfer saturation (MTsat) from an MT-weighted trio (Helms et al., MRM 2008;
60:1396, with the 2010 erratum), in the small flip angle / short TR approximation:

    S = A · κα · R1·TR / (R1·TR + (κα)²/2 + δ)

with δ = MTsat for the MT-weighted member and δ = 0 for the PD- and T1-weighted (mt-off) members.
The two mt-off members give R1 and A in closed form (a two-point VFA with possibly different TRs);
the MT-weighted one then gives δ. ``MTsat`` is a fraction (Helms report it in p.u. = 100·MTsat).
No empirical B1 correction of MTsat (Weiskopf 2013) is applied; κ corrects the flip angles only.
"""

from __future__ import annotations

import torch

from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.models._common import DEG, ArrayLike, as_protocol_tensor, b1_factor, like


class MTSModel(SignalModel):
    name = "mts"
    parameters = (
        ParameterSpec("A", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T1", "s", 1e-2, 10.0),
        ParameterSpec("MTsat", "fraction", 0.0, 0.5),
    )

    def __init__(self, flip_angle_deg: ArrayLike, tr: ArrayLike, mt_on: ArrayLike) -> None:
        self.flip_angle_deg = as_protocol_tensor(flip_angle_deg)
        self.tr = torch.broadcast_to(as_protocol_tensor(tr), self.flip_angle_deg.shape).clone()
        self.mt_on = as_protocol_tensor(mt_on)
        on = self.mt_on > 0.5
        off = torch.nonzero(~on).flatten()
        if int(on.sum()) != 1 or off.numel() != 2:
            raise ValueError("MTsat needs exactly one mt-on and two mt-off members")
        fa_off = self.flip_angle_deg[off]
        if float(fa_off[0]) == float(fa_off[1]):
            raise ValueError("the two mt-off members need different flip angles")
        # PDw = the smaller flip angle of the mt-off pair, T1w = the larger one.
        self.index_pd = int(off[torch.argmin(fa_off)])
        self.index_t1 = int(off[torch.argmax(fa_off)])
        self.index_mt = int(torch.nonzero(on).flatten()[0])

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        a, t1, delta = params[..., 0:1], params[..., 1:2], params[..., 2:3]
        alpha = like(self.flip_angle_deg, params) * DEG * b1_factor(b1, params)
        r1tr = like(self.tr, params) / t1
        return a * alpha * r1tr / (r1tr + alpha**2 / 2 + delta * like(self.mt_on, params))

    def maps(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Closed-form MTsat, A, R1 (and T1 = 1/R1) from ``data[..., 3]`` (Helms 2008, eqs. 6–7)."""
        k = b1_factor(b1, data)[..., 0] if b1 is not None else torch.ones((), dtype=data.dtype,
                                                                          device=data.device)
        fa = like(self.flip_angle_deg, data) * DEG
        tr = like(self.tr, data)
        a_pd, a_t1, a_mt = k * fa[self.index_pd], k * fa[self.index_t1], k * fa[self.index_mt]
        tr_pd, tr_t1, tr_mt = tr[self.index_pd], tr[self.index_t1], tr[self.index_mt]
        s_pd, s_t1, s_mt = data[..., self.index_pd], data[..., self.index_t1], data[..., self.index_mt]
        r1 = 0.5 * (s_t1 * a_t1 / tr_t1 - s_pd * a_pd / tr_pd) / (s_pd / a_pd - s_t1 / a_t1)
        amp = s_pd / a_pd + s_pd * a_pd / (2 * tr_pd * r1)
        mtsat = (amp * a_mt / s_mt - 1) * r1 * tr_mt - a_mt**2 / 2
        return {"MTsat": mtsat, "A": amp, "R1": r1, "T1": 1.0 / r1}

    def mtsat(self, s_mt: torch.Tensor, amplitude: torch.Tensor, t1: torch.Tensor,
              b1: torch.Tensor | None = None) -> torch.Tensor:
        """MTsat of the MT-weighted signal given A (≈ M0) and T1 from any estimator (Helms eq. 7).

        Lets the mapping use T1/M0 of a better estimator (exact SPGR fit or a network) of the
        two mt-off members instead of the small-angle closed form.
        """
        k = b1_factor(b1, s_mt[..., None])[..., 0] if b1 is not None else 1.0
        a_mt = k * like(self.flip_angle_deg, s_mt)[self.index_mt] * DEG
        tr_mt = like(self.tr, s_mt)[self.index_mt]
        return (amplitude * a_mt / s_mt - 1) * tr_mt / t1 - a_mt**2 / 2

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        m = self.maps(data, b1)
        lo, hi = self.bounds(data.dtype, data.device)
        p = torch.stack([m["A"], m["T1"], m["MTsat"]], dim=-1)
        p = torch.where(torch.isfinite(p), p, (lo + hi.clamp_max(1.0)) / 2)
        return torch.maximum(torch.minimum(p, hi), lo)
