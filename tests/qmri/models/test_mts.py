"""Magnetisation transfer saturation (Helms 2008): closed form, estimation model, MTsat."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmri_bids.qmri.models import MTSModel, VFAModel

from ._checks import F64, ModelChecks

MTS = MTSModel([6.0, 6.0, 20.0], [0.028, 0.028, 0.018], [0, 1, 0])


class TestMTSModel(ModelChecks):
    model = MTS
    params = ([3000.0, 1.0, 0.02], [2000.0, 0.7, 0.035])
    b1 = 0.93


def test_closed_form_inverts_forward_and_approximates_spgr():
    truth = torch.tensor([[3000.0, 1.0, 0.02], [2000.0, 0.7, 0.035]], dtype=F64)
    kappa = torch.tensor([1.0, 0.9], dtype=F64)
    maps = MTS.maps(MTS(truth, kappa), kappa)
    torch.testing.assert_close(maps["A"], truth[:, 0])
    torch.testing.assert_close(maps["T1"], truth[:, 1])
    torch.testing.assert_close(maps["MTsat"], truth[:, 2])
    # Helms' small-angle signal is close to the exact SPGR signal for the mt-off members.
    exact = VFAModel([6.0, 20.0], [0.028, 0.018])(torch.tensor([3000.0, 1.0], dtype=F64))
    approx = MTS(torch.tensor([3000.0, 1.0, 0.0], dtype=F64))[[0, 2]]
    torch.testing.assert_close(approx, exact, rtol=0.02, atol=0)


def test_estimators_fit_the_exact_spgr_model_of_the_mt_off_pair():
    # members listed T1w first: the pair is still ordered by flip angle (PDw first)
    model = MTSModel([20.0, 6.0, 6.0], [0.018, 0.028, 0.028], [0, 1, 0])
    est = model.estimation_model()
    assert isinstance(est, VFAModel)
    assert est.to_protocol() == {"flip_angle_deg": [6.0, 20.0], "tr": [0.028, 0.018]}
    data = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(model.estimation_data(data), data[:, [2, 0]])


def test_mtsat_in_percent_from_the_estimated_t1_and_m0():
    truth = torch.tensor([[3000.0, 1.0, 0.02], [2000.0, 0.7, 0.035]], dtype=F64)
    data = MTS(truth).numpy()
    values = {"M0": truth[:, 0].numpy(), "T1": truth[:, 1].numpy()}
    mask = np.array([True, False])
    mtsat = MTS.derived_maps(values, data, None, mask)["MTsat"]
    np.testing.assert_allclose(mtsat[0], 100 * 0.02, rtol=1e-9)
    assert np.isnan(mtsat[1])


# --------------------------------------------------------------------------- B1 correction


def _empirical_signals(kappa: np.ndarray, mtsat0: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """Signals of WM-like voxels whose MT saturation depends on B1 as the empirical model of
    Weiskopf 2013 says: the nominal-angle MTsat is MTsat0 (1 - λκ) / (1 - λ), i.e. the MT
    saturation in the signal equation δ = κ² · that (Helms' small-angle model)."""
    from qmri_bids.qmri.models.mts import WEISKOPF_LAMBDA as lam

    delta = kappa**2 * mtsat0 * (1 - lam * kappa) / (1 - lam)
    truth = np.stack([np.full_like(kappa, 3000.0), np.full_like(kappa, 0.85), delta], -1)
    return MTS(torch.as_tensor(truth), torch.as_tensor(kappa)).numpy(), truth


def test_weiskopf_correction_removes_the_b1_dependence_of_the_empirical_model():
    kappa = np.linspace(0.8, 1.2, 9)
    data, truth = _empirical_signals(kappa)
    values = {"M0": truth[:, 0], "T1": truth[:, 1]}  # the B1-corrected fit's T1 and A
    mask = np.ones(kappa.shape, dtype=bool)
    corrected = MTS.derived_maps(values, data, kappa, mask)["MTsat"]
    np.testing.assert_allclose(corrected, 3.0, rtol=1e-9)  # p.u., for every B1
    # without the B1 map (nominal angles): the MT pulse's B1 dependence stays
    nominal = MTS.maps(torch.as_tensor(data))["MTsat"].numpy() * 100
    np.testing.assert_allclose(nominal, 3.0 * (1 - 0.4 * kappa) / 0.6, rtol=1e-9)
    assert np.ptp(nominal) > 0.25 * 3.0


def test_the_correction_acts_on_the_nominal_angle_mtsat():
    # Helms' MTsat with nominal angles is δ_κ / κ², δ_κ the one with B1-corrected angles
    truth = torch.tensor([[3000.0, 1.0, 0.02], [2000.0, 0.7, 0.035]], dtype=F64)
    kappa = torch.tensor([0.85, 1.15], dtype=F64)
    data = MTS(truth, kappa)
    nominal = MTS.maps(data)["MTsat"]
    corrected_angles = MTS.maps(data, kappa)["MTsat"]
    torch.testing.assert_close(corrected_angles, truth[:, 2])
    torch.testing.assert_close(nominal, corrected_angles / kappa**2)


def test_the_mtsat_sidecar_records_the_b1_correction_or_its_absence():
    from qmri_bids.qmri.models.mts import WEISKOPF_2013

    with_b1 = MTS.derived_metadata(np.ones(3))["MTsat"]
    assert with_b1["B1Correction"]["Applied"] is True
    assert with_b1["B1Correction"]["Lambda"] == 0.4
    assert with_b1["B1Correction"]["Reference"] == WEISKOPF_2013
    assert "depends on the MT pulse" in with_b1["B1Correction"]["LambdaNote"]
    assert "Weiskopf et al. 2013 (lambda = 0.4)" in with_b1["EstimationAlgorithm"]
    without = MTS.derived_metadata(None)["MTsat"]
    assert without["B1Correction"]["Applied"] is False
    assert "no B1 correction" in without["EstimationAlgorithm"]


def _mts_collection(folder, data: np.ndarray, kappa: np.ndarray | None):
    import json

    import nibabel as nib

    from qmri_bids.bids.discovery import Collection, Member

    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (flip, mt) in enumerate(((1, "off"), (1, "on"), (2, "off"))):
        meta = {"FlipAngle": float(MTS.flip_angle_deg[i]), "MTState": mt == "on",
                "RepetitionTimeExcitation": float(MTS.tr[i])}
        path = folder / f"sub-x_flip-{flip}_mt-{mt}_MTS.nii.gz"
        nib.save(nib.Nifti1Image(data[..., i].astype(np.float32), np.eye(4)), path)
        members.append(Member(path, {"flip": str(flip), "mt": mt}, meta))
    b1map = None
    if kappa is not None:
        b1map = folder / "sub-x_TB1map.nii.gz"
        nib.save(nib.Nifti1Image(kappa.astype(np.float32), np.eye(4)), b1map)
        b1map.with_name("sub-x_TB1map.json").write_text(json.dumps({}))
    return Collection("MTS", "x", None, {}, members, b1map)


def test_mapping_with_a_tb1map_corrects_mtsat_and_t1(tmp_path):
    from qmri_bids.qmri.mapping import map_collection
    from qmri_bids.qmri.plan import plan_collection

    # a 24 x 20 x 2 object whose B1 varies 0.8-1.2 along x; noise-free Helms signals
    kappa = np.repeat(np.linspace(0.8, 1.2, 24)[:, None, None], 20, 1).repeat(2, 2)
    data, _ = _empirical_signals(kappa.reshape(-1))
    data = data.reshape(*kappa.shape, 3)
    results = {}
    for name, b1 in (("with", kappa), ("without", None)):
        collection = _mts_collection(tmp_path / name, data, b1)
        plan = plan_collection(collection, estimators=("nlls",))
        maps = {(m.suffix, m.desc): m for m in map_collection(collection, plan,
                                                              receive_method="none").maps}
        results[name] = maps
    mtsat = results["with"][("MTsat", "nlls")]
    # the exact SPGR fit of the mt-off pair vs Helms' small-angle signals: within 3 %
    assert np.ptp(np.nanmedian(mtsat.data, axis=(1, 2))) < 0.03 * 3.0
    assert np.ptp(np.nanmedian(results["without"][("MTsat", "nlls")].data, axis=(1, 2))) > 0.6
    assert mtsat.meta["B1Correction"]["Applied"] is True
    assert mtsat.meta["EstimationAlgorithm"].startswith("MTsat (Helms et al. 2008) with "
                                                        "B1-corrected flip angles")
    assert "from the estimates of non-linear least squares" in mtsat.meta["EstimationAlgorithm"]
    t1_with = np.nanmedian(results["with"][("T1map", "nlls")].data)
    assert t1_with == pytest.approx(0.85, rel=0.03)
    assert "B1Correction" not in results["with"][("T1map", "nlls")].meta
