"""EPG engine and the CPMG multi-echo spin-echo EPG model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmri_bids.qmri import epg
from qmri_bids.qmri.models import MODELS
from qmri_bids.qmri.models.mese_epg import MESEEPG

# ----------------------------------------------------------------------------------------------
# Independent slow reference: plain numpy, one 3x3 Weigel (2015, eq. 15) matrix per state, loops
# over states. Shares no code with qmri_bids.qmri.epg.
# ----------------------------------------------------------------------------------------------


def ref_rotation(alpha: float, phi: float) -> np.ndarray:
    c2, s2 = math.cos(alpha / 2) ** 2, math.sin(alpha / 2) ** 2
    sa, ca = math.sin(alpha), math.cos(alpha)
    e = np.exp(1j * phi)
    return np.array(
        [
            [c2, e**2 * s2, -1j * e * sa],
            [np.conj(e) ** 2 * s2, c2, 1j * np.conj(e) * sa],
            [-0.5j * np.conj(e) * sa, 0.5j * e * sa, ca],
        ]
    )


def ref_rf(omega: np.ndarray, alpha: float, phi: float) -> np.ndarray:
    rot = ref_rotation(alpha, phi)
    out = np.empty_like(omega)
    for k in range(omega.shape[1]):
        out[:, k] = rot @ omega[:, k]
    return out


def ref_relax(omega: np.ndarray, t: float, t1: float, t2: float) -> np.ndarray:
    out = omega.copy()
    e1, e2 = math.exp(-t / t1), math.exp(-t / t2)
    for k in range(omega.shape[1]):
        out[0, k] *= e2
        out[1, k] *= e2
        out[2, k] *= e1
    out[2, 0] += 1 - e1
    return out


def ref_shift(omega: np.ndarray) -> np.ndarray:
    n = omega.shape[1]
    out = np.zeros_like(omega)
    for k in range(1, n):
        out[0, k] = omega[0, k - 1]
    for k in range(n - 1):
        out[1, k] = omega[1, k + 1]
    out[0, 0] = np.conj(out[1, 0])
    out[2] = omega[2]
    return out


def ref_cpmg(t1, t2, esp, n_echoes, refocus, excitation, n_states=None) -> np.ndarray:
    n_states = n_states or 2 * n_echoes + 2
    omega = np.zeros((3, n_states), dtype=complex)
    omega[2, 0] = 1.0
    omega = ref_rf(omega, excitation, 0.0)
    echoes = []
    for _ in range(n_echoes):
        omega = ref_shift(ref_relax(omega, esp / 2, t1, t2))
        omega = ref_rf(omega, refocus, math.pi / 2)
        omega = ref_shift(ref_relax(omega, esp / 2, t1, t2))
        echoes.append(abs(omega[0, 0]))
    return np.array(echoes)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_cpmg_180_is_exponential(dtype, tol):
    model = MESEEPG(echo_spacing=0.008, n_echoes=16)
    t2 = torch.tensor([0.01, 0.045, 0.08, 0.3, 1.5], dtype=dtype)
    m0 = torch.tensor([1.0, 2.0, 0.5, 100.0, 3.0], dtype=dtype)
    params = torch.stack([m0, t2, torch.ones_like(t2)], -1)
    sig = model(params)
    expected = m0[:, None] * torch.exp(-model.echo_times.to(dtype) / t2[:, None])
    assert sig.dtype == dtype and sig.shape == (5, 16)
    torch.testing.assert_close(sig / m0[:, None], expected / m0[:, None], atol=tol, rtol=0)


def test_first_echo_closed_form_and_stimulated_echo_pattern():
    # echo 1 only has the direct spin-echo pathway: sin(beta) sin^2(alpha/2) exp(-ESP/T2)
    esp, t2 = 0.01, 1.0
    for refocus in (120.0, 150.0, 160.0):
        model = MESEEPG(esp, 10, t1=1.0, refocus_deg=refocus)
        sig = model(torch.tensor([1.0, t2, 1.0], dtype=torch.float64)).numpy()
        e1 = math.sin(math.radians(refocus) / 2) ** 2 * math.exp(-esp / t2)
        assert sig[0] == pytest.approx(e1, rel=1e-12)
        # stimulated echoes refocus into echo 2 onwards: second echo above the first
        assert sig[1] > sig[0]
        if refocus >= 150:
            # even/odd alternation of the first echoes: even echoes above both odd neighbours
            for k in (1, 3, 5):
                assert sig[k] > sig[k - 1] and sig[k] > sig[k + 1]
    # at 180 deg there is no alternation: strictly decreasing
    sig180 = MESEEPG(esp, 10)(torch.tensor([1.0, t2, 1.0], dtype=torch.float64))
    assert torch.all(torch.diff(sig180) < 0)


@pytest.mark.parametrize(
    "t1,t2,b1,refocus,exc_scaled",
    [(1.0, 0.08, 0.8, 180.0, True), (0.6, 0.04, 1.1, 150.0, True), (2.0, 0.5, 0.65, 170.0, False)],
)
def test_mese_epg_matches_numpy_reference(t1, t2, b1, refocus, exc_scaled):
    esp, n = 0.009, 12
    model = MESEEPG(esp, n, t1=t1, refocus_deg=refocus, b1_scales_excitation=exc_scaled)
    sig = model(torch.tensor([1.0, t2, b1], dtype=torch.float64)).numpy()
    exc = math.radians(90.0) * (b1 if exc_scaled else 1.0)
    ref = ref_cpmg(t1, t2, esp, n, math.radians(refocus) * b1, exc)
    np.testing.assert_allclose(sig, ref, rtol=1e-12, atol=1e-14)


def test_engine_operators_match_reference_with_arbitrary_phases():
    rng = np.random.default_rng(0)
    n_states = 7
    omega = rng.normal(size=(3, n_states)) + 1j * rng.normal(size=(3, n_states))
    omega[1, 0] = np.conj(omega[0, 0])  # the k=0 symmetry F-_0 = conj(F+_0)
    omega[2] = omega[2].real
    state = epg.EPGState(*(torch.as_tensor(omega[i]) for i in range(3)))
    ref = omega
    for alpha, phi, t in [(0.7, 0.3, 0.005), (2.1, -1.2, 0.011), (math.pi, math.pi / 2, 0.002)]:
        state = epg.rf(state, alpha, phi)
        ref = ref_rf(ref, alpha, phi)
        state = epg.relax(state, *epg.relaxation_factors(t, torch.tensor(0.9, dtype=torch.float64),
                                                torch.tensor(0.07, dtype=torch.float64)))
        ref = ref_relax(ref, t, 0.9, 0.07)
        state = epg.shift(state)
        ref = ref_shift(ref)
        got = np.stack([s.numpy() for s in state])
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    # the F-_0 = conj(F+_0) symmetry is preserved
    assert torch.allclose(state.fm[0], state.fp[0].conj())


def test_real_representation_matches_complex():
    batch = (4,)
    alpha = torch.tensor([0.3, 1.0, 2.0, 3.0], dtype=torch.float64)
    e1, e2 = epg.relaxation_factors(0.01, torch.full(batch, 0.8), torch.full(batch, 0.05))
    cs = epg.equilibrium(batch, 6)
    rs = epg.equilibrium_real(batch, 6)
    for i in range(5):
        cs = epg.shift(epg.relax(epg.rf(cs, alpha * (i + 1) / 3), e1, e2))
        rs = epg.shift_real(epg.relax_real(epg.rf_real(rs, alpha * (i + 1) / 3), e1, e2))
        back = epg.to_complex(rs)
        for a, b in zip(cs, back, strict=True):
            torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
        torch.testing.assert_close(rs.signal(), (1j * cs.signal()).real)


def test_truncation_bound_is_exact_for_cpmg():
    assert epg.exact_n_states(20) == 11
    params = torch.tensor([[1.0, 0.05, 0.75], [1.0, 0.2, 1.2]], dtype=torch.float64)
    default = MESEEPG(0.01, 10, refocus_deg=140.0)  # n_echoes + 1 = 11 orders
    big = MESEEPG(0.01, 10, refocus_deg=140.0, n_states=40)
    assert default.n_states == 11
    torch.testing.assert_close(default(params), big(params), atol=1e-15, rtol=0)
    # too few orders is measurably wrong: the bound is tight, not decorative
    small = MESEEPG(0.01, 10, refocus_deg=140.0, n_states=4)
    assert (small(params) - big(params)).abs().max() > 1e-4


def test_gradients_match_finite_differences():
    model = MESEEPG(0.01, 8, t1=0.9, refocus_deg=160.0)
    p0 = torch.tensor([1.3, 0.07, 0.85], dtype=torch.float64)
    jac = torch.func.jacrev(model.forward)(p0)
    jac_fwd = torch.func.jacfwd(model.forward)(p0)
    torch.testing.assert_close(jac, jac_fwd)
    for i, h in enumerate((1e-6, 1e-7, 1e-6)):
        dp = torch.zeros(3, dtype=torch.float64)
        dp[i] = h
        fd = (model(p0 + dp) - model(p0 - dp)) / (2 * h)
        torch.testing.assert_close(jac[:, i], fd, rtol=1e-6, atol=1e-8)
    # the known B1 argument is differentiable too (it multiplies the estimated B1)
    g = torch.func.grad(lambda b: model(p0, b).sum())(torch.tensor(1.05, dtype=torch.float64))
    b_hi, b_lo = (torch.tensor(1.05 + s * 1e-6, dtype=torch.float64) for s in (1, -1))
    fd = model(p0, b_hi).sum() - model(p0, b_lo).sum()
    assert g.item() == pytest.approx(fd.item() / 2e-6, rel=1e-5)


def test_batch_shapes_and_fixed_b1_variant():
    model = MESEEPG(0.01, 6, estimate_b1=False)
    assert model.parameter_names == ("M0", "T2")
    params = torch.tensor([1.0, 0.05]).expand(2, 3, 2)
    b1 = torch.tensor([[0.7, 0.9, 1.0], [1.1, 1.2, 1.3]])
    sig = model(params, b1)
    assert sig.shape == (2, 3, 6) and sig.dtype == torch.float32
    full = MESEEPG(0.01, 6)
    ref = full(torch.cat([params, b1.unsqueeze(-1)], -1))
    torch.testing.assert_close(sig, ref)


def test_from_echo_times_and_registry():
    model = MESEEPG.from_echo_times([0.01, 0.02, 0.03, 0.04])
    assert model.n_echoes == 4 and model.echo_spacing == pytest.approx(0.01)
    with pytest.raises(ValueError):
        MESEEPG.from_echo_times([0.01, 0.025, 0.03])
    assert MODELS["mese-epg"] is MESEEPG


def test_nlls_recovers_t2_and_b1():
    from qmri_bids.qmri import nlls
    model = MESEEPG(0.01, 16)
    # B1 <= 1 branch: at a nominal 180 deg, B1 and 2 - B1 give the same train (checked below)
    truth = torch.tensor([[100.0, 0.06, 0.8], [50.0, 0.12, 0.6], [80.0, 0.03, 0.93]],
                         dtype=torch.float64)
    mirrored = truth.clone()
    mirrored[:, 2] = 2 - truth[:, 2]
    torch.testing.assert_close(model(mirrored), model(truth))
    data = model(truth)
    fit = nlls.fit_nlls(model, data)
    torch.testing.assert_close(fit.params, truth, rtol=1e-5, atol=1e-6)
