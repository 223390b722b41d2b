"""Training priors of the CRB-trained estimators: what each network output is drawn from.

A :class:`ParameterPrior` belongs to one signal model (its ``default_prior()``); it is stored in
every model card, so a trained network carries the distribution it was trained on. The texts
``T1_BRAIN_SOURCES`` and ``B1_SOURCES`` are the literature shared by several models' priors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: range of the known relative B1+ fed to networks of B1-dependent models
B1_RANGE = (0.7, 1.3)


@dataclass(frozen=True)
class PriorRange:
    """Prior of one network output: uniform (``log=False``) or log-uniform between the bounds."""

    name: str
    lower: float
    upper: float
    log: bool = False
    unit: str = ""

    def sample(self, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        u = torch.rand(n, generator=gen, dtype=dtype)
        return self.from_unit(u)

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        if self.log:
            lo, hi = math.log(self.lower), math.log(self.upper)
            return torch.exp(lo + (hi - lo) * u)
        return self.lower + (self.upper - self.lower) * u

    def grid(self, n: int, margin: float = 0.1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``n`` points inside the prior, ``margin`` (fraction of the range) away from its edges."""
        u = torch.linspace(margin, 1 - margin, n, dtype=dtype) if n > 1 else torch.full(
            (1,), 0.5, dtype=dtype)
        return self.from_unit(u)


@dataclass(frozen=True)
class ParameterPrior:
    """Training distribution of one model's parameters.

    Attributes:
        model_name: the ``SignalModel.name`` it belongs to.
        ranges: priors of the *network outputs*, in model-parameter order, excluding the scale.
            A name listed in ``relative`` is the ratio to the scale parameter (IR: ``b`` is b/a).
        scale: name of the scale parameter (``"M0"``, ``"S0"``, ``"a"``, ``"A"``) or
            ``"complex"`` for a complex M0 stored as (``M0_re``, ``M0_im``) (MRF).
        relative: nuisance parameters proportional to the scale (expressed as ratios).
        b1: range of the known relative B1+ fed to the network as an extra input (None when the
            model does not depend on a known B1; 1 is used when no B1 map is given).
        sources: where the ranges come from.
    """

    model_name: str
    ranges: tuple[PriorRange, ...]
    scale: str = "M0"
    relative: tuple[str, ...] = ()
    b1: tuple[float, float] | None = None
    sources: str = ""
    constraint: str | None = None  # only "T2<=T1" (physical relaxation times) is supported

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.ranges)

    def admissible(self, shape: torch.Tensor) -> torch.Tensor:
        """Boolean ``[...]``: which shape-parameter vectors satisfy ``constraint``."""
        if self.constraint is None:
            return torch.ones(shape.shape[:-1], dtype=torch.bool, device=shape.device)
        if self.constraint == "T2<=T1":
            return shape[..., self.names.index("T2")] <= shape[..., self.names.index("T1")]
        raise ValueError(f"unknown prior constraint {self.constraint!r}")

    def sample(
        self, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(shape parameters ``[n, P_out]``, known B1 ``[n]`` or None); rejection sampling
        when there is a ``constraint``."""
        shape = torch.stack([r.sample(n, gen, dtype) for r in self.ranges], dim=-1)
        while self.constraint is not None and not bool(self.admissible(shape).all()):
            bad = ~self.admissible(shape)
            nb = int(bad.sum())
            shape[bad] = torch.stack([r.sample(nb, gen, dtype) for r in self.ranges], dim=-1)
        b1 = None
        if self.b1 is not None:
            lo, hi = self.b1
            b1 = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=dtype)
        return shape, b1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranges"] = [asdict(r) for r in self.ranges]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParameterPrior:
        return cls(
            model_name=d["model_name"],
            ranges=tuple(PriorRange(**r) for r in d["ranges"]),
            scale=d.get("scale", "M0"),
            relative=tuple(d.get("relative", ())),
            b1=None if d.get("b1") is None else tuple(d["b1"]),
            sources=d.get("sources", ""),
            constraint=d.get("constraint"),
        )


T1_BRAIN_SOURCES = (
    "T1 0.2-5 s log-uniform: white matter ~0.8 s and grey matter ~1.4 s at 3 T, CSF ~4 s "
    "(Stanisz et al., MRM 2005;54:507; Wansapura et al., JMRI 1999;9:531), widened to "
    "cover 1.5-7 T and pathology.")
B1_SOURCES = (
    "Known relative B1+ 0.7-1.3: the range of transmit-field maps of the head at 3 T "
    "(Sacolick et al., MRM 2010;63:1315); fed to the network, 1 when no map is given.")
