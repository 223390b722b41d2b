"""Magnetisation transfer ratio from an mt-off / mt-on pair:

    S_off = M0,   S_on = M0 · (1 − MTR/100),   MTR = 100 · (S_off − S_on) / S_off   [p.u.]

MTR is a ratio of two images with no signal equation behind it beyond this definition, so it is
mapped in closed form; the forward model exists so that MTR behaves like every other model (CRB,
fitting, simulation in tests).
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
    CLOSED_FORM,
    CollectionSpec,
    MapSpec,
    ParameterSpec,
    SignalModel,
)
from qmri_bids.qmri.models._common import ArrayLike, as_protocol_tensor, like


class MTRModel(SignalModel):
    name = "mtr"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("MTR", "p.u.", -100.0, 100.0),
    )
    collection = CollectionSpec("MTR", ("mt",), ("MTState",), description="MT ratio")
    outputs = (MapSpec("MTR", "MTRmap", "p.u."),)
    closed_form = True
    estimators = (CLOSED_FORM,)
    varying_fields = frozenset({"MTState"})
    fixed_roles = True

    def __init__(self, mt_on: ArrayLike) -> None:
        self.mt_on = as_protocol_tensor(mt_on)
        on = self.mt_on > 0.5
        if self.mt_on.numel() != 2 or int(on.sum()) != 1:
            raise ValueError("MTR needs exactly one mt-on and one mt-off member")
        self.index_on = int(torch.nonzero(on).flatten()[0])
        self.index_off = 1 - self.index_on

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        # b1 is accepted for interface uniformity: the ratio does not depend on it
        m0, mtr = params[..., 0:1], params[..., 1:2]
        on = like(self.mt_on, params)
        return m0 * (1 - on * mtr / 100.0)

    def to_protocol(self) -> dict[str, Any]:
        return {"mt_on": [bool(v) for v in (self.mt_on > 0.5).tolist()]}

    @classmethod
    def from_sidecars(cls, members: Sequence[sidecar.Member]) -> MTRModel:
        on = [sidecar.mt_state(m) for m in members]
        if len(members) != 2 or sum(on) != 1:
            raise BadDataError("MTR collection needs exactly one mt-on and one mt-off member "
                               f"({', '.join(sidecar.member_name(m) for m in members)})")
        return cls(on)

    @classmethod
    def members_problem(cls, members: Sequence[sidecar.Member]) -> tuple[Path, str] | None:
        if sorted(m.entities.get("mt", "") for m in members) != ["off", "on"]:
            return members[0].path, "an MTR collection needs exactly one mt-on and one mt-off"
        return None

    def closed_form_maps(self, data: np.ndarray, b1: np.ndarray | None, mask: np.ndarray
                         ) -> tuple[dict[str, np.ndarray], str]:
        off, on = data[..., self.index_off], data[..., self.index_on]
        with np.errstate(divide="ignore", invalid="ignore"):
            mtr = np.where(mask, 100.0 * (off - on) / off, np.nan)
        return {"MTR": mtr}, "MTR = 100 (S_off - S_on) / S_off"
