"""Double-angle B1+ mapping: the BIDS qMRI ``TB1DAM`` field-map collection (Insko EK, Bolinger L.
Mapping of the radiofrequency field. J Magn Reson A 1993;103:82-85).

Two images of one sequence at nominal flip angles α and 2α (``flip-1``, ``flip-2``), with TR long
against T1 so that the magnetisation recovers fully between excitations:

    S(α) = M0 · sin(κα),   S(2α) = M0 · sin(2κα) = 2 · S(α) · cos(κα)
    κ = arccos(S(2α) / (2 S(α))) / α

κ is the relative B1+ (1 = nominal flip angle), written as ``TB1map`` in that unit, the one
:func:`qmri_bids.qmri.protocols.load_b1map` reads. The collection ``provides`` it: the collections
of the same participant whose models depend on B1 and have no TB1map in ``fmap/`` are mapped with
it (resampled to their grid; :func:`qmri_bids.qmri.plan.link_b1_providers`).

Caveats of the method:

* **TR must be long against T1** (TR ≳ 5 T1). With partial saturation the 2α image loses more
  signal than the α image, S(2α)/S(α) falls and κ comes out too high (+12 % at TR = 2 s,
  T1 = 1.5 s, α = 60° for a spoiled gradient echo). A ``RepetitionTime`` below 5 × ``LONG_T1``
  is warned about with that expected bias (:func:`saturation_bias`).
* **Magnitude images** give |cos κα|, so κα must stay below 90°: κ is unambiguous only below
  90°/α (1.5 for the usual 60°/120°). The ratio is clipped to [0, 1], i.e. κ to [0, 90°/α].
* **Low signal**: κ is NaN outside the object (the mapping's foreground mask) and where
  S(α) ≤ 0; a collection using the map treats such voxels as nominal (1).
* The two members must differ only by the flip angle (same TE, TR and receive settings).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri import sidecar
from qmri_bids.qmri.base import (
    B1_MAP,
    CLOSED_FORM,
    CollectionSpec,
    MapSpec,
    ParameterSpec,
    SignalModel,
)
from qmri_bids.qmri.models._common import DEG, like

LOGGER = logging.getLogger("qmri_bids.qmri")

#: T1 the long-TR check is made for: grey matter at 3 T, the longest T1 of brain tissue besides
#: CSF (Stanisz et al., MRM 2005;54:507; Wright et al., MAGMA 2008;21:121)
LONG_T1 = 1.5
#: TR / T1 above which the saturation bias of κ is below 0.5 % (α = 60°)
LONG_TR_FACTOR = 5.0
#: relative tolerance of "the second flip angle is twice the first"
DOUBLE_TOLERANCE = 0.01


def double_angle_b1(s_alpha: np.ndarray, s_double: np.ndarray, alpha_deg: float) -> np.ndarray:
    """κ = arccos(S(2α) / (2 S(α))) / α, the ratio clipped to [0, 1]; NaN where S(α) ≤ 0 or a
    signal is not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = s_double / (2.0 * s_alpha)
    valid = np.isfinite(ratio) & (s_alpha > 0)
    kappa = np.arccos(np.clip(np.where(valid, ratio, 1.0), 0.0, 1.0)) / (alpha_deg * DEG)
    return np.where(valid, kappa, np.nan)


def saturation_bias(alpha_deg: float, tr: float, t1: float = LONG_T1) -> float:
    """Relative error of the double-angle κ at nominal B1 for a tissue with ``t1`` imaged with
    repetition time ``tr``: the closed form applied to the spoiled-gradient-echo signals of the
    project's VFA model (positive: κ too high)."""
    from qmri_bids.qmri.models.vfa import VFAModel

    spgr = VFAModel([alpha_deg, 2 * alpha_deg], [tr, tr])
    with torch.no_grad():
        s = spgr(torch.tensor([1.0, t1], dtype=torch.float64)).numpy()
    return float(double_angle_b1(s[0], s[1], alpha_deg)) - 1.0


