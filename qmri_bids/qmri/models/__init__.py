"""Registry of the qMRI signal models: ``MODELS[name] -> SignalModel subclass``.

Other modules (EPG, MRF) append their own entries, e.g. ``MODELS["mese-epg"] = MeseEpgModel``.
"""

from __future__ import annotations

from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.models.irt1 import IRT1Model, IRT1TRModel
from qmri_bids.qmri.models.megre import MEGREModel
from qmri_bids.qmri.models.mese import MESEMonoModel
from qmri_bids.qmri.models.mp2rage import MP2RAGEModel
from qmri_bids.qmri.models.mts import MTSModel
from qmri_bids.qmri.models.vfa import VFAModel

MODELS: dict[str, type[SignalModel]] = {
    VFAModel.name: VFAModel,
    IRT1Model.name: IRT1Model,
    IRT1TRModel.name: IRT1TRModel,
    MESEMonoModel.name: MESEMonoModel,
    MEGREModel.name: MEGREModel,
    MTSModel.name: MTSModel,
    MP2RAGEModel.name: MP2RAGEModel,
}

__all__ = [
    "MODELS",
    "IRT1Model",
    "IRT1TRModel",
    "MEGREModel",
    "MESEMonoModel",
    "MP2RAGEModel",
    "MTSModel",
    "VFAModel",
]

# EPG-based models (mese_epg.py, mrf.py), appended by the EPG/MRF work
from qmri_bids.qmri.models.mese_epg import MESEEPG
from qmri_bids.qmri.models.mrf import MRFModel

MODELS[MESEEPG.name] = MESEEPG
MODELS[MRFModel.name] = MRFModel
__all__ += ["MESEEPG", "MRFModel"]
