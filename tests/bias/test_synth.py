"""The MR-like training content: label statistics, no smooth ramps within a class, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmri_bids.bias.synth import (
    SynthConfig,
    SynthPool,
    random_label_volume,
    render_volume,
    synth_slices,
    volume_slices,
)

SMALL = SynthConfig(size=32)


def test_reproducible_from_seed_and_distinct() -> None:
    a = synth_slices(2, 7, SMALL, per_axis=2)
    b = synth_slices(2, 7, SMALL, per_axis=2)
    c = synth_slices(2, 8, SMALL, per_axis=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_label_statistics() -> None:
    rng = np.random.default_rng(0)
    counts, fractions = [], []
    for _ in range(12):
        labels, n = random_label_volume(rng, SMALL)
        assert labels.dtype == np.int16 and labels.shape == (32, 32, 32)
        assert SMALL.n_classes[0] <= n <= SMALL.n_classes[1]
        present = set(np.unique(labels).tolist())
        assert present <= set(range(n + 1))  # 0 = air, 1..n tissue
        counts.append(len(present - {0}))
        fractions.append(float((labels > 0).mean()))
    # several classes actually present, objects neither empty nor always filling the view
    assert np.median(counts) >= 3
    assert min(fractions) > 0.01 and np.median(fractions) < 0.9


def test_no_smooth_ramp_within_a_class() -> None:
    """A ramp is what a bias field looks like, so the content must never contain one: without
    texture, blur, thick slices and noise every class is exactly constant, and the texture is
    white at the scale of a field (no correlation beyond a few voxels)."""
    flat = SynthConfig(size=48, blur_sigma=(0.0, 0.0), p_thick_slices=0.0, snr=(1e12, 1e12),
                       texture_sd=(0.0, 0.0))
    rng = np.random.default_rng(3)
    for _ in range(3):
        labels, n = random_label_volume(rng, flat)
        img = render_volume(labels, n, rng, flat)
        for k in np.unique(labels[labels > 0]):
            x = img[labels == k]
            assert x.std() <= 1e-5 * x.mean(), (k, x.std() / x.mean())
    textured = SynthConfig(size=48, blur_sigma=(0.0, 0.0), p_thick_slices=0.0, snr=(1e12, 1e12),
                           texture_sd=(0.05, 0.06))
    lags = []
    for _ in range(3):
        labels, n = random_label_volume(rng, textured)
        img = render_volume(labels, n, rng, textured)
        for k in np.unique(labels[labels > 0]):
            same = (labels[:-4] == k) & (labels[4:] == k)  # pairs 4 voxels apart, both in k
            if same.sum() < 2000:
                continue
            a, b = img[:-4][same], img[4:][same]
            lags.append(float(np.corrcoef(a, b)[0, 1]))
    assert lags and max(lags) < 0.15, lags


def test_render_levels_partial_volume_and_noise() -> None:
    rng = np.random.default_rng(5)
    labels, n = random_label_volume(rng, SMALL)
    img = render_volume(labels, n, rng, SMALL)
    assert img.dtype == np.float32 and img.shape == labels.shape
    assert (img >= 0).all() and np.isfinite(img).all()
    # air is dark (Rician noise only), the object is not
    assert np.median(img[labels == 0]) < 0.5 * np.median(img[labels > 0])


def test_slices_have_object_and_pool_batches() -> None:
    rng = np.random.default_rng(1)
    labels, n = random_label_volume(rng, SMALL)
    img = render_volume(labels, n, rng, SMALL)
    ims, ms = volume_slices(img, labels, rng, per_axis=3, min_foreground=0.15)
    assert ims and len(ims) == len(ms)
    assert all(m.mean() >= 0.15 for m in ms)
    pool = SynthPool.build(3, seed=2, cfg=SMALL, per_axis=2)
    g = torch.Generator().manual_seed(0)
    v, m = pool.batch(6, g)
    assert v.shape == m.shape == (6, 1, 32, 32) and m.dtype == torch.bool
    assert (v >= 0).all()
    g2 = torch.Generator().manual_seed(0)
    v2, m2 = pool.batch(6, g2)
    assert torch.equal(v, v2) and torch.equal(m, m2)


@pytest.mark.parametrize("bad", [{"content": "photos"}, {"content": "legacy", "w_explicit": 1.0}])
def test_train_config_rejects_inconsistent_recipes(bad: dict) -> None:
    from qmri_bids.bias.train import TrainConfig

    with pytest.raises(ValueError):
        TrainConfig(**bad)
