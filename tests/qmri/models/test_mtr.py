"""The magnetisation transfer ratio (closed form)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.models import MTRModel

from ._checks import F64, ModelChecks


class TestMTRModel(ModelChecks):
    model = MTRModel([False, True])
    params = ([1000.0, 30.0], [500.0, 45.0])


def test_closed_form_is_the_definition_and_inverts_forward():
    model = MTRModel([True, False])  # mt-on listed first
    truth = torch.tensor([[1000.0, 30.0], [400.0, 12.5]], dtype=F64)
    data = model(truth).numpy()
    np.testing.assert_allclose(data[:, 1], truth[:, 0].numpy())  # S_off = M0
    values, algorithm = model.closed_form_maps(data, None, np.array([True, False]))
    assert values["MTR"][0] == pytest.approx(30.0) and np.isnan(values["MTR"][1])
    assert "S_off - S_on" in algorithm


def test_sidecars_need_one_on_and_one_off_member():
    def members(states):
        return [SimpleNamespace(path=f"sub-x_mt-{i}_MTR.nii.gz", entities={},
                                metadata={"MTState": s}) for i, s in enumerate(states)]

    assert MTRModel.from_sidecars(members([False, True])).index_on == 1
    with pytest.raises(BadDataError, match="one mt-on and one mt-off"):
        MTRModel.from_sidecars(members([True, True]))
