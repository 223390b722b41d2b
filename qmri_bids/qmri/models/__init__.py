"""The registry of the qMRI signal models, built here and nowhere else.

* ``MODELS[name]``: every model class by its ``name`` (model cards name their model this way);
* ``COLLECTION_MODELS[suffix]``: the model class that maps each BIDS qMRI collection, in the
  order discovery looks for them (``VFA``, ``IRT1``, ...);
* :func:`collection_specs`: what discovery recognises (each model's ``collection``).

Adding a sequence: write its model module (physics, ``collection``, ``from_sidecars``,
``to_protocol``, ``outputs``, ``default_prior``...; see :mod:`qmri_bids.qmri.base`) and add its
class to ``MODEL_CLASSES``.
"""

from __future__ import annotations

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.base import CollectionSpec, SignalModel
from qmri_bids.qmri.models.irt1 import IRT1Model, IRT1TRModel
from qmri_bids.qmri.models.megre import MEGREModel
from qmri_bids.qmri.models.mese import MESEMonoModel
from qmri_bids.qmri.models.mese_epg import MESEEPG
from qmri_bids.qmri.models.mp2rage import MP2RAGEModel
from qmri_bids.qmri.models.mrf import MRFModel
from qmri_bids.qmri.models.mtr import MTRModel
from qmri_bids.qmri.models.mts import MTSModel
from qmri_bids.qmri.models.tb1dam import TB1DAMModel
from qmri_bids.qmri.models.vfa import VFAModel

#: every registered model; entry points of collections in discovery order
MODEL_CLASSES: tuple[type[SignalModel], ...] = (
    VFAModel,
    IRT1Model,
    IRT1TRModel,
    MESEMonoModel,
    MESEEPG,
    MEGREModel,
    MTSModel,
    MTRModel,
    MP2RAGEModel,
    MRFModel,
    TB1DAMModel,
)

MODELS: dict[str, type[SignalModel]] = {cls.name: cls for cls in MODEL_CLASSES}
COLLECTION_MODELS: dict[str, type[SignalModel]] = {
    cls.collection.suffix: cls for cls in MODEL_CLASSES if cls.collection is not None
}


def collection_specs() -> dict[str, CollectionSpec]:
    """``suffix -> CollectionSpec`` of every collection a model maps, in discovery order."""
    return {suffix: cls.collection for suffix, cls in COLLECTION_MODELS.items()}


def model_class(name: str) -> type[SignalModel]:
    """The model class named ``name`` (as a model card names it); BadDataError if unknown."""
    if name not in MODELS:
        raise BadDataError(f"unknown signal model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def collection_model(suffix: str) -> type[SignalModel]:
    """The model class that maps the ``suffix`` collection; BadDataError if none does."""
    if suffix not in COLLECTION_MODELS:
        raise BadDataError(f"no qMRI protocol for suffix '{suffix}' (known: "
                           f"{', '.join(sorted(COLLECTION_MODELS))})")
    return COLLECTION_MODELS[suffix]


__all__ = [
    "COLLECTION_MODELS",
    "MESEEPG",
    "MODELS",
    "MODEL_CLASSES",
    "IRT1Model",
    "IRT1TRModel",
    "MEGREModel",
    "MESEMonoModel",
    "MP2RAGEModel",
    "MRFModel",
    "MTRModel",
    "MTSModel",
    "TB1DAMModel",
    "VFAModel",
    "collection_model",
    "collection_specs",
    "model_class",
]
