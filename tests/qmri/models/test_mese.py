"""The mono-exponential multi-echo spin echo T2 model."""

from __future__ import annotations

import numpy as np
import torch

from qmri_bids.qmri.models import MESEMonoModel
from qmri_bids.qmri.models.mese_epg import MESEEPG

from ._checks import F64, ModelChecks


class TestMESEMonoModel(ModelChecks):
    model = MESEMonoModel([0.01, 0.03, 0.06])
    params = ([5.0, 0.05], [80.0, 0.12])


def test_closed_form():
    te = np.array([0.01, 0.02, 0.05])
    np.testing.assert_allclose(MESEMonoModel(te)(torch.tensor([10.0, 0.05], dtype=F64)).numpy(),
                               10 * np.exp(-te / 0.05), rtol=1e-12)


def test_dictionary_is_the_epg_model_of_the_same_echo_train():
    model = MESEMonoModel([0.0129 * k for k in range(1, 11)])
    dict_model, grid, known_b1 = model.dictionary(None, np.ones(3, bool))
    assert isinstance(dict_model, MESEEPG) and not known_b1
    np.testing.assert_allclose(dict_model.echo_times.numpy(), model.echo_time.numpy(), rtol=1e-9)
    assert set(grid.names) == {"T2", "B1"}
    # at nominal refocusing the EPG train is the mono-exponential one
    p = torch.tensor([[100.0, 0.08, 1.0]], dtype=F64)
    torch.testing.assert_close(dict_model(p), model(p[:, :2]), rtol=1e-9, atol=1e-9)
