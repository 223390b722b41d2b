"""The SPGR / DESPOT1 variable flip angle model against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmri_bids.qmri.models import VFAModel

from ._checks import F64, ModelChecks


class TestVFAModel(ModelChecks):
    model = VFAModel([3.0, 10.0, 20.0], 0.015)
    params = ([1000.0, 0.9], [400.0, 2.1])
    b1 = 0.93


def test_vfa_satisfies_despot1_linearisation():
    fa = np.array([2.0, 5.0, 10.0, 15.0, 25.0])
    tr, t1, m0, kappa = 0.015, 1.1, 1234.0, 0.9
    s = VFAModel(fa, tr)(torch.tensor([[m0, t1]], dtype=F64), torch.tensor([kappa], dtype=F64))
    s = s.numpy()[0]
    a = np.deg2rad(fa) * kappa
    e1 = math.exp(-tr / t1)
    # S/sin α = E1·S/tan α + M0(1 − E1) must hold exactly for every flip angle
    np.testing.assert_allclose(s / np.sin(a), e1 * s / np.tan(a) + m0 * (1 - e1), rtol=1e-12)


def test_vfa_matches_bloch_steady_state_with_per_member_tr():
    # Repeat "excite, spoil, relax" until steady state; TR differs per member.
    fa, trs, t1 = np.array([6.0, 20.0]), np.array([0.028, 0.018]), 0.9
    sig = VFAModel(fa, trs)(torch.tensor([1.0, t1], dtype=F64)).numpy()
    for i in range(2):
        mz = 1.0
        for _ in range(2000):
            s = mz * math.sin(math.radians(fa[i]))
            mz = 1 + (mz * math.cos(math.radians(fa[i])) - 1) * math.exp(-trs[i] / t1)
        assert sig[i] == pytest.approx(s, rel=1e-9)
