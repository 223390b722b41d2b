"""Batched bounded Levenberg–Marquardt: recovery, agreement with scipy, bounds, masks, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from qmri_bids.qmri.models import IRT1Model, IRT1TRModel, MEGREModel, MESEMonoModel, VFAModel
from qmri_bids.qmri.nlls import fit_nlls

F64 = torch.float64
TI = [0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 1.8, 2.7]


def _grid(n, **ranges):
    g = torch.Generator().manual_seed(1)
    return torch.stack([lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
                        for lo, hi in ranges.values()], -1)


@pytest.mark.parametrize(
    "model,truth,b1",
    [
        (VFAModel([3.0, 8.0, 15.0, 25.0], 0.015), _grid(200, m0=(500, 2000), t1=(0.3, 3.0)), True),
        (IRT1Model(TI), torch.cat([_grid(200, a=(50, 150), b=(-1.95, -1.6), t1=(0.1, 2.5))], 0),
         False),
        (IRT1TRModel(TI, 4.0), _grid(200, m0=(50, 150), t1=(0.1, 2.5)), False),
        (MESEMonoModel([0.01 * k for k in range(1, 11)]), _grid(200, m0=(10, 20), t2=(0.02, 0.2)),
         False),
        (MEGREModel([0.004 * k for k in range(1, 9)]), _grid(200, s0=(10, 20), r2=(5.0, 80.0)),
         False),
    ],
    ids=["vfa-b1", "irt1", "irt1-tr", "mese", "megre"],
)
def test_noise_free_recovery(model, truth, b1):
    if model.name == "irt1":
        truth[:, 1] *= truth[:, 0]  # b = −(1.6…1.95)·a
    kappa = torch.linspace(0.8, 1.2, truth.shape[0], dtype=F64) if b1 else None
    fit = fit_nlls(model, model(truth, kappa), b1=kappa)
    assert fit.converged.all()
    torch.testing.assert_close(fit.params, truth, rtol=1e-6, atol=0)


def test_ir_polarity_restoration_from_magnitude():
    # Nulls throughout the TI range: the grid start must pick the right polarity for each.
    model = IRT1Model(TI)
    t1 = torch.tensor([0.08, 0.3, 0.7, 1.5, 2.5, 4.0], dtype=F64)
    truth = torch.stack([torch.full_like(t1, 100), torch.full_like(t1, -190), t1], -1)
    init = model.initial_guess(model(truth))
    torch.testing.assert_close(init[:, 2], t1, rtol=0.03, atol=0)  # grid spacing ~2.3 %
    fit = fit_nlls(model, model(truth))
    torch.testing.assert_close(fit.params, truth, rtol=1e-6, atol=0)


@pytest.mark.parametrize("which", ["irt1", "vfa"])
def test_agrees_with_scipy_least_squares(which):
    rng = np.random.default_rng(3)
    if which == "irt1":
        model = IRT1Model(TI)
        truth = torch.tensor([[100.0, -190.0, t] for t in (0.2, 0.6, 1.1, 1.9)], dtype=F64)
    else:
        model = VFAModel([3.0, 8.0, 15.0, 25.0], 0.015)
        truth = torch.tensor([[1000.0, t] for t in (0.4, 0.9, 1.5, 2.5)], dtype=F64)
    clean = model(truth)
    noisy = clean + torch.as_tensor(rng.normal(0, 0.01 * clean.max().item(), clean.shape))
    ours = fit_nlls(model, noisy)
    lo, hi = (b.numpy() for b in model.bounds())
    for v in range(truth.shape[0]):
        def resid(q, v=v):
            return (model(torch.as_tensor(q)) - noisy[v]).numpy()

        ref = least_squares(resid, truth[v].numpy(), bounds=(lo, hi), x_scale="jac",
                            xtol=1e-14, ftol=1e-14, gtol=1e-14)
        np.testing.assert_allclose(ours.params[v].numpy(), ref.x, rtol=1e-5)
        assert ours.residual_norm[v].item() == pytest.approx(np.sqrt(2 * ref.cost), rel=1e-8)


def test_bounds_mask_nan_and_float32():
    model = MESEMonoModel([0.01, 0.02, 0.04])
    data = torch.tensor([[10.0, 8.0, 5.0],       # ordinary decay
                         [10.0, 10.0, 10.0],     # no decay: T2 → upper bound
                         [10.0, float("nan"), 3.0],
                         [10.0, 7.0, 4.0]], dtype=F64)
    mask = torch.tensor([True, True, True, False])
    fit = fit_nlls(model, data, mask=mask)
    _, hi = model.bounds()
    assert torch.isfinite(fit.params[:2]).all() and fit.converged[:2].all()
    assert fit.params[1, 1].item() == pytest.approx(hi[1].item())
    assert torch.isnan(fit.params[2:]).all() and not fit.converged[2:].any()
    fit32 = fit_nlls(model, data.float(), mask=mask)
    assert fit32.params.dtype == torch.float32
    torch.testing.assert_close(fit32.params[0].double(), fit.params[0], rtol=1e-4, atol=0)


def test_explicit_init_and_batch_shape():
    model = VFAModel([3.0, 20.0], 0.015)
    truth = torch.tensor([1000.0, 1.0], dtype=F64).expand(2, 3, 2)
    fit = fit_nlls(model, model(truth), init=torch.tensor([500.0, 0.5], dtype=F64).expand(2, 3, 2))
    assert fit.params.shape == (2, 3, 2) and fit.converged.shape == (2, 3)
    torch.testing.assert_close(fit.params, truth)


def test_complex_data_fit():
    from qmri_bids.qmri.base import ParameterSpec, SignalModel

    class ComplexDecay(SignalModel):
        name = "test-complex"
        is_complex = True
        parameters = (ParameterSpec("M0", "", 0, 1e9, True),
                      ParameterSpec("phase", "rad", -4, 4, True), ParameterSpec("T2", "s", 1e-3, 5))
        te = torch.tensor([0.01, 0.03, 0.06, 0.1], dtype=F64)

        def forward(self, params, b1=None):
            mag = params[..., 0:1] * torch.exp(-self.te.to(params) / params[..., 2:3])
            return torch.polar(mag, params[..., 1:2].expand_as(mag))

    model = ComplexDecay()
    truth = torch.tensor([[100.0, 0.7, 0.05], [50.0, -2.0, 0.12]], dtype=F64)
    init = truth * torch.tensor([0.8, 0.7, 1.5], dtype=F64)  # a local method: start in the basin
    fit = fit_nlls(model, model(truth), init=init)
    assert fit.params.dtype == F64 and fit.converged.all()
    torch.testing.assert_close(fit.params, truth, rtol=1e-6, atol=1e-8)
