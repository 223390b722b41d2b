"""Cramér–Rao bound: analytic closed form, finite-difference Fisher information, complex signals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.crb import crb, fisher_information
from qmri_bids.qmri.models import IRT1Model, MESEMonoModel, VFAModel

F64 = torch.float64


def test_mono_exponential_two_echoes_closed_form():
    # s_i = M0 e_i, e_i = exp(−TE_i/T2). J = [[e1, a1], [e2, a2]], a_i = M0 TE_i e_i / T2², square,
    # so F⁻¹ = σ² J⁻¹J⁻ᵀ with det J = M0 e1 e2 (TE2 − TE1)/T2²:
    #   var(T2) = σ² T2⁴ (1/e1² + 1/e2²) / (M0² ΔTE²),  var(M0) = σ² (a1² + a2²) / det².
    te1, te2, m0, t2, sigma = 0.01, 0.05, 200.0, 0.04, 1.5
    e1, e2 = math.exp(-te1 / t2), math.exp(-te2 / t2)
    var_t2 = sigma**2 * t2**4 * (1 / e1**2 + 1 / e2**2) / (m0**2 * (te2 - te1) ** 2)
    a1, a2 = m0 * te1 * e1 / t2**2, m0 * te2 * e2 / t2**2
    det = m0 * e1 * e2 * (te2 - te1) / t2**2
    var_m0 = sigma**2 * (a1**2 + a2**2) / det**2
    got = crb(MESEMonoModel([te1, te2]), torch.tensor([m0, t2], dtype=F64), sigma)
    assert got[1].item() == pytest.approx(var_t2, rel=1e-10)
    assert got[0].item() == pytest.approx(var_m0, rel=1e-10)


def _fd_fisher(model, p, sigma, b1=None, h=1e-6):
    p = np.asarray(p, float)
    cols = []
    for i in range(len(p)):
        d = np.zeros_like(p)
        d[i] = h * max(abs(p[i]), 1e-3)
        plus = model(torch.tensor(p + d, dtype=F64), b1).numpy()
        minus = model(torch.tensor(p - d, dtype=F64), b1).numpy()
        cols.append((plus - minus) / (2 * d[i]))
    j = np.stack(cols, axis=-1)
    return j.T @ j / sigma**2


@pytest.mark.parametrize(
    "model,p,b1",
    [
        (IRT1Model([0.1, 0.4, 0.9, 1.5, 3.0]), [1.0, -1.95, 0.85], None),
        (VFAModel([2.0, 6.0, 14.0, 20.0], 0.015), [800.0, 1.3], torch.tensor(1.1, dtype=F64)),
    ],
)
def test_crb_matches_finite_difference_jacobian(model, p, b1):
    sigma = 0.01
    fim_fd = _fd_fisher(model, p, sigma, b1)
    fim = fisher_information(model, torch.tensor(p, dtype=F64), sigma, b1).numpy()
    np.testing.assert_allclose(fim, fim_fd, rtol=1e-6)
    np.testing.assert_allclose(crb(model, torch.tensor(p, dtype=F64), sigma, b1).numpy(),
                               np.diag(np.linalg.inv(fim_fd)), rtol=1e-5)


class _ComplexDecay(SignalModel):
    """M0·e^{iφ}·exp(−TE/T2): complex test model (phase is a nuisance parameter)."""

    name = "test-complex"
    is_complex = True
    parameters = (ParameterSpec("M0", "", 0, 1e9, True), ParameterSpec("phase", "rad", -4, 4, True),
                  ParameterSpec("T2", "s", 1e-3, 5))

    def __init__(self, te):
        self.te = torch.as_tensor(te, dtype=F64)

    def forward(self, params, b1=None):
        mag = params[..., 0:1] * torch.exp(-self.te.to(params) / params[..., 2:3])
        return torch.polar(mag, params[..., 1:2].expand_as(mag))


def test_complex_signal_uses_real_and_imaginary_parts():
    # The phase is orthogonal to (M0, T2): their CRBs equal those of the real magnitude model,
    # and var(φ) = σ² / Σ|s_i|².
    te = [0.01, 0.03, 0.06]
    p = torch.tensor([[100.0, 0.7, 0.05]], dtype=F64)
    got = crb(_ComplexDecay(te), p, 2.0)
    real = crb(MESEMonoModel(te), p[:, [0, 2]], 2.0)
    torch.testing.assert_close(got[:, [0, 2]], real)
    s = 100 * np.exp(-np.array(te) / 0.05)
    assert got[0, 1].item() == pytest.approx(4.0 / (s**2).sum(), rel=1e-10)


def test_batch_shapes_dtypes_sigma_map_and_singular():
    model = MESEMonoModel([0.01, 0.03, 0.06])
    p = torch.tensor([100.0, 0.05], dtype=F64).expand(4, 5, 2).clone()
    sigma = torch.linspace(1, 2, 5, dtype=F64).expand(4, 5)
    c64 = crb(model, p, sigma)
    c32 = crb(model, p.float(), sigma.float())
    assert c64.shape == (4, 5, 2) and c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), c64, rtol=1e-3, atol=0)
    # variance scales with σ²
    torch.testing.assert_close(c64[:, -1] / c64[:, 0], torch.full((4, 2), 4.0, dtype=F64))
    # One echo cannot determine two parameters: the bound is infinite, not garbage.
    assert torch.isinf(crb(MESEMonoModel([0.02]), p[0, :1], 1.0)).any()
