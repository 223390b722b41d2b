"""The plan of a collection: model, estimators, network lookup, memory, summary, round trip."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmri_bids.qmri.base import CLOSED_FORM
from qmri_bids.qmri.model_store import SHIPPED_DIR, estimator_stem
from qmri_bids.qmri.models import MODELS, VFAModel
from qmri_bids.qmri.plan import (
    MAPPING_BASE_GB,
    B1Provider,
    CollectionPlan,
    link_b1_providers,
    plan_collection,
    plan_estimators,
    spatial_shape,
)


def _collection(suffix, metas, entities=None):
    members = [SimpleNamespace(path=Path(f"/data/sub-x_run-{i}_{suffix}.nii.gz"),
                               entities=(entities or [{}] * len(metas))[i], metadata=md)
               for i, md in enumerate(metas)]
    return SimpleNamespace(suffix=suffix, members=members, b1map=None)


DEMO_VFA = [{"FlipAngle": 20, "RepetitionTimeExcitation": 0.015},
            {"FlipAngle": 3, "RepetitionTimeExcitation": 0.015}]


def test_demo_vfa_protocol_plans_the_shipped_network():
    plan = plan_collection(_collection("VFA", DEMO_VFA), estimators=("nn", "nlls", "dict"),
                           shape=(80, 96, 8))
    assert (plan.model_name, plan.estimators) == ("vfa", ("nn", "nlls"))  # no VFA dictionary
    stem = estimator_stem("vfa", VFAModel([3.0, 20.0], 0.015).to_protocol())
    assert plan.network.weights == SHIPPED_DIR / f"{stem}.safetensors"
    assert plan.network.sha256 and not plan.network.train_on_demand
    # members in the model's order (flip angle), whatever the discovery order
    assert [Path(p).name for p in plan.members] == ["sub-x_run-1_VFA.nii.gz",
                                                    "sub-x_run-0_VFA.nii.gz"]
    assert plan.summary() == [f"network {stem}", "nlls"]
    assert "non-linear least squares" in plan.describe()
    assert "dictionary" not in plan.describe()
    assert plan.mem_gb == round(MAPPING_BASE_GB + 16 * 8 * 80 * 96 * 8 * 2 / 1024**3, 2)


def test_unknown_protocol_is_trained_on_demand(tmp_path):
    metas = [{**DEMO_VFA[0], "FlipAngle": 18}, DEMO_VFA[1]]
    plan = plan_collection(_collection("VFA", metas), model_dir=tmp_path, shape=(4, 4, 1))
    assert plan.network.train_on_demand and plan.network.model_name == "vfa"
    assert plan.summary() == ["train vfa network, then map"]


def test_mts_network_is_the_vfa_model_of_its_mt_off_pair():
    metas = [{"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
             {"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
             {"FlipAngle": 20, "RepetitionTimeExcitation": 0.018}]
    ents = [{"mt": "off"}, {"mt": "on"}, {"mt": "off"}]
    plan = plan_collection(_collection("MTS", metas, ents), shape=(4, 4, 1))
    assert plan.model_name == "mts" and plan.network.model_name == "vfa"
    assert plan.network.protocol == {"flip_angle_deg": [6.0, 20.0], "tr": [0.028, 0.018]}


def test_closed_form_collections_run_no_network():
    plan = plan_collection(_collection("MTR", [{"MTState": False}, {"MTState": True}]),
                           estimators=("nn", "nlls"), shape=(4, 4, 1))
    assert plan.closed_form and plan.estimators == (CLOSED_FORM,) and plan.network is None
    assert plan.summary() == ["map (closed form)"]
    assert "closed form" in plan.describe() and "neural network" not in plan.describe()


def test_plan_round_trips_through_json_for_the_mapping_node():
    plan = plan_collection(_collection("VFA", DEMO_VFA), estimators=("nn", "nlls"),
                           shape=(80, 96, 8))
    linked = replace(plan, b1_provider=B1Provider("TB1DAM_acq-dam", "TB1DAM", True))
    for each in (plan, linked):
        again = CollectionPlan.from_dict(json.loads(json.dumps(each.to_dict())))
        assert again == each
        assert again.model().to_protocol() == plan.protocol
    assert plan.uses_b1 and linked.b1_from_provider and not plan.b1_from_provider


DAM = [{"FlipAngle": 60, "RepetitionTime": 10.0}, {"FlipAngle": 120, "RepetitionTime": 10.0}]


def _planned(suffix, metas, name, b1map=None, intended_for=frozenset(), entities=None):
    col = _collection(suffix, metas, entities)
    for m in col.members:
        m.path = Path(str(m.path).replace("sub-x", f"sub-x_acq-{name}"))
    col.label, col.b1map, col.intended_for = f"{suffix}_acq-{name}", b1map, intended_for
    col.plan = plan_collection(col, shape=(4, 4, 1))
    return col


def test_a_provider_serves_the_collections_its_intended_for_names(caplog):
    vfa_a, vfa_b = _planned("VFA", DEMO_VFA, "a"), _planned("VFA", DEMO_VFA, "b")
    mtr = _planned("MTR", [{"MTState": False}, {"MTState": True}], "c")
    dam = _planned("TB1DAM", DAM, "dam", intended_for=frozenset(
        m.path.resolve() for m in vfa_b.members))
    assert dam.plan.provides == "TB1map" and dam.plan.closed_form and not dam.plan.uses_b1
    link_b1_providers([vfa_a, vfa_b, mtr, dam], "sub-x")
    assert vfa_a.plan.b1_provider is None  # not named in IntendedFor
    assert vfa_b.plan.b1_provider == B1Provider("TB1DAM_acq-dam", "TB1DAM", True)
    assert mtr.plan.b1_provider is None  # MTR does not depend on B1
    assert vfa_b.plan.summary()[0] == "B1 from TB1DAM_acq-dam"
    assert "computed from the TB1DAM collection" in vfa_b.plan.describe()


def test_the_first_of_several_providers_is_used_and_fmap_wins(caplog):
    vfa = _planned("VFA", DEMO_VFA, "a")
    fmap = _planned("VFA", DEMO_VFA, "b", b1map=Path("/data/sub-x_TB1map.nii.gz"))
    first, second = _planned("TB1DAM", DAM, "one"), _planned("TB1DAM", DAM, "two")
    with caplog.at_level(logging.INFO, logger="qmri_bids.qmri"):
        link_b1_providers([vfa, fmap, first, second], "sub-x")
    assert vfa.plan.b1_provider.label == "TB1DAM_acq-one" and vfa.plan.b1_from_provider
    assert fmap.plan.b1_provider.label == "TB1DAM_acq-one" and not fmap.plan.b1_from_provider
    assert fmap.plan.summary() == vfa.plan.summary()[1:]  # the fmap/ TB1map: nothing to add
    assert ("sub-x: VFA_acq-a could take its B1+ map from TB1DAM_acq-one, TB1DAM_acq-two; "
            "using the first, TB1DAM_acq-one") in caplog.text
    assert ("sub-x: VFA_acq-b is mapped with sub-x_TB1map.nii.gz from fmap/, not with the "
            "TB1map computed from TB1DAM_acq-one (a TB1map given in fmap/ wins)") in caplog.text


def test_estimator_choice():
    assert plan_estimators(MODELS["mese-mono"], ["dict", "nn"]) == ("nn", "dict")
    with pytest.raises(ValueError, match="unknown estimators"):
        plan_estimators(MODELS["vfa"], ["nn", "magic"])
    with pytest.raises(ValueError, match="none of the estimators"):
        plan_estimators(MODELS["vfa"], ["dict"])


def test_spatial_shape_of_3d_and_4d_members():
    vfa, mrf = MODELS["vfa"].collection, MODELS["mrf"].collection
    assert spatial_shape((128, 128), vfa) == (128, 128, 1)
    assert spatial_shape((10, 12, 4, 1), vfa) == (10, 12, 4)
    assert spatial_shape((60, 72, 1, 500), mrf) == (60, 72, 1)
    assert spatial_shape((60, 72, 500), mrf) == (60, 72, 1)
