"""CrbEstimator, priors, the CRB loss and map prediction (qmri_bids.qmri.estimator / predict)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.crb import crb
from qmri_bids.qmri.estimator import (
    CrbEstimator,
    assemble_params,
    default_config,
    scale_least_squares,
    split_params,
    unit_crb,
    unit_signal,
)
from qmri_bids.qmri.models import IRT1Model, MEGREModel, MESEMonoModel, VFAModel
from qmri_bids.qmri.predict import (
    crb_sd_maps,
    estimate_maps,
    noise_sigma_from_background,
    noise_sigma_from_residuals,
)
from qmri_bids.qmri.training import crb_loss

VFA = VFAModel([3.0, 20.0], 0.015)
IRT1 = IRT1Model([0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4, 1.7])
MESE = MESEMonoModel([0.0129 * k for k in range(1, 11)])


class LinearModel(SignalModel):
    """s = A θ: least squares is unbiased and efficient, its covariance is exactly the CRB."""

    name = "toy-linear"
    parameters = (ParameterSpec("x", "", -10, 10), ParameterSpec("y", "", -10, 10))

    def __init__(self) -> None:
        self.a = torch.tensor([[1.0, 0.5], [0.2, 1.0], [1.0, -1.0], [0.3, 0.1], [2.0, 0.7]],
                              dtype=torch.float64)

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        return params @ self.a.T


def test_crb_loss_is_one_for_an_efficient_estimator() -> None:
    # Each term (θ̂_p − θ_p)²/CRB_p is χ²₁ (mean 1, variance 2). The mean over P correlated terms
    # has variance ≤ 2, so the mean over n samples has sd ≤ √(2/n) = 0.0063 for n = 50 000: a
    # tolerance of 0.04 is > 6 sd (false-failure probability < 1e-9).
    model = LinearModel()
    gen = torch.Generator().manual_seed(0)
    n, sigma = 50_000, 0.3
    theta = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 4 - 2
    y = model(theta) + sigma * torch.randn(n, 5, generator=gen, dtype=torch.float64)
    a = model.a
    est = torch.linalg.solve(a.T @ a, (y @ a).T).T  # least squares
    bound = crb(model, theta, sigma)
    assert torch.allclose(bound[0], torch.diagonal(torch.linalg.inv(a.T @ a)) * sigma**2)
    loss = crb_loss(est, theta, bound)
    assert abs(float(loss) - 1.0) < 0.04
    # a biased estimator (shrinkage) must score differently: loss is not trivially 1
    assert float(crb_loss(est * 0.5, theta, bound)) > 2.0
    # infinite CRB entries are ignored, not NaN
    bad = bound.clone()
    bad[:10] = float("inf")
    assert math.isfinite(float(crb_loss(est, theta, bad)))


@pytest.mark.parametrize("model", [VFA, MESE, MEGREModel([0.005 * k for k in range(1, 7)])])
def test_unit_crb_matches_core_crb(model: SignalModel) -> None:
    prior = model.default_prior()
    shape, b1 = prior.sample(64, torch.Generator().manual_seed(1))
    c_unit, sig = unit_crb(model, prior, shape, b1)
    full = assemble_params(model, prior, shape, torch.full((64,), 7.0, dtype=torch.float64))
    ref = crb(model, full, 0.5, b1)
    # CRB scales as σ²/M0²
    assert torch.allclose(c_unit[:, 0] * (0.5 / 7.0) ** 2, ref[:, 1], rtol=1e-6)
    assert torch.allclose(sig * 7.0, model(full, b1), rtol=1e-10)


def test_irt1_ratio_crb_is_delta_method() -> None:
    prior = IRT1.default_prior()
    shape, _ = prior.sample(16, torch.Generator().manual_seed(2))
    c_unit, _ = unit_crb(IRT1, prior, shape)
    full = assemble_params(IRT1, prior, shape, torch.ones(16, dtype=torch.float64))
    from qmri_bids.qmri.crb import fisher_information

    cov = torch.linalg.inv(fisher_information(IRT1, full, 1.0))
    a, b = full[:, 0], full[:, 1]
    g = torch.stack([-b / a**2, 1 / a, torch.zeros_like(a)], -1)  # ∂(b/a)/∂(a, b, T1)
    var_r = (g[:, None, :] @ cov @ g[:, :, None]).squeeze()
    assert torch.allclose(c_unit[:, 0], var_r, rtol=1e-5)
    assert torch.allclose(c_unit[:, 1], torch.diagonal(cov, dim1=-2, dim2=-1)[:, 2], rtol=1e-5)


def test_priors_are_documented_and_sampled_inside_bounds() -> None:
    for model in (VFA, IRT1, MESE, MEGREModel([0.01, 0.02])):
        prior = model.default_prior()
        assert prior.sources
        shape, _ = prior.sample(1000, torch.Generator().manual_seed(3))
        for i, r in enumerate(prior.ranges):
            assert float(shape[:, i].min()) >= r.lower and float(shape[:, i].max()) <= r.upper
    assert VFA.default_prior().ranges[0].lower == 0.2 and VFA.default_prior().b1 == (0.7, 1.3)
    assert MESE.default_prior().ranges[0].upper == 0.5


def test_split_inverts_assemble_and_scale_least_squares() -> None:
    prior = IRT1.default_prior()
    shape, _ = prior.sample(32, torch.Generator().manual_seed(4))
    m0 = torch.linspace(10, 1000, 32, dtype=torch.float64)
    full = assemble_params(IRT1, prior, shape, m0)
    s2, m2 = split_params(IRT1, prior, full)
    assert torch.allclose(s2, shape) and torch.allclose(m2, m0)
    s1 = unit_signal(IRT1, prior, shape, None)
    assert torch.allclose(scale_least_squares(s1, IRT1(full)), m0)


def _net(model: SignalModel) -> CrbEstimator:
    torch.manual_seed(0)
    net = CrbEstimator(default_config(model), model)
    net.eval()
    return net


def test_network_is_small_bounded_and_scale_invariant() -> None:
    for model in (VFA, IRT1, MESE):
        net = _net(model)
        assert net.n_weights() < 300_000
        prior = net.prior
        shape, b1 = prior.sample(256, torch.Generator().manual_seed(5))
        y = unit_signal(model, prior, shape, b1).float()
        with torch.no_grad():
            out = net(y, None if b1 is None else b1.float())
            out2 = net(123.0 * y, None if b1 is None else b1.float())
        assert torch.allclose(out, out2, rtol=1e-4)
        for i, r in enumerate(prior.ranges):
            width = (math.log(r.upper / r.lower) if r.log else r.upper - r.lower) * 0.1
            lo = r.lower * math.exp(-width) if r.log else r.lower - width
            hi = r.upper * math.exp(width) if r.log else r.upper + width
            assert float(out[:, i].min()) >= lo - 1e-6 and float(out[:, i].max()) <= hi + 1e-6
    # a missing B1 map means B1 = 1
    net = _net(VFA)
    y = torch.rand(8, 2)
    with torch.no_grad():
        assert torch.allclose(net(y), net(y, torch.ones(8)))


def test_complex_input_is_phase_and_scale_invariant() -> None:
    from qmri_bids.qmri.models.mrf import MRFModel, default_mrf_schedule

    model = MRFModel(default_mrf_schedule(n_timepoints=40, n_lobes=2), n_states=8)
    prior = model.default_prior()
    shape, _ = prior.sample(300, torch.Generator().manual_seed(6))
    sig = unit_signal(model, prior, shape, None)
    net = _net(model)
    net.set_svd_basis(sig)
    rot = torch.polar(torch.full((300, 1), 5.0, dtype=torch.float64),
                      torch.rand(300, 1, dtype=torch.float64) * 6.28)
    with torch.no_grad():
        a = net(sig.to(torch.complex64))
        b = net((sig * rot).to(torch.complex64))
        full = net.estimate((sig * rot).to(torch.complex64)[:4])
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    assert full.shape == (4, model.n_parameters)
    # M0 from the tabulated SVD coefficients (no per-voxel EPG run) is accurate to < 1 %
    assert net.has_m0_table
    net.set_m0_table()
    m0 = net.m0_from_table(sig * rot, net.to_unit(shape))
    assert torch.allclose(m0, rot.squeeze(-1), rtol=1e-2)


def _vfa_volume(n: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(7)
    prior = VFA.default_prior()
    shape, b1 = prior.sample(n, gen)
    full = assemble_params(VFA, prior, shape, torch.full((n,), 1000.0, dtype=torch.float64))
    data = VFA(full, b1).numpy().reshape(10, n // 10, 2)
    return data, b1.numpy().reshape(10, n // 10), full.numpy().reshape(10, n // 10, 2)


def test_estimate_maps_chunking_nan_and_mask() -> None:
    net = _net(VFA)
    data, b1, _ = _vfa_volume()
    data[0, 0, 1] = np.nan
    mask = np.ones(data.shape[:-1], bool)
    mask[1, :5] = False
    full = estimate_maps(net, data, b1=b1, mask=mask)
    small = estimate_maps(net, torch.as_tensor(data), b1=b1, mask=mask, chunk=7)
    assert set(full) == {"M0", "T1"}
    for k in full:
        np.testing.assert_allclose(full[k], small[k], rtol=1e-6, equal_nan=True)
        assert np.isnan(full[k][0, 0]) and np.isnan(full[k][1, :5]).all()
        assert np.isfinite(full[k][2]).all()
    with pytest.raises(BadDataError):
        estimate_maps(net, data[..., :1])


def test_estimate_maps_m0_is_least_squares_given_t1() -> None:
    net = _net(MESE)
    prior = net.prior
    shape, _ = prior.sample(50, torch.Generator().manual_seed(8))
    data = MESE(assemble_params(MESE, prior, shape, torch.full((50,), 300.0, dtype=torch.float64)))
    maps = estimate_maps(net, data.numpy())
    t2 = torch.as_tensor(maps["T2"])
    s1 = MESE(torch.stack([torch.ones(50, dtype=torch.float64), t2], -1))
    np.testing.assert_allclose(maps["M0"], scale_least_squares(s1, data).numpy(), rtol=1e-8)
    # the network estimates the model's parameters; MEGRE's T2* is the model's derived map
    megre = MEGREModel([0.005, 0.01, 0.02])
    values = estimate_maps(_net(megre), np.full((3, 3), 100.0))
    assert set(values) == {"S0", "R2star"}


def test_noise_from_background_and_residuals() -> None:
    rng = np.random.default_rng(9)
    sigma = 4.0
    img = np.abs(rng.normal(0, sigma, (40, 40, 10, 2)) + 1j * rng.normal(0, sigma, (40, 40, 10, 2)))
    mask = np.zeros((40, 40, 10), bool)
    mask[10:30, 10:30] = True
    img[mask] += 500.0
    img[:2] = 0.0  # zero-filled border is ignored
    est = noise_sigma_from_background(img, mask)
    assert est is not None and abs(est / sigma - 1) < 0.05
    assert noise_sigma_from_background(img, np.ones_like(mask)) is None
    # residuals: Gaussian noise on a MESE decay, true parameters
    prior = MESE.default_prior()
    shape, _ = prior.sample(4000, torch.Generator().manual_seed(10))
    full = assemble_params(MESE, prior, shape, torch.full((4000,), 1000.0, dtype=torch.float64))
    y = MESE(full) + 2.0 * torch.randn(4000, 10, dtype=torch.float64)
    assert abs(noise_sigma_from_residuals(MESE, y, full) / (2.0 * math.sqrt(10 / 8)) - 1) < 0.05


def test_crb_sd_maps_match_core() -> None:
    _, b1, full = _vfa_volume(100)
    full[0, 0] = np.nan
    sd = crb_sd_maps(VFA, full, 3.0, b1=b1)
    ref = crb(VFA, torch.as_tensor(full[1]), 3.0, torch.as_tensor(b1[1])).sqrt().numpy()
    np.testing.assert_allclose(sd["T1"][1], ref[:, 1], rtol=1e-8)
    assert np.isnan(sd["T1"][0, 0]) and np.isnan(sd["M0"][0, 0])


def test_crb_sd_maps_long_signal_uses_accurate_finite_differences() -> None:
    from qmri_bids.qmri.crb import inverse_diagonal, model_jacobian
    from qmri_bids.qmri.models.mrf import MRFModel, default_mrf_schedule

    model = MRFModel(default_mrf_schedule(n_timepoints=70, n_lobes=2), n_states=6)
    p = torch.tensor([[300.0, -100.0, 1.0, 0.08, 1.0], [50.0, 0.0, 0.4, 0.03, 0.9]],
                     dtype=torch.float64)
    sd = crb_sd_maps(model, p, 2.0)
    _, j = model_jacobian(model, p, mode="fwd")  # exact AD reference
    ref = (inverse_diagonal(j.transpose(-1, -2) @ j) * 4.0).sqrt().numpy()
    for i, n in enumerate(model.parameter_names):
        np.testing.assert_allclose(sd[n], ref[:, i], rtol=1e-4)


def test_crb_sd_maps_equal_in_any_chunking() -> None:
    """The CRB-SD maps of a long-signal model (MRF with known B1: the exact tangent Jacobian)
    do not depend on the voxel batches they are computed in, and match the AD reference."""
    from qmri_bids.qmri.crb import inverse_diagonal, model_jacobian
    from qmri_bids.qmri.models.mrf import MRFModel, default_mrf_schedule

    model = MRFModel(default_mrf_schedule(n_timepoints=80, n_lobes=2), n_states=8,
                     estimate_b1=False)
    gen = torch.Generator().manual_seed(3)
    n = 2500
    t1 = 0.2 + 2.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    t2 = t1 * (0.05 + 0.4 * torch.rand(n, generator=gen, dtype=torch.float64))
    p = torch.stack([torch.full((n,), 500.0, dtype=torch.float64),
                     torch.full((n,), 100.0, dtype=torch.float64), t1, t2], -1)
    b1 = 0.7 + 0.6 * torch.rand(n, generator=gen, dtype=torch.float64)
    one = crb_sd_maps(model, p, 2.0, b1=b1, chunk=65536)
    batched = crb_sd_maps(model, p, 2.0, b1=b1, chunk=1024)  # three batches
    for name in model.parameter_names:
        np.testing.assert_array_equal(one[name], batched[name])
    _, j = model_jacobian(model, p[:5], b1[:5], mode="fwd")
    ref = (inverse_diagonal(j.transpose(-1, -2) @ j) * 4.0).sqrt().numpy()
    np.testing.assert_allclose(one["T2"][:5], ref[:, 3], rtol=1e-8)
