"""The one field generator: statistics, smoothness, physical length scale, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmri_bids.bias.fields import gaussian_random_field, random_bias_field, random_bias_field_torch


@pytest.mark.parametrize("shape", [(64, 64), (40, 48, 24), (100, 30)])
def test_mean_one_and_max_in_range(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        b = random_bias_field(shape, rng, length_scale=(4, 12))
        assert b.shape == shape and b.dtype == np.float32
        assert b.mean() == pytest.approx(1.0, abs=1e-5)
        assert 1.1 - 1e-5 <= b.max() <= 1.3 + 1e-5
        assert b.min() > 0


def test_exact_max_and_mean_inside_mask() -> None:
    mask = np.zeros((64, 64), bool)
    mask[10:50, 20:60] = True
    b = random_bias_field((64, 64), 3, length_scale=10, max_value=1.35, mask=mask)
    assert b[mask].mean() == pytest.approx(1.0, abs=1e-5)
    assert b[mask].max() == pytest.approx(1.35, abs=1e-5)


def test_seeded_and_distinct() -> None:
    a = random_bias_field((32, 32, 16), 7)
    assert np.array_equal(a, random_bias_field((32, 32, 16), np.random.default_rng(7)))
    assert not np.allclose(a, random_bias_field((32, 32, 16), 8))


def _corr_at_lag(g: np.ndarray, lag: int, axis: int) -> float:
    a = np.moveaxis(g, axis, 0)
    return float(np.mean(a[:-lag] * a[lag:]) / np.mean(a * a))


def test_correlation_length_matches_gaussian_covariance() -> None:
    # covariance exp(-r^2 / (2 l^2)): correlation at lag l is exp(-1/2) ~ 0.61; at 2l ~ 0.14
    rng = np.random.default_rng(0)
    ell = 6.0
    c1, c2 = [], []
    for _ in range(20):
        g = gaussian_random_field((128, 128), rng, ell)
        c1.append(_corr_at_lag(g, 6, 0))
        c2.append(_corr_at_lag(g, 12, 1))
    assert np.mean(c1) == pytest.approx(np.exp(-0.5), abs=0.08)
    assert np.mean(c2) == pytest.approx(np.exp(-2.0), abs=0.08)


def test_smoother_than_noise_and_physical_units() -> None:
    b = random_bias_field((64, 64, 64), 2, length_scale=20)
    # neighbouring voxels differ by a tiny fraction of the field's range
    assert np.abs(np.diff(b, axis=0)).max() < 0.1 * (b.max() - b.min())
    # length scale in mm with anisotropic voxels: 1 voxel along z (4 mm) ~ 4 voxels in-plane
    rng = np.random.default_rng(5)
    cz, cx = [], []
    for _ in range(10):
        g = gaussian_random_field((96, 96, 24), rng, 12.0, spacing=(1.0, 1.0, 4.0))
        cz.append(_corr_at_lag(g, 2, 2))
        cx.append(_corr_at_lag(g, 8, 0))
    assert np.mean(cz) == pytest.approx(np.mean(cx), abs=0.08)


def test_torch_batch_variant() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(6, 1, 48, 48)
    m[:, :, 8:40, 4:44] = 1
    b = random_bias_field_torch(6, (48, 48), g, (4.0, 10.0), (1.1, 1.3), m)
    assert b.shape == (6, 1, 48, 48)
    inside = b[m > 0].view(6, -1)
    assert torch.allclose(inside.mean(1), torch.ones(6), atol=1e-5)
    assert bool(((inside.max(1).values >= 1.1 - 1e-5) & (inside.max(1).values <= 1.3 + 1e-5)).all())
    again = random_bias_field_torch(6, (48, 48), torch.Generator().manual_seed(0), (4.0, 10.0),
                                    (1.1, 1.3), m)
    assert torch.equal(b, again)
