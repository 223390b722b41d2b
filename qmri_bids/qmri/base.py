"""Common interface of the qMRI signal models (Nipype-free, PyTorch), and the one home of
everything the pipeline knows about a model.

A *signal model* maps tissue parameters to the signal of one acquisition protocol. It is the only
place a sequence's physics lives: simulation, the CRB, NLLS fitting, dictionary matching and
network training all call the same ``forward``. Parameters are batched in the last dimension
(``params[..., P]``) and the signal is returned as ``signal[..., N]`` (N = number of collection
members / time points), so any leading batch shape works (voxels, samples, grids).

Models are pure torch functions of ``params`` so that ``torch.func.jacrev``/``vmap`` give exact
Jacobians (the CRB) and autograd gives gradients (fitting, training).

Besides the physics, each model class declares (class attributes and methods below) what the
rest of the pipeline needs to know about it, so that adding a sequence means adding one model
module and one line in the registry (:mod:`qmri_bids.qmri.models`):

* discovery: the BIDS collection it maps (:class:`CollectionSpec`), structural checks of the
  members (:meth:`SignalModel.members_problem`);
* protocols: how its protocol is read from the sidecars (:meth:`SignalModel.from_sidecars`), the
  member order (``order_field``), the fields that vary by design (``varying_fields``);
* the model store: the protocol round-trip (:meth:`to_protocol` / :meth:`from_protocol`) whose
  hash names the trained network, and the training prior (:meth:`default_prior`);
* mapping: the estimators that apply (``estimators``), whether it is mapped in closed form, what
  the estimators fit (:meth:`estimation_model`), quantities derived from the estimates
  (:meth:`derived_maps`), and the output maps with their BIDS qMRI suffixes (``outputs``);
* maps shared between the collections of a participant: a model whose collection measures the
  B1+ field declares it (``provides = "TB1map"``); a collection whose model depends on B1
  (:meth:`SignalModel.uses_b1`) and has no ``TB1map`` in ``fmap/`` then gets the provider's map
  (:func:`qmri_bids.qmri.plan.link_b1_providers`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from qmri_bids.qmri.dictionary import DictionaryGrid
    from qmri_bids.qmri.prior import ParameterPrior
    from qmri_bids.qmri.sidecar import Member


@dataclass(frozen=True)
class ParameterSpec:
    """One model parameter: its name, physical unit and plausible bounds (used by fitting)."""

    name: str
    unit: str
    lower: float
    upper: float
    nuisance: bool = False  # e.g. M0, its phase: estimated but not a map users asked for


@dataclass(frozen=True)
class MapSpec:
    """One output map: the estimate it holds and its BIDS qMRI suffix and unit.

    ``name`` is a key of the estimators' values (a model parameter or a derived quantity);
    ``reciprocal`` is the (suffix, unit) of ``1/value`` written beside it (R1map next to T1map).
    """

    name: str
    suffix: str
    unit: str
    reciprocal: tuple[str, str] | None = None


@dataclass(frozen=True)
class CollectionSpec:
    """How discovery recognises the BIDS file collection a model maps, and what it must carry."""

    suffix: str
    grouping: tuple[str, ...]  # entities that distinguish the members (flip, inv, echo, mt)
    required_metadata: tuple[str, ...]
    min_members: int = 2
    description: str = ""
    #: fields that may hold one value per time point (MR fingerprinting schedules)
    array_fields: tuple[str, ...] = ()
    #: dimensions of one member image (4: a time series per file)
    image_ndim: int = 3
    #: suffixes of files that belong to the collection without carrying its grouping entities
    #: (MP2RAGE: the scanner's ``UNIT1`` image); discovery collects them with the members and
    #: the model checks them (``members_problem``, ``from_sidecars``)
    companion_suffixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProtonDensitySpec:
    """The estimates a receive-corrected proton-density map is made of
    (:mod:`qmri_bids.qmri.receive`): ``m0``, the equilibrium magnetisation, which carries the
    coil's receive field, and ``t1``, which finds the CSF that scales PD to water."""

    m0: str = "M0"
    t1: str = "T1"


