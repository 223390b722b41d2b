"""CPMG multi-echo spin echo with stimulated echoes, simulated with the EPG engine.

Sequence (per TR, starting from equilibrium, i.e. long TR / full recovery assumed):

* excitation of ``excitation_deg`` (default 90 deg) about x;
* ``n_echoes`` times: relax ``ESP/2``, one crusher gradient unit, refocusing pulse of
  ``refocus_deg`` (default 180 deg) about y (CPMG condition), relax ``ESP/2``, one gradient unit,
  read ``F+_0`` at ``TE_n = n * ESP``.

The refocusing angle (and, by default, the excitation angle: B1+ scales every pulse) is multiplied
by the relative B1+ factor, so imperfect refocusing produces stimulated echoes: an even/odd echo
alternation whose second echo exceeds the first. At 180 deg and B1 = 1 the train is exactly
``M0 * exp(-TE/T2)``.

**B1 ambiguity.** With a nominal 180 deg refocusing (and 90 deg excitation) the echo train is
symmetric in B1 about 1: B1 and 2 - B1 give the same signal (the flip-angle error only enters
through even functions of it). Fits and :func:`~qmri_bids.qmri.dictionary.default_mese_epg_grid`
therefore report the B1 <= 1 branch; the parameter bounds stay wide for other nominal angles.

Parameters are ``(M0 [a.u.], T2 [s], B1 [relative])``; T1 only weights the stimulated-echo
pathways and is fixed (default 1 s, settable) because a CPMG train carries little T1 information.
The signal is the echo magnitude times M0 (real model).

The EPG is simulated with ``n_echoes + 1`` dephasing orders, which is exact (see
:func:`qmri_bids.qmri.epg.exact_n_states`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qmri_bids.qmri import epg
from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.models.mese import T2_OUTPUT, T2_PRIOR
from qmri_bids.qmri.models.vfa import M0_OUTPUT
from qmri_bids.qmri.prior import ParameterPrior, PriorRange

if TYPE_CHECKING:
    from qmri_bids.qmri.dictionary import DictionaryGrid

__all__ = ["MESEEPG"]

#: range of a known B1 (TB1map) the network of the B1-input variant is trained over
KNOWN_B1_RANGE = (0.6, 1.4)

#: B1 values tried by :meth:`MESEEPG.initial_guess` (the <= 1 branch, see the module docstring)
B1_CANDIDATES = (0.55, 0.65, 0.75, 0.85, 0.95)


class MESEEPG(SignalModel):
    """CPMG multi-echo spin echo EPG model (``name = "mese-epg"``).

    Args:
        echo_spacing: echo spacing ESP in s (echo ``n`` at ``n * ESP``, n = 1..n_echoes).
        n_echoes: number of echoes.
        t1: fixed T1 in s used for the stimulated-echo pathways (default 1 s).
        refocus_deg: nominal refocusing flip angle in degrees.
        excitation_deg: nominal excitation flip angle in degrees.
        b1_scales_excitation: whether B1 scales the excitation pulse too (physically it does;
            set False to mimic fits that assume a perfect 90 deg excitation).
        estimate_b1: if True, ``B1`` is the third model parameter; if False the model has only
            ``(M0, T2)`` and B1 comes from the ``b1`` argument of :meth:`forward` (default 1).
        n_states: EPG orders kept; default ``n_echoes + 1`` (exact).
    """

    name = "mese-epg"
    is_complex = False
    # The estimation model of CPMG MESE collections (MESEMonoModel.estimation_model) and their
    # dictionary model, not an entry point of discovery.
    outputs = (T2_OUTPUT, M0_OUTPUT)
    estimators = ("nn", "nlls", "dict")

    def __init__(
        self,
        echo_spacing: float,
        n_echoes: int,
        t1: float = 1.0,
        refocus_deg: float = 180.0,
        excitation_deg: float = 90.0,
        b1_scales_excitation: bool = True,
        estimate_b1: bool = True,
        n_states: int | None = None,
    ) -> None:
        if echo_spacing <= 0 or n_echoes < 1:
            raise ValueError("echo_spacing must be > 0 and n_echoes >= 1")
        self.echo_spacing = float(echo_spacing)
        self.n_echoes = int(n_echoes)
        self.t1 = float(t1)
        self.refocus_deg = float(refocus_deg)
        self.excitation_deg = float(excitation_deg)
        self.b1_scales_excitation = bool(b1_scales_excitation)
        self.estimate_b1 = bool(estimate_b1)
        self.n_states = int(n_states) if n_states is not None else epg.exact_n_states(
            2 * self.n_echoes
        )
        # M0 first, like the other models of the registry
        params = [
            ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
            ParameterSpec("T2", "s", 1e-3, 5.0),
        ]
        if self.estimate_b1:
            params.append(ParameterSpec("B1", "", 0.3, 1.7))
        self.parameters = tuple(params)

    def to_protocol(self) -> dict[str, Any]:
        return {"echo_spacing": self.echo_spacing, "n_echoes": self.n_echoes, "t1": self.t1,
                "refocus_deg": self.refocus_deg, "excitation_deg": self.excitation_deg,
                "b1_scales_excitation": self.b1_scales_excitation,
                "estimate_b1": self.estimate_b1, "n_states": self.n_states}

    def default_prior(self) -> ParameterPrior:
        """T2 as the mono-exponential model. Without a B1 map, B1 is estimated on its <= 1
        branch (0.5-1.0: the train is symmetric in B1 about 1 at a nominal 180 deg, so a prior
        across 1 would ask the network to tell apart signals that are identical); with a map,
        the known B1 is a network input over 0.6-1.4."""
        if self.estimate_b1:
            return ParameterPrior(self.name, (T2_PRIOR, PriorRange("B1", 0.5, 1.0, False, "")),
                                  "M0", (), None,
                                  "T2 as mese-mono; B1 (refocusing efficiency) 0.5-1.0, the "
                                  "branch below 1 of the B1 symmetry of a 180 deg CPMG train.")
        return ParameterPrior(self.name, (T2_PRIOR,), "M0", (), KNOWN_B1_RANGE,
                              "T2 as mese-mono; the known relative B1+ (TB1map) 0.6-1.4 is a "
                              "network input (1 when no map is given).")

    def dictionary(self, b1: np.ndarray | None, mask: np.ndarray
                   ) -> tuple[SignalModel, DictionaryGrid, bool]:
        """EPG dictionary on T2 x B1. Without a map B1 is a grid axis that is matched (the <= 1
        branch); with a map each voxel is matched against the atoms of its own B1 (grid step
        0.02 over the map's range)."""
        from qmri_bids.qmri.dictionary import default_mese_epg_grid

        if self.estimate_b1 or b1 is None:
            return (MESEEPG(**{**self.to_protocol(), "estimate_b1": True}),
                    default_mese_epg_grid(), False)
        lo, hi = np.nanpercentile(b1[mask], [0.5, 99.5])
        axis = np.round(np.arange(np.floor(lo * 50) / 50, np.ceil(hi * 50) / 50 + 1e-9, 0.02), 4)
        return self, default_mese_epg_grid(b1=axis), True

    @classmethod
    def from_echo_times(cls, echo_times: Sequence[float], **kwargs: object) -> MESEEPG:
        """Build from the echo times (s) of a collection; they must be ``n * ESP``, n = 1..N."""
        te = np.asarray(echo_times, dtype=float)
        esp = float(te[0])
        if not np.allclose(te, esp * np.arange(1, te.size + 1), rtol=1e-3, atol=1e-6):
            raise ValueError(f"echo times {te.tolist()} are not a CPMG train n*ESP")
        return cls(echo_spacing=esp, n_echoes=int(te.size), **kwargs)  # type: ignore[arg-type]

    @property
    def echo_times(self) -> torch.Tensor:
        return self.echo_spacing * torch.arange(1, self.n_echoes + 1, dtype=torch.float64)

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        """Start for NLLS: log-linear mono-exponential (M0, T2) from echoes 2.. (echo 1 carries
        the stimulated-echo deficit), then the best B1 of :data:`B1_CANDIDATES`."""
        te = self.echo_times.to(dtype=data.dtype, device=data.device)
        use = slice(1, None) if self.n_echoes >= 3 else slice(None)
        y, t = data[..., use], te[use]
        pos = y > 0
        w = torch.where(pos, y**2, torch.zeros_like(y))
        logs = torch.log(torch.where(pos, y, torch.ones_like(y)))
        sw = w.sum(-1).clamp_min(torch.finfo(data.dtype).tiny)
        tm = (w * t).sum(-1) / sw
        lm = (w * logs).sum(-1) / sw
        var = (w * (t - tm[..., None]) ** 2).sum(-1)
        slope = (w * (t - tm[..., None]) * (logs - lm[..., None])).sum(-1) / var.clamp_min(1e-30)
        lo, hi = self.parameters[1].lower, self.parameters[1].upper
        t2 = torch.where(slope < 0, -1.0 / slope.clamp_max(-1e-12), torch.full_like(slope, hi))
        t2 = t2.clamp(lo, hi)
        m0 = torch.exp(lm - slope * tm)
        m0 = torch.where(torch.isfinite(m0), m0, data.abs().amax(-1))
        if not self.estimate_b1:
            return torch.stack([m0, t2], dim=-1)
        # B1: best of a few candidates (M0 re-projected for each). B1 = 1 itself is avoided: at a
        # nominal 180 deg the signal is stationary in B1 there (zero gradient for LM).
        cand = torch.tensor(B1_CANDIDATES, dtype=data.dtype, device=data.device)
        cand = cand.reshape(-1, *([1] * t2.ndim)).expand(-1, *t2.shape)
        trial = torch.stack([torch.ones_like(cand), t2.expand_as(cand), cand], dim=-1)
        with torch.no_grad():
            f = self.forward(trial)
        scale = (f * data).sum(-1) / (f * f).sum(-1).clamp_min(torch.finfo(data.dtype).tiny)
        resid = ((scale.unsqueeze(-1) * f - data) ** 2).sum(-1)
        best = resid.argmin(0, keepdim=True)
        b1 = cand.gather(0, best).squeeze(0)
        m0 = torch.where(torch.isfinite(m0), scale.gather(0, best).squeeze(0), m0)
        return torch.stack([m0, t2, b1], dim=-1)

    @property
    def has_exact_jacobian(self) -> bool:
        return True

    def jacobian(self, params: torch.Tensor, b1: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal ``[..., E]`` and exact Jacobian ``[..., E, P]`` by (M0, T2[, B1]): one
        simulation of the EPG state stacked with its tangents
        (:func:`~qmri_bids.qmri.epg.relax_t2_tangent`, :func:`~qmri_bids.qmri.epg.rf_dalpha`
        for an estimated B1); M0 enters linearly. ~2-3x one simulation, exact."""
        m0, t2 = params[..., 0], params[..., 1]
        est = params[..., 2] if self.estimate_b1 else torch.ones_like(t2)
        known = torch.ones_like(t2) if b1 is None else \
            torch.as_tensor(b1, dtype=t2.dtype, device=t2.device).expand_as(t2)
        scale = est * known
        half = self.echo_spacing / 2
        e1, e2 = epg.relaxation_factors(half, torch.full_like(t2, self.t1), t2)
        de2 = e2 * half / t2**2
        exc_nom = math.radians(self.excitation_deg)
        ref_nom = math.radians(self.refocus_deg)
        exc_slope = exc_nom * known if self.b1_scales_excitation else torch.zeros_like(t2)
        exc = exc_nom * scale if self.b1_scales_excitation else exc_nom * torch.ones_like(t2)
        ref, ref_slope = ref_nom * scale, ref_nom * known  # d(angle)/d(estimated B1)
        n_slots = 3 if self.estimate_b1 else 2
        eq = epg.equilibrium(t2.shape, self.n_states, dtype=t2.dtype, device=t2.device)
        state = epg.EPGState(*(torch.cat([v[None], torch.zeros_like(v).expand(
            n_slots - 1, *v.shape)]) for v in eq))

        def pulse(st: epg.EPGState, angle: torch.Tensor, slope: torch.Tensor,
                  phase: float) -> epg.EPGState:
            out = epg.rf(st, angle, phase)
            if not self.estimate_b1:
                return out
            d = epg.rf_dalpha(epg.EPGState(st.fp[0], st.fm[0], st.z[0]), angle, phase)
            s_ = slope.unsqueeze(-1)
            fp, fm, z = out.fp.clone(), out.fm.clone(), out.z.clone()
            fp[2] += s_ * d.fp
            fm[2] += s_ * d.fm
            z[2] += s_ * d.z
            return epg.EPGState(fp, fm, z)

        state = pulse(state, exc, exc_slope, 0.0)
        echoes = []
        for _ in range(self.n_echoes):
            state = epg.shift(epg.relax_t2_tangent(state, e1, e2, de2))
            state = pulse(state, ref, ref_slope, math.pi / 2)
            state = epg.shift(epg.relax_t2_tangent(state, e1, e2, de2))
            echoes.append(state.signal())
        f = torch.stack(echoes, dim=-1)  # [slots, ..., E]: complex echo and its derivatives
        mag = f[0].abs()
        dmag = (f[0].conj() * f[1:]).real / mag.clamp_min(torch.finfo(mag.dtype).tiny)
        m0u = m0.unsqueeze(-1)
        return mag * m0u, torch.stack([mag, *(m0u * d for d in dmag)], -1)

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        m0 = params[..., 0]
        t2 = params[..., 1]
        scale = params[..., 2] if self.estimate_b1 else torch.ones_like(t2)
        if b1 is not None:
            # a known B1 map multiplies (the estimated B1, if any, is then a residual factor)
            scale = scale * torch.as_tensor(b1, dtype=t2.dtype, device=t2.device)
        batch = torch.broadcast_shapes(t2.shape, scale.shape)
        t1 = torch.full_like(t2, self.t1)
        e1, e2 = epg.relaxation_factors(self.echo_spacing / 2, t1, t2)

        exc = math.radians(self.excitation_deg)
        exc = exc * scale if self.b1_scales_excitation else exc * torch.ones_like(scale)
        ref = math.radians(self.refocus_deg) * scale

        state = epg.equilibrium(batch, self.n_states, dtype=t2.dtype, device=t2.device)
        state = epg.rf(state, exc, 0.0)
        echoes = []
        for _ in range(self.n_echoes):  # loop over echoes only
            state = epg.shift(epg.relax(state, e1, e2))
            state = epg.rf(state, ref, math.pi / 2)  # CPMG: refocusing about y
            state = epg.shift(epg.relax(state, e1, e2))
            echoes.append(state.signal())
        signal = torch.stack(echoes, dim=-1).abs()
        return signal * m0.unsqueeze(-1)
