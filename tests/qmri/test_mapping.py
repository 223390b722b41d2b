"""``qmri_bids.qmri.mapping`` on collections that neither the demo nor ds-real has (MEGRE,
MP2RAGE, MTR), written as small synthetic BIDS collections simulated with the project's own
models, and the mapping loop itself (plans, estimators, outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from qmri_bids.bids.discovery import Collection, Member
from qmri_bids.qmri.mapping import map_collection
from qmri_bids.qmri.models import MTRModel
from qmri_bids.qmri.models.megre import MEGREModel
from qmri_bids.qmri.models.mp2rage import MP2RAGEModel
from qmri_bids.qmri.plan import plan_collection

SHAPE = (24, 20, 3)


def _write_collection(folder: Path, suffix: str, entity: str, images: np.ndarray,
                      metas: list[dict]) -> Collection:
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for index, meta in enumerate(metas, start=1):
        path = folder / f"sub-x_{entity}-{index}_{suffix}.nii.gz"
        nib.save(nib.Nifti1Image(images[..., index - 1].astype(np.float32), np.eye(4)), path)
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
        members.append(Member(path, {"subject": "x", entity: str(index), "suffix": suffix},
                              meta))
    return Collection(suffix, "x", None, {}, members)


def _object(shape=SHAPE) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]),
                       indexing="ij")
    return np.repeat(((x**2 + y**2) < 0.7)[..., None], shape[2], axis=2)


def test_megre_maps_t2star_with_nlls(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    inside = _object()
    r2s = np.where(inside, rng.uniform(15, 60, SHAPE), 20.0)
    s0 = np.where(inside, 1000.0, 0.0)
    tes = [0.004, 0.008, 0.012, 0.016, 0.020, 0.024]
    model = MEGREModel(tes)
    clean = model(torch.as_tensor(np.stack([s0, r2s], -1))).numpy()
    noisy = np.hypot(clean + rng.normal(0, 5, clean.shape), rng.normal(0, 5, clean.shape))
    collection = _write_collection(tmp_path, "MEGRE", "echo", noisy,
                                   [{"EchoTime": te} for te in tes])
    plan = plan_collection(collection, estimators=("nlls",))
    assert plan.estimators == ("nlls",) and plan.network is None
    result = map_collection(collection, plan)
    maps = {(m.suffix, m.desc): m for m in result.maps}
    assert [m.suffix for m in result.maps if m.desc == "nlls"] == ["T2starmap", "R2starmap",
                                                                    "S0map"]
    t2s = maps[("T2starmap", "nlls")].data
    assert ("R2starmap", "nlls") in maps and ("S0map", "nlls") in maps
    rel = np.abs(t2s[inside] * r2s[inside] - 1)
    assert np.median(rel) < 0.03, np.median(rel)
    assert result.metadata["NoiseSigma"] is not None
    assert ("T2starmap", "crbsd") in maps or ("R2starmap", "crbsd") in maps


def test_mp2rage_maps_unit1_and_t1_by_lookup(tmp_path: Path) -> None:
    inside = _object()
    t1 = np.where(inside, np.linspace(0.8, 2.2, SHAPE[0])[:, None, None], 1.0)
    meta = {"RepetitionTimeExcitation": 0.0072, "RepetitionTimePreparation": 5.0,
            "NumberShots": 160, "MagneticFieldStrength": 7}
    tis, fas = [0.8, 2.7], [4.0, 5.0]
    model = MP2RAGEModel(tis, fas, 0.0072, 5.0, 80, 80)
    gre = model(torch.as_tensor(np.stack([np.where(inside, 1000.0, 0.0), t1], -1))).numpy()
    # Signed (phase-corrected, real-valued) inversion images, as MP2RAGE's UNI requires.
    collection = _write_collection(
        tmp_path, "MP2RAGE", "inv", gre,
        [{**meta, "InversionTime": ti, "FlipAngle": fa} for ti, fa in zip(tis, fas)])
    plan = plan_collection(collection, estimators=("nn", "nlls"))
    assert plan.closed_form and plan.network is None  # no network to train: a lookup table
    result = map_collection(collection, plan)
    maps = {m.suffix: m for m in result.maps}
    assert [m.suffix for m in result.maps] == ["UNIT1", "T1map", "R1map"]
    assert "NoiseSigma" not in result.metadata
    estimate = maps["T1map"].data[inside]
    assert np.median(np.abs(estimate / t1[inside] - 1)) < 0.02
    assert maps["T1map"].meta["EstimationAlgorithm"].startswith("UNI lookup table")


def test_mtr_maps_the_ratio_in_closed_form(tmp_path: Path) -> None:
    inside = _object()
    mtr = np.where(inside, 35.0, 0.0)
    images = MTRModel([False, True])(torch.as_tensor(
        np.stack([np.where(inside, 900.0, 0.0), mtr], -1))).numpy()
    collection = _write_collection(tmp_path, "MTR", "mt", images,
                                   [{"MTState": False}, {"MTState": True}])
    for member, state in zip(collection.members, ("off", "on")):
        member.entities["mt"] = state
    result = map_collection(collection, plan_collection(collection))
    (mtr_map,) = result.maps
    assert (mtr_map.suffix, mtr_map.desc, mtr_map.units) == ("MTRmap", None, "p.u.")
    np.testing.assert_allclose(mtr_map.data[inside], 35.0)
    assert np.isnan(mtr_map.data[~inside]).all()


def test_dictionary_is_skipped_where_it_is_no_reference_method(tmp_path: Path, caplog) -> None:
    tes = [0.004, 0.008, 0.012]
    clean = MEGREModel(tes)(torch.as_tensor(np.stack([np.where(_object(), 800.0, 0.0),
                                                      np.full(SHAPE, 30.0)], -1))).numpy()
    collection = _write_collection(tmp_path, "MEGRE", "echo", clean,
                                   [{"EchoTime": te} for te in tes])
    import logging

    with caplog.at_level(logging.INFO, logger="qmri_bids.qmri"):
        plan = plan_collection(collection, estimators=("nlls", "dict"))
    assert plan.estimators == ("nlls",)
    assert any("dict is not an estimator of the megre model" in r.message for r in caplog.records)
