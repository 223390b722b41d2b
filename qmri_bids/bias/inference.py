"""Bias-field correction of user images with the implicitly trained CNN: input checks, device.

Input policy (each case is logged or raised with the file-independent reason; the caller adds
the file name):

* 2-D ``(x, y)``, 3-D ``(x, y, z)`` and 2-D stored as ``(x, y, 1)`` are accepted; trailing
  singleton axes beyond the third (``x, y, z, 1``) are dropped. Real 4-D data (time series,
  echoes) raise :class:`BadDataError`: correct one volume at a time.
* NaN/Inf voxels are **masked out and logged**: they take no part in the estimate, the field is
  still defined there (it is smooth), and the corrected image keeps NaN there (no data is
  invented). If more than half of the voxels are non-finite the image is rejected.
* Negative values (e.g. from interpolation or a phase-sensitive reconstruction) are clipped to 0
  for the estimate with a logged warning; the corrected image is ``clip(image, 0) / field``.
* An all-zero (or constant, or empty-mask) image, or one smaller than ``min_inplane`` (16) voxels
  along both in-plane axes in every orientation (e.g. 8x8x1), raises :class:`BadDataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from qmri_bids.bias.cnn import BiasNet, FusionConfig, apply_to_volume
from qmri_bids.bias.weights import BiasModel
from qmri_bids.errors import BadDataError

log = logging.getLogger("qmri_bids.bias")


def _as_3d(image: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise BadDataError(f"image has unsupported data type {arr.dtype} (need real numbers)")
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise BadDataError(f"image has shape {np.asarray(image).shape}: the bias CNN needs one "
                           "2-D or 3-D volume (split 4-D series into volumes)")
    sp = tuple(float(s) for s in spacing)[: arr.ndim]
    if len(sp) < arr.ndim and arr.ndim == 3 and arr.shape[2] == 1:
        sp = sp + (1.0,)  # thickness of a single slice does not matter
    if len(sp) != arr.ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise BadDataError(f"voxel spacing {tuple(spacing)} does not fit image shape {arr.shape}"
                           " (need one positive size per axis)")
    if arr.ndim == 2:
        arr, sp = arr[:, :, None], sp + (1.0,)
    return arr, sp


def correct_bias_cnn(image: np.ndarray, spacing: Sequence[float], model: BiasModel | BiasNet,
                     device: torch.device | str = "cpu", mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(corrected, field)`` (float32, the input's shape) with ``image = corrected * field``.

    ``field`` is smooth, positive, geometric mean 1 inside the foreground and within [0.5, 2].
    ``mask`` (optional, same shape) restricts the estimate to the object; by default a robust
    Otsu-based foreground mask is used. See the module docstring for the input policy.
    """
    orig_shape = np.asarray(image).shape
    arr, sp = _as_3d(image, spacing)
    net, fusion = (model.net, model.fusion) if isinstance(model, BiasModel) else (model,
                                                                                  FusionConfig())
    if min(sorted(arr.shape)[1:]) < fusion.min_inplane:
        raise BadDataError(f"image {orig_shape} is too small for the bias CNN: at least "
                           f"{fusion.min_inplane}x{fusion.min_inplane} voxels in-plane are needed")
    data = arr.astype(np.float32, copy=True)
    finite = np.isfinite(data)
    n_bad = int(finite.size - finite.sum())
    if n_bad:
        if n_bad > finite.size // 2:
            raise BadDataError(f"image has {n_bad} of {finite.size} non-finite (NaN/Inf) voxels; "
                               "refusing to estimate a bias field from it")
        log.warning("bias CNN: %d NaN/Inf voxels masked out of the estimate (left NaN in the "
                    "corrected image)", n_bad)
        data[~finite] = 0.0
    n_neg = int((data < 0).sum())
    if n_neg:
        log.warning("bias CNN: %d negative voxels (min %.4g) clipped to 0", n_neg,
                    float(data.min()))
        np.maximum(data, 0.0, out=data)
    if not np.any(data > 0):
        raise BadDataError("image has no positive voxels (all zero / non-positive): "
                           "nothing to correct")
    if float(data.max()) == float(data[data > 0].min()) and np.all(data[finite] > 0):
        raise BadDataError("image is constant: there is no information about a bias field")
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != orig_shape and m.reshape(-1).size == arr.size:
            m = m.reshape(arr.shape)
        if m.shape != arr.shape and m.shape != orig_shape:
            raise BadDataError(f"mask shape {np.asarray(mask).shape} != image shape {orig_shape}")
        m = m.reshape(arr.shape).astype(bool) & finite & (data > 0)
        if not m.any():
            raise BadDataError("the foreground mask is empty (after removing NaN/zero voxels)")
    else:
        m = None
    dev = torch.device(device)
    field, _ = apply_to_volume(net, data, sp, mask=m, fcfg=fusion, device=dev)
    corrected = data / field
    corrected[~finite] = np.nan
    return (corrected.reshape(orig_shape).astype(np.float32),
            field.reshape(orig_shape).astype(np.float32))
