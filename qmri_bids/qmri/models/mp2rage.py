"""MP2RAGE closed-form signal (Marques et al., NeuroImage 2010;49:1271, appendix) and the
UNI → T1 lookup (B1-aware, as in Marques & Gruetter 2013).

Longitudinal magnetisation is propagated through one MP2RAGE cycle in closed form: adiabatic
inversion (efficiency η), free relaxation, a readout train of ``n_before + n_after`` small-angle
excitations (TR = ``tr_excitation``) whose k-space centre is at each inversion time, and so on
until ``tr_preparation``; the steady state is solved analytically. The model returns the two
(signed, real) GRE signals at the k-space centre; UNI = S1·S2 / (S1² + S2²).
"""

from __future__ import annotations

import math

import torch

from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.models._common import DEG, ArrayLike, as_protocol_tensor, like


class MP2RAGEModel(SignalModel):
    name = "mp2rage"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T1", "s", 0.05, 5.0),
    )

    def __init__(
        self,
        inversion_time: ArrayLike,
        flip_angle_deg: ArrayLike,
        tr_excitation: float,
        tr_preparation: float,
        n_before: int,
        n_after: int,
        inversion_efficiency: float = 0.96,
    ) -> None:
        self.inversion_time = as_protocol_tensor(inversion_time)
        self.flip_angle_deg = as_protocol_tensor(flip_angle_deg)
        if self.inversion_time.numel() != 2 or self.flip_angle_deg.numel() != 2:
            raise ValueError("MP2RAGE needs two inversion times and two flip angles")
        self.tr_excitation = float(tr_excitation)
        self.tr_preparation = float(tr_preparation)
        self.n_before, self.n_after = int(n_before), int(n_after)
        self.inversion_efficiency = float(inversion_efficiency)
        n = self.n_before + self.n_after
        ti = [float(t) for t in self.inversion_time]
        # Free-relaxation gaps between readout trains; all must be non-negative to be feasible.
        self.gaps = (
            ti[0] - self.n_before * self.tr_excitation,
            ti[1] - ti[0] - n * self.tr_excitation,
            self.tr_preparation - ti[1] - self.n_after * self.tr_excitation,
        )
        if min(self.gaps) < 0:
            raise ValueError(f"MP2RAGE timing infeasible (negative delays {self.gaps})")

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        m0, t1 = params[..., 0], params[..., 1]
        kappa = torch.ones_like(t1) if b1 is None else torch.as_tensor(b1).to(t1)
        fa = like(self.flip_angle_deg, params) * DEG
        n = self.n_before + self.n_after
        e1 = torch.exp(-self.tr_excitation / t1)
        etd = [torch.exp(-g / t1) for g in self.gaps]
        ca = [torch.cos(kappa * fa[i]) * e1 for i in range(2)]
        sa = [torch.sin(kappa * fa[i]) for i in range(2)]
        eta = self.inversion_efficiency

        def train(mz: torch.Tensor, c: torch.Tensor, m: int) -> torch.Tensor:
            # m excitations of a spoiled train: Mz → Mz·c^m + M0(1−E1)(1−c^m)/(1−c)
            cm = c**m
            return mz * cm + m0 * (1 - e1) * (1 - cm) / (1 - c)

        # Steady state Mz just before the inversion pulse (Marques 2010, eq. A.1 ff.).
        num = m0 * (1 - etd[0])
        for k in range(2):
            num = train(num, ca[k], n)
            num = num * etd[k + 1] + m0 * (1 - etd[k + 1])
        mzss = num / (1 + eta * (ca[0] * ca[1]) ** n * etd[0] * etd[1] * etd[2])
        mz = -eta * mzss * etd[0] + m0 * (1 - etd[0])
        mz = train(mz, ca[0], self.n_before)
        s1 = sa[0] * mz
        mz = train(mz, ca[0], self.n_after)
        mz = mz * etd[1] + m0 * (1 - etd[1])
        mz = train(mz, ca[1], self.n_before)
        s2 = sa[1] * mz
        return torch.stack([s1, s2], dim=-1)

    @staticmethod
    def uni_from_signals(gre: torch.Tensor) -> torch.Tensor:
        """UNI = S1·S2 / (S1² + S2²), in [−0.5, 0.5], independent of M0, T2*, receive bias."""
        s1, s2 = gre[..., 0], gre[..., 1]
        return s1 * s2 / (s1**2 + s2**2)

    def uni(self, t1: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        params = torch.stack([torch.ones_like(t1), t1], dim=-1)
        return self.uni_from_signals(self.forward(params, b1))

    def lookup_table(
        self,
        b1_grid: torch.Tensor,
        n_uni: int = 401,
        n_t1: int = 2000,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T1 on a regular UNI grid for each B1 value: returns (uni_grid[n_uni], t1[len(b1), n_uni]).

        Only the monotonic branch of UNI(T1) between its extremes is used (UNI is ambiguous
        outside it); UNI values beyond the branch map to its end points.
        """
        dt = b1_grid.dtype
        lo, hi = self.parameters[1].lower, self.parameters[1].upper
        t1 = torch.logspace(math.log10(lo), math.log10(hi), n_t1, dtype=dt, device=b1_grid.device)
        uni_grid = torch.linspace(-0.5, 0.5, n_uni, dtype=dt, device=b1_grid.device)
        table = torch.empty(len(b1_grid), n_uni, dtype=dt, device=b1_grid.device)
        for i, kappa in enumerate(b1_grid):
            u = self.uni(t1, kappa.expand_as(t1))
            i0, i1 = sorted((int(torch.argmax(u)), int(torch.argmin(u))))
            u_b, t_b = u[i0 : i1 + 1], t1[i0 : i1 + 1]
            if u_b[0] > u_b[-1]:  # make increasing for interpolation
                u_b, t_b = u_b.flip(0), t_b.flip(0)
            table[i] = _interp(uni_grid, u_b, t_b)
        return uni_grid, table

    def t1_from_uni(
        self, uni: torch.Tensor, b1: torch.Tensor | None = None, n_b1: int = 41
    ) -> torch.Tensor:
        """T1 [s] from UNI (bilinear interpolation in the (B1, UNI) lookup table)."""
        if b1 is None:
            _, table = self.lookup_table(torch.ones(1, dtype=uni.dtype, device=uni.device))
            return _interp(uni, torch.linspace(-0.5, 0.5, table.shape[1]).to(uni), table[0])
        b1 = torch.as_tensor(b1).to(uni)
        lo, hi = float(b1.min()), float(b1.max())
        if hi - lo < 1e-6:
            hi = lo + 1e-3
        b1_grid = torch.linspace(lo, hi, n_b1, dtype=uni.dtype, device=uni.device)
        uni_grid, table = self.lookup_table(b1_grid)
        fb = ((b1 - lo) / (hi - lo) * (n_b1 - 1)).clamp(0, n_b1 - 1)
        fu = ((uni.clamp(-0.5, 0.5) + 0.5) * (len(uni_grid) - 1))
        ib0 = fb.floor().long().clamp(max=n_b1 - 2)
        iu0 = fu.floor().long().clamp(max=len(uni_grid) - 2)
        wb, wu = fb - ib0, fu - iu0
        t00, t01 = table[ib0, iu0], table[ib0, iu0 + 1]
        t10, t11 = table[ib0 + 1, iu0], table[ib0 + 1, iu0 + 1]
        return (1 - wb) * ((1 - wu) * t00 + wu * t01) + wb * ((1 - wu) * t10 + wu * t11)

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        t1 = self.t1_from_uni(self.uni_from_signals(data), b1)
        s = self.forward(torch.stack([torch.ones_like(t1), t1], -1), b1)
        m0 = (s * data).sum(-1) / (s * s).sum(-1).clamp_min(torch.finfo(data.dtype).tiny)
        return torch.stack([m0.clamp_min(0), t1], dim=-1)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """1-D linear interpolation (numpy.interp semantics, clamped at the ends) in torch."""
    idx = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0).where(x1 != x0, torch.ones_like(x1))).clamp(0, 1)
    return f0 + w * (f1 - f0)
