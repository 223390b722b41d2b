"""N4 bias-field correction (SimpleITK), the baseline the CNN is compared against.

Settings follow fMRIPrep's ``N4BiasFieldCorrection`` call: Otsu foreground mask, shrink factor 4,
4 fitting levels of 50 iterations, convergence threshold 1e-7, and a B-spline mesh whose control
point spacing is about 200 mm, derived from the physical extent of the image. The full-resolution
field is reconstructed from N4's log field (``GetLogBiasFieldAsImage``) rather than by dividing
images, so that it is defined in the background too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from qmri_bids.errors import BadDataError

LOGGER = logging.getLogger("qmri_bids.bias")


@dataclass(frozen=True)
class N4Settings:
    shrink_factor: int = 4
    n_levels: int = 4
    n_iterations: int = 50
    convergence_threshold: float = 1e-7
    bspline_distance_mm: float = 200.0
    bspline_order: int = 3
    wiener_noise: float = 0.01
    histogram_fwhm: float = 0.15

    def as_dict(self) -> dict:
        return asdict(self)


def otsu_foreground_mask(image: np.ndarray) -> np.ndarray:
    """Foreground (object) mask by Otsu's threshold, the same rule N4 uses in fMRIPrep."""
    img = sitk.GetImageFromArray(np.asarray(image, dtype=np.float32))
    mask = sitk.OtsuThreshold(img, 0, 1, 200)
    out = sitk.GetArrayFromImage(mask).astype(bool)
    if not out.any():  # a constant image: everything non-zero is the object
        out = np.asarray(image) > 0
    return out


def _to_sitk(array: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    # SimpleITK indexes arrays as (z, y, x): transpose so that spacing keeps its nibabel order.
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.T, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def n4_correct(
    image: np.ndarray,
    spacing: tuple[float, ...],
    mask: np.ndarray | None = None,
    settings: N4Settings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Correct ``image`` (2-D or 3-D, nibabel axis order) with N4; returns (corrected, field).

    ``field`` is multiplicative (observed = true × field), at full resolution, same shape as input.
    Singleton axes (a single slice stored as x×y×1) are handled by correcting the 2-D image.
    """
    settings = settings or N4Settings()
    data = np.asarray(image, dtype=np.float64)
    if data.ndim not in (2, 3):
        raise BadDataError(f"N4 needs a 2-D or 3-D image, got shape {data.shape}")
    squeeze_axes = tuple(i for i, n in enumerate(data.shape) if n == 1)
    core = np.squeeze(data, axis=squeeze_axes) if squeeze_axes else data
    core_spacing = tuple(s for i, s in enumerate(spacing[: data.ndim]) if i not in squeeze_axes)
    if core.ndim < 2 or min(core.shape) < 4:
        raise BadDataError(f"image of shape {data.shape} is too small for N4")
    if not np.isfinite(core).all():
        raise BadDataError("image holds NaN or Inf voxels")
    # N4 works on the log image: shift so that the minimum is positive (it is for magnitude data).
    offset = 0.0
    if core.min() <= 0:
        offset = -core.min() + 1e-3 * (np.ptp(core) or 1.0)
    work = core + offset

    if mask is None:
        fg = otsu_foreground_mask(core)
    else:
        fg = np.squeeze(np.asarray(mask, dtype=bool), axis=squeeze_axes) if squeeze_axes else mask
    if not fg.any():
        raise BadDataError("the foreground mask is empty (all-zero or constant image)")

    img = _to_sitk(work, core_spacing)
    msk = sitk.Cast(_to_sitk(fg.astype(np.float32), core_spacing), sitk.sitkUInt8)

    shrink = [settings.shrink_factor if n // settings.shrink_factor >= 4 else 1 for n in core.shape]
    img_small = sitk.Shrink(img, shrink)
    msk_small = sitk.Shrink(msk, shrink)

    extent_mm = [n * s for n, s in zip(core.shape, core_spacing, strict=True)]
    # Control points from the extent: one B-spline span per ~200 mm, at least one span per axis.
    n_control = [
        max(1, math.ceil(e / settings.bspline_distance_mm)) + settings.bspline_order
        for e in extent_mm
    ]

    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([settings.n_iterations] * settings.n_levels)
    n4.SetConvergenceThreshold(settings.convergence_threshold)
    n4.SetNumberOfControlPoints(n_control)
    n4.SetSplineOrder(settings.bspline_order)
    n4.SetWienerFilterNoise(settings.wiener_noise)
    n4.SetBiasFieldFullWidthAtHalfMaximum(settings.histogram_fwhm)
    n4.Execute(img_small, msk_small)
    log_field = n4.GetLogBiasFieldAsImage(img)
    field = np.exp(sitk.GetArrayFromImage(log_field).T.astype(np.float64))
    # N4's field has an arbitrary scale: normalise to mean 1 in the foreground so fields compare.
    field /= field[fg].mean()
    corrected = core / field
    if squeeze_axes:
        field = np.expand_dims(field, squeeze_axes)
        corrected = np.expand_dims(corrected, squeeze_axes)
    LOGGER.debug("N4: shrink %s, control points %s", shrink, n_control)
    return corrected, field