#: the estimator that maps closed-form models (registered in :mod:`qmri_bids.qmri.estimators`)
CLOSED_FORM = "closed-form"

#: BIDS suffix of a relative B1+ map (1 = nominal flip angle): the one kind of map that a
#: collection can provide to the others (the estimators' ``b1`` input)
B1_MAP = "TB1map"


def floats(values: Any) -> list[float]:
    """A protocol array (tensor, array or sequence) as a JSON-able list of floats."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _inside(spec: ParameterSpec) -> float:
    """A value inside a parameter's bounds (geometric mean of positive bounds, else the
    midpoint; 1 away from an infinite bound, so that an unbounded M0 is 1, not 0)."""
    lo, hi = spec.lower, spec.upper
    if math.isfinite(lo) and math.isfinite(hi):
        return math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
    if math.isfinite(lo):
        return lo + 1.0
    if math.isfinite(hi):
        return hi - 1.0
    return 1.0


class SignalModel(abc.ABC):
    """Base class of every signal model.

    Subclasses set ``parameters`` and implement ``forward`` (registered models also
    :meth:`to_protocol`).
    ``is_complex`` says whether ``forward`` returns a complex signal (MRF) or a real one.
    A model that maps a BIDS collection sets ``collection`` and implements
    :meth:`from_sidecars`; other models (EPG MESE, the TR-aware IR model) are built by one that
    does, or by code.
    """

    #: short identifier, e.g. "vfa", "irt1", "mese-mono", "mese-epg", "megre", "mp2rage", "mrf"
    name: ClassVar[str] = ""
    parameters: tuple[ParameterSpec, ...] = ()
    is_complex: bool = False

    #: the BIDS collection this model maps (None: built by another model or by code)
    collection: ClassVar[CollectionSpec | None] = None
    #: output maps, in the order they are written
    outputs: ClassVar[tuple[MapSpec, ...]] = ()
    #: estimators that apply, by registry name (:mod:`qmri_bids.qmri.estimators`)
    estimators: ClassVar[tuple[str, ...]] = ("nn", "nlls")
    #: mapped by a deterministic formula: no network to train, no reference estimator
    closed_form: ClassVar[bool] = False
    #: sidecar field that orders the members (so a protocol listed in another order is the same
    #: protocol, with the same hash and network); None: members keep their discovery order
    order_field: ClassVar[str | None] = None
    #: acquisition fields that vary by design; the others must agree across members
    varying_fields: ClassVar[frozenset[str]] = frozenset()
    #: members play fixed roles (mt-on/mt-off...): a member that disagrees is reported, not
    #: dropped from the fit
    fixed_roles: ClassVar[bool] = False
    #: whether members are compared at all (False: they are parts of one series, e.g. MRF)
    compare_members: ClassVar[bool] = True
    #: the map this collection provides to the other collections of its participant and
    #: session, by BIDS suffix (only :data:`B1_MAP`): one of its ``outputs``; a collection that
    #: uses B1 and has no TB1map in fmap/ is mapped with it (a TB1map in fmap/ wins)
    provides: ClassVar[str | None] = None
    #: the estimates of a PD map (an M0 proportional to proton density times the receive
    #: field, and T1): mapping removes the receive field and scales to water
    #: (:mod:`qmri_bids.qmri.receive`); None: the model's M0 is not a PD (T1/T2-weighted)
    proton_density: ClassVar[ProtonDensitySpec | None] = None

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

    @property
    def has_exact_jacobian(self) -> bool:
        """Whether :meth:`jacobian` gives the exact Jacobian faster than automatic
        differentiation or differences (then the CRB and NLLS use it)."""
        return False

    def jacobian(self, params: torch.Tensor, b1: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal (real view ``[..., M]``) and Jacobian ``[..., M, P]``, for models with
        :attr:`has_exact_jacobian`."""
        raise NotImplementedError(f"model {self.name!r} has no exact Jacobian of its own")

    def uses_b1(self) -> bool:
        """Whether a known relative B1+ changes this model's signal, i.e. whether its collection
        wants a B1 map (from fmap/ or from a collection that ``provides`` one).

        Decided from the physics rather than declared, so that no model has to say it: the
        signal of the model and of its :meth:`estimation_model` at a point inside the parameter
        bounds, with B1 = 1 and B1 = 0.9. A model that measures B1 itself ignores the ``b1``
        argument and so never consumes a B1 map; a model may override this.
        """
        for model in dict.fromkeys((self, self.estimation_model())):
            point = torch.tensor([_inside(p) for p in model.parameters], dtype=torch.float64)
            with torch.no_grad():
                signal = model(point.expand(2, -1),
                               torch.tensor([1.0, 0.9], dtype=torch.float64))
            scale = float(signal.abs().max())
            if scale > 0 and not torch.allclose(signal[0], signal[1], rtol=1e-6,
                                                atol=1e-9 * scale):
                return True
        return False

    # ------------------------------------------------------------------ protocol round-trip
    def to_protocol(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) that define the protocol; their hash names the
        trained network (:func:`qmri_bids.qmri.model_store.protocol_hash`). Every registered
        model implements it; ad-hoc models (tests, reparameterisations) need not."""
        raise TypeError(f"model {self.name!r} has no protocol description")

    @classmethod
    def from_protocol(cls, protocol: Mapping[str, Any]) -> SignalModel:
        """Inverse of :meth:`to_protocol`."""
        return cls(**protocol)

    # ------------------------------------------------------------------ collections
    @classmethod
    def from_sidecars(cls, members: Sequence[Member]) -> SignalModel:
        """The model of a collection from its members' sidecars (already in ``order_field``
        order, inconsistent members removed); BadDataError naming file and field."""
        raise TypeError(f"model {cls.name!r} is not built from a BIDS collection")

    @classmethod
    def members_problem(cls, members: Sequence[Member]) -> tuple[Path, str] | None:
        """A structural problem of a discovered collection (roles, parts), as (file, reason)."""
        return None

    @classmethod
    def field_supplied_elsewhere(cls, member: Member, key: str) -> bool:
        """Whether a required sidecar field absent from ``member`` comes from another file."""
        return False

    @classmethod
    def read_images(cls, members: Sequence[Member]) -> tuple[np.ndarray, np.ndarray]:
        """(data ``[X, Y, Z, N]``, affine) of the members, in the given order."""
        from qmri_bids.qmri.protocols import stack_member_images

        return stack_member_images(members)

    # ------------------------------------------------------------------ estimation
    def default_prior(self) -> ParameterPrior:
        """The documented training prior of the model's network (see its ``sources``)."""
        raise ValueError(f"no default prior for model {self.name!r}: it has no network")

    def estimation_model(self, b1_known: bool = False) -> SignalModel:
        """The model the estimators fit (MTS: the two-angle VFA model of its mt-off pair; a
        CPMG MESE train: the EPG model, with B1 an input when ``b1_known`` -- a B1 map is given --
        and estimated otherwise)."""
        return self

    def estimation_data(self, data: np.ndarray) -> np.ndarray:
        """The members of ``data[..., N]`` that :meth:`estimation_model` describes."""
        return data

    def derived_maps(self, values: dict[str, np.ndarray], data: np.ndarray,
                     b1: np.ndarray | None, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Quantities computed from an estimator's values (MEGRE: T2* = 1/R2*; MTS: MTsat)."""
        return values

    def derived_metadata(self, b1: np.ndarray | None) -> dict[str, dict[str, Any]]:
        """Sidecar fields of derived output maps, by output name (how they were computed, e.g.
        MTsat's B1 correction); an ``EstimationAlgorithm`` here is written before the
        estimator's. ``b1``: the B1 map the maps were computed with, or None."""
        return {}

    def closed_form_maps(self, data: np.ndarray, b1: np.ndarray | None, mask: np.ndarray
                         ) -> tuple[dict[str, np.ndarray], str]:
        """(values, algorithm description) of a closed-form model."""
        raise TypeError(f"model {self.name!r} is not mapped in closed form")

    def dictionary(self, b1: np.ndarray | None, mask: np.ndarray
                   ) -> tuple[SignalModel, DictionaryGrid, bool] | None:
        """(dictionary model, grid, match against the known B1) where dictionary matching is a
        reference method of the field; None otherwise."""
        return None