class TB1DAMModel(SignalModel):
    """The double-angle B1+ model (``name = "tb1dam"``): members S(α), S(2α) in the long-TR
    limit. Parameters ``(M0, B1)``; B1 is what the collection measures, so the ``b1`` argument
    of :meth:`forward` (a *known* B1) is ignored and the model never consumes a B1 map."""

    name = "tb1dam"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("B1", "relative", 0.0, 3.0),
    )
    collection = CollectionSpec("TB1DAM", ("flip",), ("FlipAngle",),
                                description="double-angle B1+ mapping (TB1map)")
    outputs = (MapSpec("B1", B1_MAP, "arbitrary"),)
    estimators = (CLOSED_FORM,)
    closed_form = True
    provides = B1_MAP
    order_field = "FlipAngle"
    varying_fields = frozenset({"FlipAngle"})
    # the members are α and 2α: one that disagrees on another field is reported, not dropped
    fixed_roles = True

    def __init__(self, flip_angle_deg: float) -> None:
        alpha = float(flip_angle_deg)
        if not 0.0 < alpha < 90.0:
            raise ValueError(f"the double-angle method needs 0 < α < 90 deg, got {alpha:g}")
        self.flip_angle_deg = alpha
        self._angles = torch.tensor([alpha, 2 * alpha], dtype=torch.float64) * DEG

    def to_protocol(self) -> dict[str, Any]:
        return {"flip_angle_deg": self.flip_angle_deg}

    @classmethod
    def from_sidecars(cls, members: Sequence[sidecar.Member]) -> TB1DAMModel:
        sidecar.require_members(members, 2, "TB1DAM", exactly=True)
        fa = sidecar.numbers(members, "FlipAngle")
        sidecar.require_variation(members, "FlipAngle", fa)
        names = ", ".join(sidecar.member_name(m) for m in members)
        if abs(fa[1] / fa[0] - 2.0) > DOUBLE_TOLERANCE:
            raise BadDataError(f"TB1DAM collection ({names}): FlipAngle {fa[0]:g} and {fa[1]:g} "
                               "deg; the double-angle method needs the second to be twice the "
                               "first")
        if fa[0] >= 90.0:
            raise BadDataError(f"TB1DAM collection ({names}): FlipAngle {fa[0]:g} deg is not "
                               "below 90 deg: |cos κα| of magnitude images is ambiguous there")
        trs = [sidecar.repetition_time(m, prefer_excitation=False, required=False)
               for m in members]
        known = [t for t in trs if t is not None]
        if not known:
            LOGGER.info("TB1DAM collection (%s): no RepetitionTime; the double-angle method "
                        "assumes TR >= %g T1 (full recovery), which cannot be checked", names,
                        LONG_TR_FACTOR)
        elif min(known) < LONG_TR_FACTOR * LONG_T1:
            tr = min(known)
            LOGGER.warning("TB1DAM collection (%s): RepetitionTime %g s is short against T1 (the "
                           "double-angle method assumes TR >= %g T1): for T1 = %g s a spoiled "
                           "gradient echo gives B1 %+.1f %% off; prefer TR >= %g s", names, tr,
                           LONG_TR_FACTOR, LONG_T1, 100 * saturation_bias(fa[0], tr),
                           LONG_TR_FACTOR * LONG_T1)
        return cls(fa[0])

    @classmethod
    def members_problem(cls, members: Sequence[sidecar.Member]) -> tuple[Path, str] | None:
        if len(members) != 2:
            return members[0].path, ("a TB1DAM collection needs exactly two members (flip "
                                     f"angles α and 2α), found {len(members)}")
        return None

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        # b1 is ignored: B1 is this model's parameter, not a known input (see the class doc)
        m0, kappa = params[..., 0:1], params[..., 1:2]
        return m0 * torch.sin(kappa * like(self._angles, params))

    def closed_form_maps(self, data: np.ndarray, b1: np.ndarray | None, mask: np.ndarray
                         ) -> tuple[dict[str, np.ndarray], str]:
        kappa = double_angle_b1(data[..., 0], data[..., 1], self.flip_angle_deg)
        algorithm = (f"double-angle method (Insko & Bolinger 1993): relative B1+ (1 = nominal "
                     f"flip angle) = arccos(S(2a) / (2 S(a))) / a with a = "
                     f"{self.flip_angle_deg:g} deg, the ratio clipped to [0, 1] (B1 in [0, "
                     f"{90.0 / self.flip_angle_deg:.3g}]); assumes TR >> T1")
        return {"B1": np.where(mask, kappa, np.nan)}, algorithm


__all__ = ["LONG_T1", "TB1DAMModel", "double_angle_b1", "saturation_bias"]
