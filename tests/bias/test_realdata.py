"""The shipped model on real scanner data (ds-real; skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qmri_bids.bias.cnn import foreground_mask
from qmri_bids.bias.fields import random_bias_field
from qmri_bids.bias.inference import correct_bias_cnn
from qmri_bids.bias.weights import BiasModel, load_model

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def model() -> BiasModel:
    return load_model()


def _load(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    im = nib.load(str(path))
    return np.asanyarray(im.dataobj).astype(np.float32), tuple(float(z) for z in
                                                                im.header.get_zooms()[:3])


def _geo(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    return x / np.exp(np.log(x[m]).mean())


def _two_balls(img: np.ndarray) -> list[np.ndarray]:
    """The two touching balls: object above 2 % of the 99th percentile (the shading is so strong
    that Otsu misses dark parts), largest component, split by 2-means on x-y, eroded in-plane."""
    fg = ndimage.binary_opening(img > 0.02 * np.percentile(img, 99), np.ones((3, 3, 1), bool))
    for k in range(fg.shape[2]):
        fg[:, :, k] = ndimage.binary_fill_holes(fg[:, :, k])
    lab, n = ndimage.label(fg)
    obj = lab == np.argmax(ndimage.sum(fg, lab, range(1, n + 1))) + 1
    xyz = np.argwhere(obj)
    c = xyz[[xyz[:, 0].argmin(), xyz[:, 0].argmax()], :2].astype(float)
    for _ in range(50):
        side = np.argmin(((xyz[:, None, :2] - c[None]) ** 2).sum(-1), axis=1)
        c = np.stack([xyz[side == k, :2].mean(0) for k in range(2)])
    balls = []
    for k in range(2):
        m = np.zeros_like(obj)
        m[tuple(xyz[side == k].T)] = True
        balls.append(ndimage.binary_erosion(m, structure=np.ones((5, 5, 1), bool)))
    return balls


@pytest.mark.xfail(strict=True, reason=(
    "known miss of bias_cnn_v2: inside ball 1 of sub-balls01 T1w the CV stays at 0.807 (raw "
    "0.806; bias_cnn_v1 0.773, N4 0.736), ball 2 drops 1.454 -> 1.437; the neutral 3-class CV "
    "of benchmarks/bias/bench_bias.py is better than N4's on this image (0.274 vs 0.278)"))
def test_balls_become_more_uniform(ds_real: Path, model: BiasModel) -> None:
    """sub-balls01 T1w: two uniform balls with strong shading; the CV inside each must drop."""
    img, sp = _load(ds_real / "sub-balls01" / "anat" / "sub-balls01_T1w.nii.gz")
    corrected, field = correct_bias_cnn(img, sp, model)
    balls = _two_balls(img)
    assert all(b.sum() > 1000 for b in balls)
    for ball in balls:
        cv_raw = img[ball].std() / img[ball].mean()
        cv_cnn = corrected[ball].std() / corrected[ball].mean()
        assert cv_cnn < 0.97 * cv_raw, (cv_cnn, cv_raw)
    assert 0.5 <= field.min() and field.max() <= 2.0


def test_consistency_on_real_pd_brain(ds_real: Path, model: BiasModel) -> None:
    """sub-brain01 PDw: F(v b)/F(v) must recover a known field b much better than doing nothing."""
    img, sp = _load(ds_real / "sub-brain01" / "anat" / "sub-brain01_flip-1_mt-off_MTS.nii.gz")
    m = foreground_mask(img)
    b = random_bias_field(img.shape, 1, length_scale=80.0, max_value=1.25, spacing=sp, mask=m)
    _, fv = correct_bias_cnn(img, sp, model, mask=m)
    _, fg = correct_bias_cnn(img * b, sp, model, mask=m)
    err = np.abs(_geo(fg / fv, m) - _geo(b, m))[m].mean()
    none = np.abs(1 - _geo(b, m))[m].mean()
    assert err < 0.5 * none, (err, none)
