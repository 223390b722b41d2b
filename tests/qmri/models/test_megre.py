"""The multi-echo gradient echo T2* model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmri_bids.qmri.models import MEGREModel

from ._checks import F64, ModelChecks


class TestMEGREModel(ModelChecks):
    model = MEGREModel([0.005, 0.01, 0.02])
    params = ([5.0, 30.0], [900.0, 120.0])


def test_closed_form_and_t2star():
    te = np.array([0.01, 0.02, 0.05])
    np.testing.assert_allclose(MEGREModel(te)(torch.tensor([10.0, 40.0], dtype=F64)).numpy(),
                               10 * np.exp(-40 * te), rtol=1e-12)
    assert float(MEGREModel.t2star(torch.tensor(40.0))) == pytest.approx(0.025)


def test_t2star_is_derived_from_every_estimate_of_r2star():
    model = MEGREModel([0.005, 0.01])
    values = {"S0": np.array([1.0, 2.0]), "R2star": np.array([40.0, 0.0])}
    derived = model.derived_maps(values, np.zeros((2, 2)), None, np.ones(2, bool))
    np.testing.assert_array_equal(derived["T2star"], [0.025, np.inf])
    assert derived["R2star"] is values["R2star"]
