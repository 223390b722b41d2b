"""Small helpers shared by the signal models (dtype/device handling of protocol constants)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qmri_bids.qmri import sidecar
from qmri_bids.qmri.base import SignalModel, floats

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor | float


def as_protocol_tensor(values: ArrayLike) -> torch.Tensor:
    """Protocol constants are kept in float64 on the CPU and cast to the params' dtype/device at
    call time, so one model instance serves float32 and float64, CPU and GPU alike."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64) if not isinstance(values, torch.Tensor)
                        else values.detach().to(torch.float64).cpu())
    return t.reshape(-1) if t.ndim == 0 else t


def like(constant: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return constant.to(dtype=params.dtype, device=params.device)


def b1_factor(b1: torch.Tensor | float | None, params: torch.Tensor) -> torch.Tensor:
    """Relative B1+ as a tensor broadcastable against ``params[..., 0]`` with a trailing signal dim."""
    if b1 is None:
        return torch.ones((), dtype=params.dtype, device=params.device)
    b1 = torch.as_tensor(b1, dtype=params.dtype, device=params.device)
    return b1.unsqueeze(-1)


DEG = math.pi / 180.0


class EchoTrainModel(SignalModel):
    """Base of the models of one echo train (a member per echo at ``echo_time``, in s): the
    protocol is the echo times, read from the members' ``EchoTime``."""

    order_field = "EchoTime"
    varying_fields = frozenset({"EchoTime"})

    def __init__(self, echo_time: ArrayLike) -> None:
        self.echo_time = as_protocol_tensor(echo_time)

    def to_protocol(self) -> dict[str, Any]:
        return {"echo_time": floats(self.echo_time)}

    @classmethod
    def from_sidecars(cls, members: Sequence[sidecar.Member]) -> EchoTrainModel:
        sidecar.require_members(members, 2, cls.collection.suffix)
        te = sidecar.numbers(members, "EchoTime")
        sidecar.require_variation(members, "EchoTime", te)
        return cls(te)
