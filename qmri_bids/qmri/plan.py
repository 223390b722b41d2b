"""The plan of one qMRI collection: everything decided about it before a workflow is built.

Pre-flight computes one :class:`CollectionPlan` per collection (:func:`plan_collection`) and
stores it on the collection (``collection.plan``); the summary table, the workflow factories
(which nodes, how much memory, whether to train a network first) and the mapping node read it,
so the protocol is resolved and the network's sha256 checked once per run, not once per reader.

Collections of one participant can depend on each other through a map one of them provides (its
model's ``provides``: a double-angle ``TB1DAM`` collection measures the B1+ field):
:func:`link_b1_providers` records on each collection that uses B1 which collection's map it gets
(``CollectionPlan.b1_provider``), a TB1map given in ``fmap/`` taking precedence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qmri_bids.qmri.base import B1_MAP, CLOSED_FORM, CollectionSpec, SignalModel
from qmri_bids.qmri.estimators import ESTIMATOR_ORDER, ESTIMATORS
from qmri_bids.qmri.model_store import NetworkPlan, locate_estimator
from qmri_bids.qmri.models import collection_model, model_class
from qmri_bids.qmri.protocols import Collection, resolve_collection

LOGGER = logging.getLogger("qmri_bids.qmri")

_ESTIMATOR_NAMES = {"nlls": "non-linear least squares", "dict": "dictionary matching"}


#: memory of a mapping node before any data: interpreter, numpy and torch (measured 0.35-0.45 GB)
MAPPING_BASE_GB = 0.45
#: bytes per data value (voxels x members or time points) beyond the base, by estimation model;
#: others hold ~16 float64 copies of the data
MAPPING_BYTES_PER_VALUE = {"mese-epg": 1000, "mrf": 160}


@dataclass(frozen=True)
class B1Provider:
    """The collection (same participant and session) whose map provides a collection's B1+.

    ``used`` is False when the collection has a TB1map given in ``fmap/``: a measured map from
    the dataset wins over one computed here, and the sidecars say so.
    """

    label: str  # the providing collection's label (``Collection.label``)
    suffix: str  # its BIDS suffix (TB1DAM)
    used: bool


@dataclass(frozen=True)
class CollectionPlan:
    """What will be done with one collection.

    Attributes:
        suffix: the collection's BIDS suffix.
        model_name, protocol: the collection's signal model (``to_protocol``).
        members: paths of the members the model describes, in the model's order.
        excluded: (file name, reason) of members left out of the fit.
        estimators: the estimators to run, primary first (:mod:`qmri_bids.qmri.estimators`).
        network: the network of the primary estimate (a verified file, or train on demand);
            None when no network runs.
        shape: spatial shape of the images (from their headers, read once in pre-flight).
        signal_length: values per voxel (members, or MRF time points).
        uses_b1: whether the model depends on a known B1+ (:meth:`SignalModel.uses_b1`).
        b1_provider: the collection whose map is this one's B1+ map (:func:`link_b1_providers`).
    """

    suffix: str
    model_name: str
    protocol: dict[str, Any]
    members: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]
    estimators: tuple[str, ...]
    network: NetworkPlan | None
    shape: tuple[int, ...]
    signal_length: int
    uses_b1: bool = False
    b1_provider: B1Provider | None = None

    def model(self) -> SignalModel:
        return model_class(self.model_name).from_protocol(self.protocol)

    @property
    def closed_form(self) -> bool:
        return self.estimators == (CLOSED_FORM,)

    @property
    def provides(self) -> str | None:
        """The map (BIDS suffix) this collection provides to the others (its model's)."""
        return model_class(self.model_name).provides

    @property
    def b1_from_provider(self) -> bool:
        """Whether the B1+ map is the one another collection provides (an input of the node)."""
        return self.b1_provider is not None and self.b1_provider.used

    @property
    def mem_gb(self) -> float:
        """Memory of the mapping node: interpreter and torch plus a number of bytes per data
        value that depends on the estimation model (EPG fits hold their echo states and
        Jacobians). Calibrated on the demo with ``--resource-monitor`` (2026-12-02, exact EPG
        Jacobians, CRB maps in bounded chunks): measured peak VFA 0.40 GB (declared 0.46),
        IRT1 0.50 (0.52), MESE-EPG 0.80 (now 1.02, was 1.99), MRF 0.77 (now 1.03, was 1.37)."""
        model = self.network.model_name if self.network is not None else self.model_name
        per_value = MAPPING_BYTES_PER_VALUE.get(model, 128)
        values = int(np.prod(self.shape)) * self.signal_length
        return round(MAPPING_BASE_GB + per_value * values / 1024**3, 2)

    def summary(self) -> list[str]:
        """What the summary table shows for this collection."""
        steps = [f"B1 from {self.b1_provider.label}"] if self.b1_from_provider else []
        if self.closed_form:
            return steps + ["map (closed form)"]
        if self.network is not None:
            steps.append(f"train {self.network.model_name} network, then map"
                         if self.network.train_on_demand else f"network {self.network.stem}")
        return steps + [e for e in self.estimators if e != "nn"]

    def describe(self) -> str:
        """Methods boilerplate of the collection's maps."""
        b1 = ""
        if self.b1_from_provider:
            b1 = (f" The B1+ map of the {self.suffix} collection was computed from the "
                  f"{self.b1_provider.suffix} collection of the same participant and brought "
                  "to its grid (linear interpolation where the grids differ).")
        if self.closed_form:
            return (f"Quantitative maps of the {self.suffix} collection were computed in closed "
                    f"form.{b1}\n")
        text = (f"Quantitative maps of the {self.suffix} collection were estimated with a neural "
                "network trained on signals simulated from the acquisition protocol, with a loss "
                "normalised by the Cramér-Rao bound (Zhang et al., 2022)")
        text += "".join(f"; {_ESTIMATOR_NAMES[e]}" for e in self.estimators if e in
                        _ESTIMATOR_NAMES)
        return text + (". Per-voxel Cramér-Rao standard deviations were computed at the "
                       f"estimates and the noise level measured in the background.{b1}\n")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (Nipype hashes and pickles node inputs)."""
        return {"suffix": self.suffix, "model_name": self.model_name,
                "protocol": self.protocol, "members": list(self.members),
                "excluded": [list(e) for e in self.excluded],
                "estimators": list(self.estimators),
                "network": None if self.network is None else self.network.to_dict(),
                "shape": list(self.shape), "signal_length": self.signal_length,
                "uses_b1": self.uses_b1,
                "b1_provider": None if self.b1_provider is None else asdict(self.b1_provider)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CollectionPlan:
        return cls(d["suffix"], d["model_name"], dict(d["protocol"]), tuple(d["members"]),
                   tuple((str(a), str(b)) for a, b in d["excluded"]), tuple(d["estimators"]),
                   None if d["network"] is None else NetworkPlan.from_dict(d["network"]),
                   tuple(int(n) for n in d["shape"]), int(d["signal_length"]),
                   bool(d.get("uses_b1", False)),
                   None if d.get("b1_provider") is None else B1Provider(**d["b1_provider"]))


def spatial_shape(image_shape: Sequence[int], spec: CollectionSpec) -> tuple[int, ...]:
    """The (x, y, z) shape of a member image of ``spec``'s collection (a time series keeps its
    volumes on the last axis; a single slice stored as (x, y[, t]) gets z = 1)."""
    shape = tuple(int(n) for n in image_shape)
    if spec.image_ndim == 4:
        shape = shape[:3] if len(shape) > 3 else shape[:2] + (1,)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape + (1,) * (3 - len(shape))


def plan_estimators(model_cls: type[SignalModel], requested: Iterable[str]) -> tuple[str, ...]:
    """The requested estimators that apply to ``model_cls``, in :data:`ESTIMATOR_ORDER`."""
    requested = tuple(dict.fromkeys(requested))
    unknown = [e for e in requested if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimators {unknown} (known: {', '.join(ESTIMATORS)})")
    if model_cls.closed_form:
        return (CLOSED_FORM,)
    chosen = tuple(e for e in ESTIMATOR_ORDER if e in requested and e in model_cls.estimators)
    for skipped in (e for e in requested if e not in chosen):
        LOGGER.info("%s is not an estimator of the %s model: skipped", skipped, model_cls.name)
    if not chosen:
        raise ValueError(f"none of the estimators {list(requested)} applies to the "
                         f"{model_cls.name} model (it has {', '.join(model_cls.estimators)})")
    return chosen


def plan_collection(collection: Collection, *, estimators: Iterable[str] = ("nn",),
                    model_dir: Path | None = None,
                    shape: Sequence[int] | None = None) -> CollectionPlan:
    """The plan of ``collection``: its model from the sidecars, the estimators that apply, and
    the network (shipped → ``model_dir`` cache → train on demand, sha256 verified).

    ``shape``: the spatial shape of its images, when the caller has read their headers already
    (pre-flight); otherwise the first member's header is read. BadDataError naming file and field
    for an unusable protocol or a corrupt shipped network.
    """
    spec = collection_model(collection.suffix).collection
    resolved = resolve_collection(collection)
    model = resolved.model
    chosen = plan_estimators(type(model), estimators)
    network = None
    if "nn" in chosen:
        # The network depends on whether a B1 map is known (CPMG MESE: B1 an input or
        # estimated); a B1 map provided by another collection is linked later and re-plans it.
        b1_known = getattr(collection, "b1map", None) is not None
        network = locate_estimator(model.estimation_model(b1_known=b1_known),
                                   model_dir=model_dir)
    if shape is None:
        import nibabel as nib

        shape = nib.load(str(resolved.members[0].path)).shape
    n_values = max(len(resolved.members), getattr(model, "n_timepoints", 0) or 0)
    return CollectionPlan(
        suffix=collection.suffix, model_name=model.name, protocol=model.to_protocol(),
        members=tuple(str(m.path) for m in resolved.members),
        excluded=tuple((Path(p).name, why) for p, why in resolved.excluded),
        estimators=chosen, network=network, shape=spatial_shape(shape, spec),
        signal_length=n_values, uses_b1=model.uses_b1())


def _intended_for(provider: Any, consumer: Any) -> bool:
    """Whether the provider's ``IntendedFor`` (resolved by discovery; empty: not given, meaning
    every collection of the participant) names a member of ``consumer``."""
    targets = getattr(provider, "intended_for", None)
    if not targets:
        return True
    return any(Path(m.path).resolve() in targets for m in consumer.members)


def link_b1_providers(collections: Sequence[Any], where: str,
                      model_dir: Path | None = None) -> None:
    """Give each planned collection of one participant (and session) that uses B1 the
    collection that provides a B1+ map (its model's ``provides``), in place
    (``collection.plan.b1_provider``).

    A provider's map goes to the collections its ``IntendedFor`` names (all of them when it has
    none); with several providers the first in discovery order is used. A TB1map given in
    ``fmap/`` (``collection.b1map``) wins over a provided map: the link is kept with
    ``used=False`` so that the log and the sidecars say which map was used and which was not.
    ``where`` names the participant in the log (``sub-01``). A consumer whose network depends
    on a known B1 (CPMG MESE) is re-planned with the known-B1 network (``model_dir``: the cache
    looked in, as in :func:`plan_collection`).
    """
    providers = [c for c in collections if c.plan is not None and c.plan.provides == B1_MAP]
    for consumer in collections:
        plan = consumer.plan
        if plan is None or not plan.uses_b1 or any(consumer is p for p in providers):
            continue
        candidates = [p for p in providers if _intended_for(p, consumer)]
        if not candidates:
            continue
        provider = candidates[0]
        if len(candidates) > 1:
            LOGGER.warning("%s: %s could take its B1+ map from %s; using the first, %s", where,
                           consumer.label, ", ".join(c.label for c in candidates),
                           provider.label)
        used = consumer.b1map is None
        if used:
            LOGGER.info("%s: %s is mapped with the %s computed from %s (no %s in fmap/ for it)",
                        where, consumer.label, B1_MAP, provider.label, B1_MAP)
        else:
            LOGGER.info("%s: %s is mapped with %s from fmap/, not with the %s computed from %s "
                        "(a %s given in fmap/ wins)", where, consumer.label,
                        Path(consumer.b1map).name, B1_MAP, provider.label, B1_MAP)
        network = plan.network
        if used and network is not None:
            known = plan.model().estimation_model(b1_known=True)
            if known.name != network.model_name or known.to_protocol() != network.protocol:
                network = locate_estimator(known, model_dir=model_dir)
        consumer.plan = replace(plan, network=network,
                                b1_provider=B1Provider(provider.label, provider.suffix, used))
