"""The model registry: one entry per model, built in one place, read by discovery."""

from __future__ import annotations

import pytest

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.models import (
    COLLECTION_MODELS,
    MODEL_CLASSES,
    MODELS,
    collection_model,
    collection_specs,
    model_class,
)


def test_every_model_is_registered_once_under_its_name():
    assert len({cls.name for cls in MODEL_CLASSES}) == len(MODEL_CLASSES)
    for name, cls in MODELS.items():
        assert issubclass(cls, SignalModel) and cls.name == name
    assert set(MODELS) >= {"vfa", "irt1", "irt1-tr", "mese-mono", "mese-epg", "megre", "mts",
                           "mtr", "mp2rage", "mrf", "tb1dam"}


def test_collections_in_discovery_order_with_their_specs():
    assert list(COLLECTION_MODELS) == ["VFA", "IRT1", "MESE", "MEGRE", "MTS", "MTR", "MP2RAGE",
                                       "MRF", "TB1DAM"]
    for suffix, spec in collection_specs().items():
        cls = COLLECTION_MODELS[suffix]
        assert spec is cls.collection and spec.suffix == suffix
        # members are sorted by a field the collection must carry
        assert cls.order_field is None or cls.order_field in spec.required_metadata
        assert cls.from_sidecars.__func__ is not SignalModel.from_sidecars.__func__


def test_discovery_reads_the_registry():
    from qmri_bids.bids.discovery import COLLECTION_SPECS

    assert COLLECTION_SPECS == collection_specs()


def test_unknown_names_are_bad_data():
    with pytest.raises(BadDataError, match="unknown signal model 'xyz'"):
        model_class("xyz")
    with pytest.raises(BadDataError, match="no qMRI protocol for suffix 'XYZ'"):
        collection_model("XYZ")
