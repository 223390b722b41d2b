"""Inference on user-shaped inputs with the shipped model: geometry, invariances, bad inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from qmri_bids.bias.fields import random_bias_field
from qmri_bids.bias.inference import correct_bias_cnn
from qmri_bids.bias.synth import SynthConfig, synth_slices
from qmri_bids.bias.weights import BiasModel, load_model
from qmri_bids.device import select_device
from qmri_bids.errors import BadDataError, UsageError


@pytest.fixture(scope="module")
def model() -> BiasModel:
    return load_model()


def phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Ellipsoid 'head' with a few spheres of other intensities, zero air outside, some noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    img = np.where((grid ** 2).sum(0) < 0.8, 1.0, 0.0)
    for _ in range(6):
        c = rng.uniform(-0.4, 0.4, 3)
        r = rng.uniform(0.1, 0.25)
        img[((grid - c[:, None, None, None]) ** 2).sum(0) < r * r] = rng.uniform(0.3, 1.6)
    return (img * 100 + rng.normal(0, 1, shape).clip(0)).astype(np.float32)


def _geo_mean(x: np.ndarray, m: np.ndarray) -> float:
    return float(np.exp(np.log(x[m]).mean()))


def test_scale_invariance(model: BiasModel) -> None:
    img = phantom((48, 40, 24))
    _, f1 = correct_bias_cnn(img, (1.0, 1.0, 3.0), model)
    for c in (1e-3, 7.5, 1e4):
        _, fc = correct_bias_cnn(img * c, (1.0, 1.0, 3.0), model)
        np.testing.assert_allclose(fc, f1, rtol=1e-4, atol=1e-5)


def test_anisotropic_3d_field_properties_and_determinism(model: BiasModel) -> None:
    img = phantom((60, 56, 12), seed=1)
    b = random_bias_field(img.shape, 3, length_scale=60.0, max_value=1.3, spacing=(1, 1, 5))
    corrected, field = correct_bias_cnn(img * b, (1.0, 1.0, 5.0), model)
    assert corrected.shape == field.shape == img.shape
    assert field.dtype == np.float32 and np.isfinite(field).all()
    assert field.min() >= 0.5 and field.max() <= 2.0
    m = img > 50
    assert _geo_mean(field, m) == pytest.approx(1.0, abs=0.02)
    # smooth inside the object (outside, the basis only extrapolates): a few % per voxel at most
    # (1 mm in-plane, 5 mm between slices; bias_cnn_v1 measures 0.03 in-plane, the true field
    # ~0.01) while the image itself jumps by >30 % at its edges
    for axis, limit in ((0, 0.05), (1, 0.05), (2, 0.1)):
        both = m[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))] & \
            m[tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))]
        assert np.abs(np.diff(field, axis=axis))[both].max() < limit
    np.testing.assert_allclose(corrected * field, img * b, rtol=1e-5)
    _, again = correct_bias_cnn(img * b, (1.0, 1.0, 5.0), model)
    assert np.array_equal(field, again)


def test_orientation_equivariance(model: BiasModel) -> None:
    img = phantom((48, 40, 32), seed=2)
    sp = (1.0, 1.2, 1.5)
    _, f = correct_bias_cnn(img, sp, model)
    _, ft = correct_bias_cnn(img.transpose(2, 0, 1), (sp[2], sp[0], sp[1]), model)
    # 2 of the 8 in-plane rotations/flips are averaged (FusionConfig.n_transforms), so a
    # permutation of the axes changes the field only approximately (bias_cnn_v2: max 3.4e-3,
    # on a field that varies by ~20 %)
    np.testing.assert_allclose(ft.transpose(1, 2, 0), f, atol=5e-3)


def test_2d_and_single_slice_3d_agree(model: BiasModel) -> None:
    img = phantom((64, 64, 3), seed=3)[:, :, 1]
    c2, f2 = correct_bias_cnn(img, (2.0, 2.0), model)
    assert c2.shape == f2.shape == (64, 64)
    _c3, f3 = correct_bias_cnn(img[:, :, None], (2.0, 2.0, 5.0), model)
    assert f3.shape == (64, 64, 1)
    np.testing.assert_allclose(f3[:, :, 0], f2, atol=1e-5)
    _c4, f4 = correct_bias_cnn(img[:, :, None, None], (2.0, 2.0, 5.0, 1.0), model)
    assert f4.shape == (64, 64, 1, 1)


def test_consistency_on_held_out_generated_image(model: BiasModel) -> None:
    """F(v b)/F(v) ~ b on MR-like images never seen in training (a held-out seed of the
    training content generator), through the full 2-D pipeline (resampling, fusion)."""
    images, masks = synth_slices(2, 424242, SynthConfig(size=96), per_axis=1)
    rng = np.random.default_rng(424242)
    errs, ident = [], []
    for v, m in zip(images, masks, strict=True):
        m = m.astype(bool)
        b = random_bias_field(v.shape, rng, length_scale=(25.0, 40.0), max_value=(1.15, 1.3),
                              mask=m)
        _, fv = correct_bias_cnn(v, (1.0, 1.0), model, mask=m)
        _, fg = correct_bias_cnn(v * b, (1.0, 1.0), model, mask=m)
        ratio = fg / fv
        ratio /= _geo_mean(ratio, m)
        target = b / _geo_mean(b, m)
        errs.append(np.abs(ratio - target)[m].mean())
        ident.append(np.abs(1 - target)[m].mean())
    assert np.mean(errs) < CONSISTENCY_FRACTION * np.mean(ident), (errs, ident)


#: error relative to "no correction": bias_cnn_v2 measures 0.20 here (its interim export at
#: 4000 steps 0.36); 0.6 leaves margin for a retrained model
CONSISTENCY_FRACTION = 0.6


def test_nan_inf_are_masked_and_logged(model: BiasModel, caplog: pytest.LogCaptureFixture) -> None:
    img = phantom((40, 40, 8), seed=4)
    bad = img.copy()
    bad[5, 5, 2] = np.nan
    bad[20, 20, 4] = np.inf
    with caplog.at_level(logging.WARNING, logger="qmri_bids.bias"):
        corrected, field = correct_bias_cnn(bad, (1, 1, 3), model)
    assert "NaN/Inf" in caplog.text
    assert np.isfinite(field).all()
    assert np.isnan(corrected[5, 5, 2]) and np.isnan(corrected[20, 20, 4])
    assert np.isfinite(np.delete(corrected.ravel(), [np.ravel_multi_index(i, img.shape)
                                                     for i in ((5, 5, 2), (20, 20, 4))])).all()
    with pytest.raises(BadDataError, match="non-finite"):
        correct_bias_cnn(np.full((40, 40, 8), np.nan, np.float32), (1, 1, 3), model)


def test_negative_values_are_clipped(model: BiasModel, caplog: pytest.LogCaptureFixture) -> None:
    img = phantom((40, 40, 8), seed=5) - 3.0
    assert (img < 0).any()
    with caplog.at_level(logging.WARNING, logger="qmri_bids.bias"):
        corrected, _ = correct_bias_cnn(img, (1, 1, 3), model)
    assert "negative" in caplog.text
    assert (corrected >= 0).all()


@pytest.mark.parametrize("image, spacing, match", [
    (np.zeros((32, 32, 8), np.float32), (1, 1, 1), "no positive voxels"),
    (np.full((32, 32, 8), 5.0, np.float32), (1, 1, 1), "constant"),
    (np.ones((8, 8, 1), np.float32), (1, 1, 1), "too small"),
    (np.ones((20, 20, 10, 3), np.float32), (1, 1, 1, 1), "4-D|shape"),
    (np.ones((32, 32), np.complex64), (1, 1), "data type"),
    (np.ones((32, 32, 4), np.float32), (1, 1), "spacing"),
    (np.ones((32, 32, 4), np.float32), (1, -1, 1), "spacing"),
])
def test_bad_inputs(model: BiasModel, image: np.ndarray, spacing: tuple, match: str) -> None:
    with pytest.raises(BadDataError, match=match):
        correct_bias_cnn(image, spacing, model)


def test_bad_mask(model: BiasModel) -> None:
    img = phantom((32, 32, 8))
    with pytest.raises(BadDataError, match="mask shape"):
        correct_bias_cnn(img, (1, 1, 1), model, mask=np.ones((10, 10), bool))
    with pytest.raises(BadDataError, match="empty"):
        correct_bias_cnn(img, (1, 1, 1), model, mask=np.zeros(img.shape, bool))


def test_select_device() -> None:
    dev, reason = select_device("cpu")
    assert dev == "cpu" and reason
    dev, reason = select_device("auto")
    assert dev == ("cuda" if torch.cuda.is_available() else "cpu") and "auto" in reason
    with pytest.raises(UsageError, match="unknown device"):
        select_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no CUDA GPU is usable") as err:
        select_device("cuda")
    assert err.value.exit_code == 64


def _demo_slice_upsampled() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A bias-free head-phantom slice (the demo's tissues) upsampled to 819x983x1 at 0.21 mm:
    a large single-slice image such as a 2-D shoulder or knee acquisition."""
    from scipy import ndimage

    from qmri_bids.demo.phantom import make_head_phantom

    ph = make_head_phantom((80, 96, 3), (2.2, 2.2, 2.2), 0)
    sl = (ph.pd * (1 - np.exp(-0.8 / np.maximum(ph.t1, 1e-3))))[:, :, 1] * 100
    big = ndimage.zoom(sl, 10.24, order=1)
    rng = np.random.default_rng(0)
    big = np.hypot(big + rng.normal(0, 1, big.shape), rng.normal(0, 1, big.shape))
    return big[:, :, None].astype(np.float32), (2.2 / 10.24, 2.2 / 10.24, 3.0)


