"""The inversion recovery T1 models (Barral's three-parameter and the TR-aware one)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from qmri_bids.qmri.models import IRT1Model, IRT1TRModel

from ._checks import F64, ModelChecks


class TestIRT1Model(ModelChecks):
    model = IRT1Model([0.1, 0.5, 1.0, 2.0])
    params = ([1.0, -1.9, 1.2], [3.0, -5.5, 0.6])


class TestIRT1TRModel(ModelChecks):
    model = IRT1TRModel([0.1, 0.5, 1.0, 2.0], 3.0)
    params = ([1.0, 1.2], [2.5, 0.4])


def test_ir_models_agree_and_magnitude():
    ti = np.array([0.05, 0.3, 0.7, 1.5, 3.0])
    m0, t1, tr = 100.0, 0.8, 4.0
    p_tr = torch.tensor([m0, t1], dtype=F64)
    # The TR-aware model is the Barral model with a = M0(1 + e^{−TR/T1}), b = −2 M0.
    p_b = torch.tensor([m0 * (1 + math.exp(-tr / t1)), -2 * m0, t1], dtype=F64)
    signed = IRT1Model(ti, magnitude=False)(p_b).numpy()
    ref = m0 * (1 - 2 * np.exp(-ti / t1) + np.exp(-tr / t1))
    np.testing.assert_allclose(signed, ref, rtol=1e-12)
    np.testing.assert_allclose(IRT1TRModel(ti, tr)(p_tr).numpy(), np.abs(ref), rtol=1e-12)
    assert (signed[:2] < 0).all() and (IRT1Model(ti)(p_b).numpy() >= 0).all()


def _members(metas):
    return [SimpleNamespace(path=f"sub-x_inv-{i}_IRT1.nii.gz", entities={}, metadata=m)
            for i, m in enumerate(metas, start=1)]


def test_sidecars_choose_the_tr_aware_model_only_with_one_shared_tr():
    tis = (0.1, 0.5, 1.0)
    with_tr = IRT1Model.from_sidecars(_members([{"InversionTime": t, "RepetitionTime": 2.5}
                                                for t in tis]))
    assert isinstance(with_tr, IRT1TRModel) and with_tr.tr == 2.5
    mixed = IRT1Model.from_sidecars(_members([{"InversionTime": t, "RepetitionTime": tr}
                                              for t, tr in zip(tis, (2.5, 2.5, 3.0))]))
    assert type(mixed) is IRT1Model
    np.testing.assert_allclose(mixed.inversion_time.numpy(), tis)
