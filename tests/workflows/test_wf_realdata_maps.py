"""Participant runs on ds-real: ``brain02`` (VFA, 2 flip angles, 2-D B1 map) and ``phantom01``
(NIST T1 array, IRT1 with 19 TIs, Philips scaling, inv-19 excluded for its other echo time).

On-demand training: phantom01's own protocol may be shipped (it is since 2026-11-21), so a
copy of phantom01 without inv-18 (a protocol no shipped model covers; checked first) is mapped
with a module-scoped ``--model-dir``: the network is trained there (~40 s on 2 busy cores, 3000
steps) with its card, and a second run reuses it without a training node.

Measured (irt1-tr network of phantom01's protocol, prior T1 0.2-5 s), median T1 per sphere against the
CaliberMRI v2 reference (``matched_reference_T1_v2_ms``): spheres 8-14 (241-1884 ms) within
-5.2 %…+5.8 %; sphere 7 (175 ms) +6.3 %, sphere 6 (121 ms) +52 %: both below the network's prior
(T1 ≥ 0.2 s), where a network trained on that prior cannot answer. The 10 % tolerance is applied
to the measurable spheres whose reference T1 is inside the estimator's prior (read from its
card); the others are only checked to be finite.

Both runs go through the console script in a fresh process: see
``_wf_helpers.participant_run_subprocess`` (an in-process run hangs in the training node).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qmri_bids.errors import EXIT_OK
from tests.workflows._wf_helpers import copy_subject, load, participant_run_subprocess, sidecar

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

REF = Path("derivatives/reference/sub-phantom01/anat/sub-phantom01_desc-spheres_dseg")
PHANTOM_T1 = "sub-phantom01/anat/sub-phantom01_acq-irt1_T1map.nii.gz"
BRAIN_T1 = "sub-brain02/anat/sub-brain02_acq-vfa_T1map.nii.gz"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wf_models")


@pytest.fixture(scope="module")
def real_maps(ds_real, model_dir, tmp_path_factory) -> dict:
    return participant_run_subprocess(ds_real, tmp_path_factory.mktemp("wf_real"),
                                      "--participant-label", "brain02", "phantom01",
                                      "--model-dir", model_dir, "--skip-bids-validation")


def _card_of(meta: dict, model_dir: Path) -> dict:
    """Card of the estimator a sidecar names, shipped or in ``model_dir``."""
    from qmri_bids.qmri.model_store import SHIPPED_DIR

    for folder in (SHIPPED_DIR, model_dir):
        card = folder / f"{meta['Estimator']['Name']}.json"
        if card.is_file():
            return json.loads(card.read_text())
    raise AssertionError(f"estimator {meta['Estimator']['Name']} found nowhere")


# ---- on-demand training: phantom01 without inv-18, a protocol no shipped model covers -----
@pytest.fixture(scope="module")
def train_bids(ds_real, tmp_path_factory) -> Path:
    from qmri_bids.bids.discovery import discover
    from qmri_bids.qmri.plan import plan_collection

    base = tmp_path_factory.mktemp("wf_train_ds")
    bids = base / "ds"
    keep = [f"anat/sub-phantom01_inv-{i}_IRT1.*" for i in range(1, 20) if i != 18]
    copy_subject(ds_real, bids, "phantom01", "phantom01", tuple(keep))
    (inputs,) = discover(bids, base / "db", ["phantom01"])
    network = plan_collection(inputs.collections[0], model_dir=base / "m").network
    assert network.model_name.startswith("irt1") and network.train_on_demand, \
        f"protocol unexpectedly shipped: {network.weights}"
    return bids


@pytest.fixture(scope="module")
def trained_run(train_bids, model_dir, tmp_path_factory) -> dict:
    return participant_run_subprocess(train_bids, tmp_path_factory.mktemp("wf_train"),
                                      "--model-dir", model_dir, "--skip-bids-validation")


@pytest.fixture(scope="module")
def trained_rerun(train_bids, trained_run, model_dir, tmp_path_factory) -> dict:
    assert trained_run["code"] == EXIT_OK, trained_run["stderr"][-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    run = participant_run_subprocess(train_bids, tmp_path_factory.mktemp("wf_train_rerun"),
                                     "--model-dir", model_dir, "--skip-bids-validation")
    run["models_before"] = before
    return run


def _trained(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("irt1*.safetensors"))


def test_exit_ok(real_maps):
    assert real_maps["code"] == EXIT_OK, real_maps["stderr"][-3000:]


def test_trained_model_in_model_dir_with_card(trained_run, model_dir):
    from qmri_bids.artifacts import sha256_file

    assert trained_run["code"] == EXIT_OK, trained_run["stderr"][-3000:]
    (weights,) = _trained(model_dir)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert weights.stem == f"{card['model']}-{card['protocol_hash']}"
    assert card["sha256"] == sha256_file(weights) and card["format_version"] == 2
    assert card["loss"] == "crb"
    assert 2.0 in card["protocol"]["inversion_time"] or 1.7 in card["protocol"]["inversion_time"]
    assert 1.8 not in card["protocol"]["inversion_time"]
    meta = sidecar(trained_run["out"] / PHANTOM_T1)
    assert meta["Estimator"]["Name"] == weights.stem
    assert meta["Estimator"]["SHA256"] == card["sha256"]
    assert list(trained_run["work"].rglob("train_estimator_wf"))  # the training node ran
    t1 = load(trained_run["out"] / PHANTOM_T1)
    assert np.isfinite(t1).all() and (t1 > 0).sum() > 1000


def test_second_run_reuses_model(trained_rerun, model_dir):
    assert trained_rerun["code"] == EXIT_OK, trained_rerun["stderr"][-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    for name, mtime in trained_rerun["models_before"].items():
        if not name.endswith(".lock"):
            assert after.get(name) == mtime, f"{name} was rewritten (retrained?)"
    assert not list(trained_rerun["work"].rglob("train_estimator_wf")), \
        "the second run planned a training node although the model is in --model-dir"
    (weights,) = _trained(model_dir)
    assert f"network {weights.stem}" in trained_rerun["stdout"]  # the plan names it


@pytest.mark.parametrize("rel", [BRAIN_T1, PHANTOM_T1])
def test_t1_finite_inside_object(real_maps, rel):
    t1 = load(real_maps["out"] / rel)
    crbsd = load(real_maps["out"] / rel.replace("_T1map", "_desc-crbsd_T1map"))
    inside = t1 > 0  # the object mask of the mapping (0 outside)
    assert inside.sum() > 1000
    assert np.isfinite(t1).all()
    # NLLS bounds T1 at 10 s (the refit of out-of-prior voxels, or NLLS as the primary): a few
    # voxels of long, poorly determined T1 may sit at the bound, never beyond it
    assert (t1[inside] <= 10).all() and (t1[inside] >= 10).mean() < 0.01
    assert np.isfinite(crbsd[inside]).all()
    if "brain02" in rel:  # a brain: median T1 of a 3 T VFA between WM and GM values
        assert 0.6 < float(np.median(t1[inside])) < 2.0


def test_brain02_b1_map_used(real_maps):
    meta = sidecar(real_maps["out"] / BRAIN_T1)
    assert meta["B1Map"] == "sub-brain02_TB1map.nii.gz"
    assert any(s.endswith("fmap/sub-brain02_TB1map.nii.gz") for s in meta["Sources"])


def test_phantom_excluded_source(real_maps):
    meta = sidecar(real_maps["out"] / PHANTOM_T1)
    excluded = meta["ExcludedSources"]
    assert len(excluded) == 1 and excluded[0].startswith("sub-phantom01_inv-19_IRT1.nii.gz")
    assert "EchoTime" in excluded[0]


def test_phantom_sidecar_protocol_is_the_fitted_one(real_maps):
    meta = sidecar(real_maps["out"] / PHANTOM_T1)
    # InversionTime must be one number in a BIDS map sidecar: the per-source values of the
    # fitted members (inv-19 excluded) are under SourceParameters
    tis = meta["SourceParameters"]["InversionTime"]
    assert "InversionTime" not in meta and len(tis) == 18 and 2.0 not in tis
    assert meta["EchoTime"] == pytest.approx(0.043164)


def test_phantom_spheres_against_reference(real_maps, model_dir, ds_real):
    import nibabel as nib
    import pandas as pd

    t1 = load(real_maps["out"] / PHANTOM_T1)
    seg = np.asarray(nib.load(str(ds_real / f"{REF}.nii.gz")).dataobj).reshape(t1.shape)
    table = pd.read_csv(ds_real / f"{REF}.tsv", sep="\t", dtype={"measurable": str})
    card = _card_of(sidecar(real_maps["out"] / PHANTOM_T1), model_dir)
    prior = {r["name"]: r for r in card["prior"]["ranges"]}["T1"]
    errors, checked = {}, 0
    for row in table[table["measurable"].str.lower() == "true"].itertuples():
        ref_s = float(row.matched_reference_T1_v2_ms) / 1000
        median = float(np.median(t1[seg == row.label]))
        assert np.isfinite(median) and median > 0, f"sphere {row.label}"
        if prior["lower"] <= ref_s <= prior["upper"]:
            errors[int(row.label)] = median / ref_s - 1
            checked += 1
    assert checked >= 6, f"only {checked} spheres inside the estimator's prior"
    bad = {k: round(v, 3) for k, v in errors.items() if abs(v) > 0.10}
    assert not bad, f"spheres over 10 % from the v2 reference: {bad} (all: {errors})"