def test_single_large_slice_responds_to_an_applied_field(model: BiasModel) -> None:
    """bias_cnn_v1 did not respond at all on a 1024x1024x1 slice (its field error equalled doing
    nothing) and saturated at the clamp: the field ratio must now follow an applied field."""
    from qmri_bids.bias.cnn import foreground_mask
    from qmri_bids.bias.metrics import field_agreement

    img, sp = _demo_slice_upsampled()
    m = foreground_mask(img)
    _, f1 = correct_bias_cnn(img, sp, model)
    for seed in (1, 2):
        b = random_bias_field(img.shape, seed, length_scale=80.0, max_value=1.3, spacing=sp,
                              mask=m)
        _, f2 = correct_bias_cnn(img * b, sp, model)
        assert 0.5 < f2[m].min() and f2[m].max() < 2.0  # not at the clamp
        rec = field_agreement(f2 / f1, b, m)
        assert rec["correlation"] > 0.8, rec
        assert rec["mae"] < 0.6 * rec["mae_none"], rec


def test_demo_field_is_recovered(model: BiasModel, tmp_path) -> None:
    """The shipped model on the project's own demo (known field, both subjects, T1w and T2w):
    its field must follow the true one (correlation of the log-fields >= 0.9)."""
    import nibabel as nib

    from qmri_bids.bias.metrics import field_agreement
    from qmri_bids.demo.cli import demo_main

    assert demo_main([str(tmp_path / "demo"), "--no-qmri"]) in (0, None)
    for sub in ("01", "02"):
        gt = tmp_path / "demo" / "derivatives" / "groundtruth" / f"sub-{sub}" / "anat"
        head = nib.load(str(gt / f"sub-{sub}_desc-tissue_dseg.nii.gz")).get_fdata() > 0
        for suffix in ("T1w", "T2w"):
            im = nib.load(str(tmp_path / "demo" / f"sub-{sub}" / "anat" /
                              f"sub-{sub}_{suffix}.nii.gz"))
            truth = nib.load(str(gt / f"sub-{sub}_desc-truefield_{suffix}.nii.gz")).get_fdata()
            _, field = correct_bias_cnn(im.get_fdata().astype(np.float32),
                                        im.header.get_zooms()[:3], model)
            agreement = field_agreement(field, truth, head)
            assert agreement["correlation"] >= 0.9, (sub, suffix, agreement)
            assert agreement["mae"] < 0.6 * agreement["mae_none"], (sub, suffix, agreement)
