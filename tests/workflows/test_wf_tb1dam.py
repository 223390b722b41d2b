"""End to end: a participant with a VFA collection and a double-angle B1+ collection (TB1DAM, on
a 2x coarser grid) and no TB1map. The TB1DAM map is computed, stored, resampled to the VFA grid
and used by the VFA mapping: its sidecars name it, and its T1 is much closer to the truth than
the same network's T1 without a B1 map.

Everything is simulated with the project's own models (VFAModel with the true B1; the TB1DAM
images with the spoiled-gradient-echo VFA model at TR = 10 s, which has the small saturation a
real double-angle protocol has).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qmri_bids.qmri.base import B1_MAP
from qmri_bids.qmri.models import VFAModel
from tests.foundation._helpers import make_tiny_bids, run_log
from tests.workflows._wf_helpers import load, participant_run, sidecar

FINE = (24, 24, 4)  # VFA grid, 2 mm
VFA_FLIPS, VFA_TR = (3.0, 20.0), 0.015  # the shipped VFA network's protocol
DAM_FLIPS, DAM_TR = (60.0, 120.0), 10.0


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def _truth(world: np.ndarray) -> dict[str, np.ndarray]:
    """An ellipse of two tissues (T1 0.9 s and 1.5 s) in a B1+ that tilts from 0.8 to 1.2."""
    x, y = world[0] / 22.0, world[1] / 22.0
    inside = x**2 + (y / 0.85) ** 2 < 0.9
    t1 = np.where(x < 0.1 * y, 0.9, 1.5)
    return {"inside": inside, "T1": t1, "M0": np.where(inside, 1000.0, 0.0),
            "B1": 1.0 + 0.2 * np.clip(x, -1, 1)}


def _simulate(model, truth, rng, sigma) -> np.ndarray:
    params = torch.from_numpy(np.stack([truth["M0"], truth["T1"]], -1))
    with torch.no_grad():
        clean = model(params, torch.from_numpy(truth["B1"])).numpy()
    return np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))


def _save(path: Path, data: np.ndarray, affine: np.ndarray, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def dam_run(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("wf_tb1dam")
    bids = make_tiny_bids(base / "ds", subjects=("01",), suffixes=())
    rng = np.random.default_rng(7)
    fine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine[:3, 3] = (-23.0, -23.0, -3.0)
    # 2x coarser, the same field of view: voxel centres between the fine ones
    coarse = fine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
    truth = _truth(_world(fine, FINE))
    vfa = _simulate(VFAModel(VFA_FLIPS, [VFA_TR] * 2), truth, rng, sigma=0.3)
    for i, fa in enumerate(VFA_FLIPS):
        _save(bids / "sub-01" / "anat" / f"sub-01_flip-{i + 1}_VFA.nii.gz", vfa[..., i], fine,
              {"FlipAngle": fa, "RepetitionTimeExcitation": VFA_TR, "RepetitionTime": VFA_TR})
    dam_truth = _truth(_world(coarse, tuple(n // 2 for n in FINE)))
    dam = _simulate(VFAModel(DAM_FLIPS, [DAM_TR] * 2), dam_truth, rng, sigma=5.0)
    for i, fa in enumerate(DAM_FLIPS):
        _save(bids / "sub-01" / "fmap" / f"sub-01_flip-{i + 1}_TB1DAM.nii.gz", dam[..., i],
              coarse, {"FlipAngle": fa, "RepetitionTime": DAM_TR})
    run = participant_run(bids, base, "--skip-bids-validation", "--bias-method", "n4")
    return {**run, "truth": truth, "dam_truth": dam_truth, "vfa": vfa}


def test_the_run_maps_both_and_says_where_the_vfa_b1_came_from(dam_run):
    assert dam_run["code"] == 0, dam_run["stderr"][-3000:]
    anat = dam_run["out"] / "sub-01" / "anat"
    provided = dam_run["out"] / "sub-01" / "fmap" / f"sub-01_acq-tb1dam_{B1_MAP}.nii.gz"
    t1map = anat / "sub-01_acq-vfa_T1map.nii.gz"
    meta = sidecar(t1map)
    assert meta["B1Map"] == provided.name
    assert "TB1DAM" in meta["B1MapSource"] and "resampled" in meta["B1MapSource"]
    assert f"bids::sub-01/fmap/{provided.name}" in meta["Sources"]
    dam_meta = sidecar(provided)
    assert dam_meta["SourceCollection"] == "TB1DAM" and dam_meta["FlipAngle"] == [60.0, 120.0]
    assert "arccos" in dam_meta["EstimationAlgorithm"]
    log = run_log(dam_run["work"])
    assert "VFA is mapped with the TB1map computed from TB1DAM (no TB1map in fmap/" in log
    assert "resampled from 12x12x2 to the 24x24x4 grid of the VFA collection" in log


def test_the_double_angle_map_matches_the_true_b1(dam_run):
    provided = load(dam_run["out"] / "sub-01" / "fmap" / f"sub-01_acq-tb1dam_{B1_MAP}.nii.gz")
    truth = dam_run["dam_truth"]
    inside = truth["inside"]
    assert provided.shape == inside.shape
    error = provided[inside] / truth["B1"][inside] - 1
    assert np.median(np.abs(error)) < 0.01 and np.abs(error).max() < 0.05
    assert np.all(provided[~inside] == 0)  # NaN outside the object, stored as 0


def test_vfa_t1_with_the_provided_b1_beats_the_same_network_without_it(dam_run):
    from scipy.ndimage import binary_erosion

    from qmri_bids.qmri.estimators import FitContext, make_estimator
    from qmri_bids.qmri.model_store import locate_estimator

    truth, vfa = dam_run["truth"], dam_run["vfa"]
    t1 = load(dam_run["out"] / "sub-01" / "anat" / "sub-01_acq-vfa_T1map.nii.gz")
    # a coarse voxel away from the object's edge: there the provided map is interpolated, not
    # extended from the nearest valid voxel
    core = binary_erosion(truth["inside"], np.ones((5, 5, 1), bool))
    with_b1 = np.median(np.abs(t1[core] / truth["T1"][core] - 1))
    model = VFAModel(VFA_FLIPS, [VFA_TR] * 2)
    weights = locate_estimator(model).weights
    assert weights is not None, "the run mapped with the shipped VFA network"
    without = make_estimator("nn", FitContext(weights=weights)).fit(
        model, vfa, mask=truth["inside"], b1=None, noise=None).values["T1"]
    without_b1 = np.median(np.abs(without[core] / truth["T1"][core] - 1))
    assert with_b1 < 0.03, with_b1
    assert with_b1 < 0.3 * without_b1, (with_b1, without_b1)


def test_outputs_with_a_computed_b1_map_validate(dam_run):
    """The computed TB1map is a field map: written to fmap/, where the schema validator
    admits it (it rejects a TB1map in anat/)."""
    from qmri_bids.reports.validate import validate_derivatives, validator_command

    if validator_command() is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    result = validate_derivatives(dam_run["out"])
    assert result.available, result.reason
    assert result.errors == [], result.summary()
