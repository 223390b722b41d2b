"""Common interface of the qMRI signal models (Nipype-free, PyTorch).

A *signal model* maps tissue parameters to the signal of one acquisition protocol. It is the only
place a sequence's physics lives: simulation, the CRB, NLLS fitting, dictionary matching and
network training all call the same ``forward``. Parameters are batched in the last dimension
(``params[..., P]``) and the signal is returned as ``signal[..., N]`` (N = number of collection
members / time points), so any leading batch shape works (voxels, samples, grids).

Models are pure torch functions of ``params`` so that ``torch.func.jacrev``/``vmap`` give exact
Jacobians (the CRB) and autograd gives gradients (fitting, training).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParameterSpec:
    """One model parameter: its name, physical unit and plausible bounds (used by fitting)."""

    name: str
    unit: str
    lower: float
    upper: float
    nuisance: bool = False  # e.g. M0, its phase: estimated but not a map users asked for


class SignalModel(abc.ABC):
    """Base class of every signal model.

    Subclasses set ``parameters`` and implement ``forward``. ``is_complex`` says whether
    ``forward`` returns a complex signal (MRF) or a real one (magnitude models).
    """

    #: short identifier, e.g. "vfa", "irt1", "mese-mono", "mese-epg", "megre", "mp2rage", "mrf"
    name: str = ""
    parameters: tuple[ParameterSpec, ...] = ()
    is_complex: bool = False

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def n_parameters(self) -> int:
        return len(self.parameters)

    def bounds(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lower = torch.tensor([p.lower for p in self.parameters], dtype=dtype, device=device)
        upper = torch.tensor([p.upper for p in self.parameters], dtype=dtype, device=device)
        return lower, upper

    @abc.abstractmethod
    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        """Signal for ``params[..., P]``; ``b1[...]`` is a known relative B1+ factor (1 = nominal)."""

    def __call__(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(params, b1)
