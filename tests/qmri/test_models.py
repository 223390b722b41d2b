"""Signal models against independent references (closed forms, linearisations, Bloch loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmri_bids.qmri.models import (
    MODELS,
    IRT1Model,
    IRT1TRModel,
    MEGREModel,
    MESEMonoModel,
    MP2RAGEModel,
    MTSModel,
    VFAModel,
)

F64 = torch.float64


def test_registry_names_match_classes():
    assert set(MODELS) >= {"vfa", "irt1", "irt1-tr", "mese-mono", "megre", "mts", "mp2rage"}
    for name, cls in MODELS.items():
        assert cls.name == name


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


def test_exponential_models_closed_form():
    te = np.array([0.01, 0.02, 0.05])
    np.testing.assert_allclose(MESEMonoModel(te)(torch.tensor([10.0, 0.05], dtype=F64)).numpy(),
                               10 * np.exp(-te / 0.05), rtol=1e-12)
    np.testing.assert_allclose(MEGREModel(te)(torch.tensor([10.0, 40.0], dtype=F64)).numpy(),
                               10 * np.exp(-40 * te), rtol=1e-12)
    assert float(MEGREModel.t2star(torch.tensor(40.0))) == pytest.approx(0.025)


def test_mts_closed_form_inverts_forward_and_approximates_spgr():
    model = MTSModel([6.0, 6.0, 20.0], [0.028, 0.028, 0.018], [0, 1, 0])
    truth = torch.tensor([[3000.0, 1.0, 0.02], [2000.0, 0.7, 0.035]], dtype=F64)
    kappa = torch.tensor([1.0, 0.9], dtype=F64)
    maps = model.maps(model(truth, kappa), kappa)
    torch.testing.assert_close(maps["A"], truth[:, 0])
    torch.testing.assert_close(maps["T1"], truth[:, 1])
    torch.testing.assert_close(maps["MTsat"], truth[:, 2])
    # Helms' small-angle signal is close to the exact SPGR signal for the mt-off members.
    exact = VFAModel([6.0, 20.0], [0.028, 0.018])(torch.tensor([3000.0, 1.0], dtype=F64))
    approx = model(torch.tensor([3000.0, 1.0, 0.0], dtype=F64))[[0, 2]]
    torch.testing.assert_close(approx, exact, rtol=0.02, atol=0)


def _mp2rage_bloch(t1, ti, fa_deg, tr_exc, tr_prep, nb, na, eta, kappa=1.0, cycles=30):
    """Pulse-by-pulse longitudinal simulation of MP2RAGE until steady state (reference)."""
    e1 = math.exp(-tr_exc / t1)
    n = nb + na
    starts = [ti[0] - nb * tr_exc, ti[1] - nb * tr_exc]
    mz, out = 1.0, None
    for _ in range(cycles):
        mz = -eta * mz
        t, sig = 0.0, []
        for k in range(2):
            mz = 1 + (mz - 1) * math.exp(-(starts[k] - t) / t1)
            a = math.radians(fa_deg[k]) * kappa
            for j in range(n):
                if j == nb:
                    sig.append(mz * math.sin(a))
                mz = 1 + (mz * math.cos(a) - 1) * e1
            t = starts[k] + n * tr_exc
        mz = 1 + (mz - 1) * math.exp(-(tr_prep - t) / t1)
        out = sig
    return np.array(out)


@pytest.mark.parametrize("kappa", [1.0, 0.8])
def test_mp2rage_matches_pulse_by_pulse_simulation(kappa):
    proto = {"ti": [0.7, 2.5], "fa_deg": [4.0, 5.0], "tr_exc": 0.007, "tr_prep": 5.0,
             "nb": 88, "na": 88, "eta": 0.96}
    model = MP2RAGEModel(proto["ti"], proto["fa_deg"], proto["tr_exc"], proto["tr_prep"],
                         proto["nb"], proto["na"], proto["eta"])
    for t1 in (0.5, 1.2, 3.0):
        sig = model(torch.tensor([1.0, t1], dtype=F64), torch.tensor(kappa, dtype=F64)).numpy()
        np.testing.assert_allclose(sig, _mp2rage_bloch(t1, kappa=kappa, **proto), rtol=1e-8)


def test_mp2rage_uni_lookup_recovers_t1_with_b1():
    model = MP2RAGEModel([0.7, 2.5], [4.0, 5.0], 0.007, 5.0, 88, 88)
    t1 = torch.tensor([0.6, 0.9, 1.4, 2.0], dtype=F64)
    b1 = torch.tensor([0.85, 1.0, 1.1, 0.95], dtype=F64)
    uni = model.uni(t1, b1)
    torch.testing.assert_close(model.t1_from_uni(uni, b1), t1, rtol=5e-3, atol=0)
    # Ignoring B1 gives a measurably different T1 (the correction matters).
    assert (model.t1_from_uni(uni[[0]]) - t1[0]).abs() > 0.01


CASES = [
    (VFAModel([3.0, 10.0, 20.0], 0.015), [[1000.0, 0.9]], True),
    (IRT1Model([0.1, 0.5, 1.0, 2.0]), [[1.0, -1.9, 1.2]], False),
    (IRT1TRModel([0.1, 0.5, 1.0, 2.0], 3.0), [[1.0, 1.2]], False),
    (MESEMonoModel([0.01, 0.03, 0.06]), [[5.0, 0.05]], False),
    (MEGREModel([0.005, 0.01, 0.02]), [[5.0, 30.0]], False),
    (MTSModel([6.0, 6.0, 20.0], [0.028, 0.028, 0.018], [0, 1, 0]), [[3000.0, 1.0, 0.02]], True),
    (MP2RAGEModel([0.7, 2.5], [4.0, 5.0], 0.007, 5.0, 88, 88), [[1.0, 1.1]], True),
]


@pytest.mark.parametrize("model,params,uses_b1", CASES, ids=lambda c: getattr(c, "name", None))
def test_gradients_match_finite_differences(model, params, uses_b1):
    p = torch.tensor(params, dtype=F64, requires_grad=True)
    b1 = torch.tensor([0.93], dtype=F64) if uses_b1 else None
    assert torch.autograd.gradcheck(lambda q: model(q, b1), (p,), eps=1e-7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model,params,uses_b1", CASES, ids=lambda c: getattr(c, "name", None))
def test_float32_batch_shapes(model, params, uses_b1):
    p64 = torch.tensor(params, dtype=F64).expand(2, 3, -1)
    s64 = model(p64)
    s32 = model(p64.float())
    assert s32.dtype == torch.float32 and s32.shape == s64.shape == (2, 3, s64.shape[-1])
    torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=1e-5 * s64.abs().max().item())
