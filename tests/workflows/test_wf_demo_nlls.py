"""``--qmri-estimator nlls`` on the 1-subject demo: the reference NLLS maps beside the network's.

(``all`` would add dictionary matching for MESE/MRF; ``nlls`` alone was measured at about the
cost of the default run on 2 busy cores, so it is the one kept in this folder.)

Measured median |estimate / truth - 1| of the ``desc-nlls`` maps, GM / WM: VFA T1 1.7 / 1.6 %,
IRT1 T1 0.5 / 0.5 %, MESE T2 0.9 / 1.0 %, MRF T1 0.5 / 0.7 %, MRF T2 1.2 / 1.4 % — so NLLS gets
the WM T2 of MRF right where the shipped network is 13 % low (test_wf_demo_maps): tolerance 5 %
everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmri_bids.errors import EXIT_OK
from tests.workflows._wf_helpers import load, participant_run, sidecar

pytestmark = pytest.mark.slow

SUB = "sub-01"
MAPS = {"vfa": ("T1",), "irt1": ("T1",), "mese": ("T2",), "mrf": ("T1", "T2")}


@pytest.fixture(scope="module")
def nlls_run(wf_demo, tmp_path_factory) -> dict:
    run = participant_run(wf_demo, tmp_path_factory.mktemp("wf_demo_nlls"),
                          "--qmri-estimator", "nlls", "--bias-method", "cnn")
    run["anat"] = run["out"] / SUB / "anat"
    return run


def test_exit_ok(nlls_run):
    assert nlls_run["code"] == EXIT_OK, nlls_run["stderr"][-3000:]


@pytest.mark.parametrize("acq,param", [(a, p) for a, ps in MAPS.items() for p in ps])
def test_nlls_maps_match_ground_truth(nlls_run, wf_demo, acq, param):
    gt = wf_demo / "derivatives" / "groundtruth" / SUB / "anat"
    path = nlls_run["anat"] / f"{SUB}_acq-{acq}_desc-nlls_{param}map.nii.gz"
    primary = nlls_run["anat"] / f"{SUB}_acq-{acq}_{param}map.nii.gz"
    assert primary.is_file()
    desc = "desc-nlls_"
    if sidecar(primary)["PrimaryEstimator"] == "nlls":
        # the network failed its validation gate: NLLS made the primary maps (the network's
        # are kept as desc-nn) and no second copy is written as desc-nlls
        assert not path.is_file()
        assert (nlls_run["anat"] / f"{SUB}_acq-{acq}_desc-nn_{param}map.nii.gz").is_file()
        path, desc = primary, ""
    assert path.is_file()
    meta = sidecar(path)
    assert "least squares" in meta["EstimationAlgorithm"]
    assert meta["Units"] == "s" and "Sources" in meta and meta["NoiseSigma"] > 0
    rate = nlls_run["anat"] / f"{SUB}_acq-{acq}_{desc}R{param[1]}map.nii.gz"
    assert rate.is_file()
    truth = load(gt / f"{SUB}_acq-{acq}_{param}map.nii.gz")
    seg = load(gt / f"{SUB}_acq-{acq}_desc-tissue_dseg.nii.gz").astype(int)
    est = load(path)
    errors = {name: float(np.median(np.abs(est[seg == lab] / truth[seg == lab] - 1)))
              for lab, name in ((4, "GM"), (5, "WM"))}
    assert all(e < 0.05 for e in errors.values()), f"{acq} {param} nlls: {errors}"
