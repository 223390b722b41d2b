"""Magnetisation transfer saturation (MTsat) from an MT-weighted trio (Helms et al., MRM 2008;
60:1396, with the 2010 erratum), in the small flip angle / short TR approximation:

    S = A · κα · R1·TR / (R1·TR + (κα)²/2 + δ)

with δ = MTsat for the MT-weighted member and δ = 0 for the PD- and T1-weighted (mt-off) members.
The two mt-off members give R1 and A in closed form (a two-point VFA with possibly different TRs);
the MT-weighted one then gives δ. ``MTsat`` is a fraction (Helms report it in p.u. = 100·MTsat).

B1 correction, with a relative B1+ map κ (a ``TB1map``):

* the estimators fit T1 and A of the mt-off pair with the flip angles κα, so the T1 and M0 maps
  are B1-corrected;
* MTsat: in Helms' δ computed with nominal flip angles, the κ⁻² from the excitation angles and
  the growth of the MT pulse's saturation with κ partly cancel; the rest (about ±13 % over
  κ = 0.8-1.2 in their model) Weiskopf et al. (Front. Neurosci. 2013;7:95) removed with an
  empirical correction of that nominal-angle MTsat,

      MTsat_corr = MTsat_nominal · (1 − λ) / (1 − λ·κ),   λ = 0.4,

  as the hMRI toolbox applies it (its "helms" model: A, R1 and MTsat at B1 = 1, then this factor).
  In Helms' small-angle model MTsat_nominal = δ_κ / κ² exactly, where δ_κ uses the B1-corrected
  A, T1 and MT flip angle; so δ_κ is computed from the B1-corrected fit and the factor applied to
  δ_κ / κ². Applying the factor to δ_κ itself would correct the flip angles twice.

λ = 0.4 was fitted for their MT pulse (Siemens FLASH, 4 ms Gaussian MT pulse, 220° nominal, 2 kHz
off resonance, 3 T); it depends on the MT pulse's shape, power and offset, so for another MT pulse
the correction is an approximation (:data:`WEISKOPF_LAMBDA`). The MTsat sidecar records the
correction (``B1Correction``) or its absence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmri_bids.errors import BadDataError
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
from qmri_bids.qmri.models.vfa import M0_OUTPUT, T1_OUTPUT, T1_PRIOR, VFAModel
from qmri_bids.qmri.prior import B1_RANGE, B1_SOURCES, T1_BRAIN_SOURCES, ParameterPrior, PriorRange

HELMS_2008 = ("Helms G, Dathe H, Kallenberg K, Dechent P. High-resolution maps of magnetization "
              "transfer with inherent correction for RF inhomogeneity and T1 relaxation obtained "
              "from 3D FLASH MRI. MRM 2008;60:1396-1407, and its 2010 erratum")
WEISKOPF_2013 = ("Weiskopf N, Suckling J, Williams G, Correia MM, Inkster B, Tait R, Ooi C, "
                 "Bullmore ET, Lutti A. Quantitative multi-parameter mapping of R1, PD*, MT, and "
                 "R2* at 3T: a multi-center validation. Front Neurosci 2013;7:95")
#: λ of the empirical MTsat B1 correction, the published value for the MT pulse of Weiskopf et
#: al. 2013; protocol dependent (see the module docstring)
WEISKOPF_LAMBDA = 0.4


def b1_corrected_mtsat(mtsat_nominal: np.ndarray | torch.Tensor, b1: np.ndarray | torch.Tensor,
                       lam: float = WEISKOPF_LAMBDA) -> np.ndarray | torch.Tensor:
    """Weiskopf et al. 2013: MTsat · (1 − λ) / (1 − λ·B1) of the MTsat computed with *nominal*
    flip angles (B1 relative, 1 = nominal)."""
    return mtsat_nominal * (1.0 - lam) / (1.0 - lam * b1)


class MTSModel(SignalModel):
    name = "mts"
    parameters = (
        ParameterSpec("A", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T1", "s", 1e-2, 10.0),
        ParameterSpec("MTsat", "fraction", 0.0, 0.5),
    )
    collection = CollectionSpec("MTS", ("flip", "mt"),
                                ("FlipAngle", "MTState", "RepetitionTimeExcitation"),
                                min_members=3, description="MT saturation (MTsat, T1)")
    # T1 and M0 come from the estimators of the mt-off pair (estimation_model); MTsat in p.u.
    outputs = (T1_OUTPUT, M0_OUTPUT, MapSpec("MTsat", "MTsat", "p.u."))
    # the mt-off pair's M0 = PD x receive field: mapping adds the PDmap (qmri.receive)
    proton_density = ProtonDensitySpec()
    varying_fields = frozenset({"FlipAngle", "RepetitionTime", "RepetitionTimeExcitation",
                                "MTState"})
    fixed_roles = True

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

    def to_protocol(self) -> dict[str, Any]:
        return {"flip_angle_deg": floats(self.flip_angle_deg), "tr": floats(self.tr),
                "mt_on": [bool(v) for v in (self.mt_on > 0.5).tolist()]}

    @classmethod
    def from_sidecars(cls, members: Sequence[sidecar.Member]) -> MTSModel:
        sidecar.require_members(members, 3, "MTS")
        fa = sidecar.numbers(members, "FlipAngle")
        tr = [sidecar.repetition_time(m, True, True) for m in members]
        on = np.array([sidecar.mt_state(m) for m in members])
        if on.sum() != 1 or (~on).sum() != 2:
            names = ", ".join(sidecar.member_name(m) for m in members)
            raise BadDataError(f"MTS collection needs one mt-on and two mt-off members, "
                               f"got {int(on.sum())} on / {int((~on).sum())} off "
                               f"({names})")
        sidecar.require_variation([m for m, o in zip(members, on, strict=True) if not o],
                                  "FlipAngle", fa[~on])
        return cls(fa, tr, on)

    @classmethod
    def members_problem(cls, members: Sequence[sidecar.Member]) -> tuple[Path, str] | None:
        if not {"on", "off"} <= {m.entities.get("mt") for m in members}:
            return members[0].path, "an MTS collection needs mt-on and mt-off members"
        return None

    def default_prior(self) -> ParameterPrior:
        return ParameterPrior(
            self.name, (T1_PRIOR, PriorRange("MTsat", 0.001, 0.06, False, "fraction")), "A", (),
            B1_RANGE, T1_BRAIN_SOURCES + " MTsat 0.1-6 %: WM ~4 %, GM ~2 % (Helms et al., MRM "
            "2008;60:1396). " + B1_SOURCES)

    def _pair(self) -> list[int]:
        # the mt-off members, smaller flip angle first (the order the VFA model sorts them in)
        return [self.index_pd, self.index_t1]

    def estimation_model(self, b1_known: bool = False) -> VFAModel:
        """The exact SPGR model of the mt-off pair (TRs may differ): its T1 and M0 are better
        than the small-angle closed form, and a network trained for it maps them."""
        pair = self._pair()
        return VFAModel(self.flip_angle_deg[pair], self.tr[pair])

    def estimation_data(self, data: np.ndarray) -> np.ndarray:
        return data[..., self._pair()]

    def derived_maps(self, values: dict[str, np.ndarray], data: np.ndarray,
                     b1: np.ndarray | None, mask: np.ndarray) -> dict[str, np.ndarray]:
        """MTsat in p.u. from the MT-weighted member and the estimator's T1 and M0 (fitted with
        the B1-corrected flip angles when ``b1`` is known); with ``b1``, the empirical correction
        of Weiskopf 2013 (:func:`b1_corrected_mtsat`, see the module docstring)."""
        s_mt = torch.as_tensor(data[..., self.index_mt])
        kappa = None if b1 is None else torch.as_tensor(b1)
        mtsat = self.mtsat(s_mt, torch.as_tensor(values["M0"]), torch.as_tensor(values["T1"]),
                           kappa)
        if kappa is not None:
            # δ_κ / κ² is the nominal-angle MTsat the empirical correction was fitted to
            mtsat = b1_corrected_mtsat(mtsat / kappa**2, kappa)
        return {**values, "MTsat": np.where(mask, mtsat.numpy() * 100.0, np.nan)}

    def derived_metadata(self, b1: np.ndarray | None) -> dict[str, dict[str, Any]]:
        """How MTsat was computed, and its B1 correction (or why there is none)."""
        if b1 is None:
            correction: dict[str, Any] = {
                "Applied": False,
                "Description": "no TB1map: nominal flip angles, and the B1 dependence of the MT "
                               "pulse is not corrected (Helms' MTsat compensates the excitation "
                               "flip angles only to first order)"}
            how = "MTsat (Helms et al. 2008) with nominal flip angles, no B1 correction"
        else:
            correction = {
                "Applied": True,
                "Description": "T1 and M0 fitted with the flip angles scaled by the relative "
                               "B1+ of the TB1map; MTsat from them with the corrected MT flip "
                               "angle, converted to the nominal-angle MTsat (divided by B1^2, "
                               "exact in Helms' small-angle model) and corrected for the "
                               "residual B1 dependence of the MT pulse: MTsat_corr = "
                               "MTsat_nominal (1 - Lambda) / (1 - Lambda B1), as in the hMRI "
                               "toolbox",
                "Lambda": WEISKOPF_LAMBDA,
                "LambdaNote": "published value for the MT pulse of Weiskopf et al. 2013 (4 ms "
                              "Gaussian, 220 deg nominal, 2 kHz offset, 3 T); it depends on the "
                              "MT pulse's shape, power and offset, so for another MT pulse the "
                              "correction is approximate",
                "Reference": WEISKOPF_2013}
            how = ("MTsat (Helms et al. 2008) with B1-corrected flip angles and the empirical B1 "
                   f"correction of Weiskopf et al. 2013 (lambda = {WEISKOPF_LAMBDA:g})")
        references = [HELMS_2008] + ([WEISKOPF_2013] if b1 is not None else [])
        return {"MTsat": {"EstimationAlgorithm": how, "B1Correction": correction,
                          "EstimationReference": references}}

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
