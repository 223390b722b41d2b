"""Estimator lookup by protocol hash (the collection's plan): the shipped model for the demo's VFA
protocol; a new model to train (no file) once one flip angle changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _vfa_collection(bids: Path, db: Path):
    from qmri_bids.bids.discovery import discover

    (subject,) = discover(bids, db, ["01"])
    (vfa,) = [c for c in subject.collections if c.suffix == "VFA"]
    return vfa


@pytest.fixture()
def vfa_copy(wf_demo, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(wf_demo, dst, ignore=shutil.ignore_patterns("derivatives"))
    return dst


def _network(collection, tmp_path: Path):
    from qmri_bids.qmri.plan import plan_collection

    network = plan_collection(collection, model_dir=tmp_path / "models").network
    return network.model_name, network.protocol, network.weights


def test_unchanged_protocol_finds_shipped_model(vfa_copy, tmp_path):
    from qmri_bids.qmri.model_store import SHIPPED_DIR

    name, protocol, found = _network(_vfa_collection(vfa_copy, tmp_path / "db"), tmp_path)
    assert name == "vfa"
    assert found is not None and found.parent == SHIPPED_DIR
    card = json.loads(found.with_suffix(".json").read_text())
    assert found.stem == f"vfa-{card['protocol_hash']}"
    assert sorted(protocol["flip_angle_deg"]) == [3.0, 20.0]


def test_changed_flip_angle_needs_training(vfa_copy, tmp_path):
    from qmri_bids.qmri.model_store import estimator_stem

    _, shipped_protocol, shipped = _network(_vfa_collection(vfa_copy, tmp_path / "db0"), tmp_path)
    side = vfa_copy / "sub-01" / "anat" / "sub-01_flip-2_VFA.json"
    meta = json.loads(side.read_text())
    meta["FlipAngle"] = 18
    side.write_text(json.dumps(meta))
    name, protocol, found = _network(_vfa_collection(vfa_copy, tmp_path / "db1"), tmp_path)
    assert name == "vfa"
    assert found is None, f"a changed protocol must not reuse {found}"
    assert sorted(protocol["flip_angle_deg"]) == [3.0, 18.0]
    assert estimator_stem(name, protocol) != shipped.stem
    assert estimator_stem(name, protocol) != estimator_stem(name, shipped_protocol)
