"""The estimator interface: one ``fit(model, data, *, mask, b1, noise) -> MapSet`` per name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from qmri_bids.qmri.base import CLOSED_FORM
from qmri_bids.qmri.estimators import ESTIMATORS, FitContext, MapSet, make_estimator
from qmri_bids.qmri.model_store import SHIPPED_DIR, estimator_stem
from qmri_bids.qmri.models import MEGREModel, MESEMonoModel, MTRModel, VFAModel

F64 = torch.float64
DEMO_VFA = SHIPPED_DIR / (estimator_stem("vfa", VFAModel([3.0, 20.0], 0.015).to_protocol())
                          + ".safetensors")


def _simulate(model, params, b1=None):
    return model(torch.as_tensor(params, dtype=F64),
                 None if b1 is None else torch.as_tensor(b1, dtype=F64)).numpy()


def test_registry():
    assert list(ESTIMATORS) == ["nn", "nlls", "dict", CLOSED_FORM]
    assert [ESTIMATORS[n].desc for n in ESTIMATORS] == [None, "nlls", "dict", None]
    with pytest.raises(ValueError, match="unknown estimator 'magic'"):
        make_estimator("magic")


def test_network_maps_with_the_planned_file_and_reports_it():
    model = VFAModel([3.0, 20.0], 0.015)
    truth = np.stack([np.full(6, 1000.0), np.linspace(0.6, 2.0, 6)], -1)
    data = _simulate(model, truth)
    mask = np.array([True] * 5 + [False])
    fit = make_estimator("nn", FitContext(weights=DEMO_VFA)).fit(model, data, mask=mask,
                                                                 b1=np.ones(6), noise=None)
    assert isinstance(fit, MapSet) and fit.desc is None and set(fit.values) == {"M0", "T1"}
    np.testing.assert_allclose(fit.values["T1"][:5], truth[:5, 1], rtol=0.02)
    assert np.isnan(fit.values["T1"][5])
    assert fit.metadata["Estimator"]["Name"] == DEMO_VFA.stem
    assert fit.metadata["Estimator"]["SHA256"] and "vfa model" in fit.algorithm


def test_network_warns_when_the_data_snr_is_outside_its_training_range(caplog):
    model = VFAModel([3.0, 20.0], 0.015)
    data = _simulate(model, [[1000.0, 1.0]] * 4)
    with caplog.at_level(logging.WARNING, logger="qmri_bids.qmri"):
        make_estimator("nn", FitContext(weights=DEMO_VFA)).fit(
            model, data, mask=np.ones(4, bool), b1=None, noise=data.max() / 2)
    assert any("outside the SNR range the network was trained on" in r.message
               for r in caplog.records)


def test_nlls_recovers_the_parameters_and_reports_convergence():
    model = MEGREModel([0.004, 0.008, 0.012, 0.016])
    truth = np.array([[800.0, 25.0], [300.0, 60.0]])
    fit = make_estimator("nlls").fit(model, _simulate(model, truth), mask=np.ones(2, bool),
                                     b1=None, noise=None)
    np.testing.assert_allclose(fit.parameters(model, (2,)), truth, rtol=1e-6)
    assert fit.desc == "nlls" and fit.diagnostics["converged"].all()


def test_dictionary_matching_where_the_model_names_a_dictionary():
    model = MESEMonoModel([0.0129 * k for k in range(1, 11)])
    data = _simulate(model, [[500.0, 0.08], [200.0, 0.05]])
    fit = make_estimator("dict").fit(model, data, mask=np.array([True, False]), b1=None,
                                     noise=None)
    assert fit.values["T2"][0] == pytest.approx(0.08, rel=0.03)  # the 2 % grid
    assert fit.values["M0"][0] == pytest.approx(500.0, rel=0.03)
    assert np.isnan(fit.values["T2"][1])
    with pytest.raises(ValueError, match="no dictionary"):
        make_estimator("dict").fit(VFAModel([3.0, 20.0], 0.015), data[:, :2],
                                   mask=np.ones(2, bool), b1=None, noise=None)


def test_closed_form_is_the_models_formula():
    model = MTRModel([False, True])
    data = _simulate(model, [[1000.0, 40.0]])
    fit = make_estimator(CLOSED_FORM).fit(model, data, mask=np.ones(1, bool), b1=None,
                                          noise=None)
    assert fit.values["MTR"][0] == pytest.approx(40.0) and fit.algorithm.startswith("MTR =")
