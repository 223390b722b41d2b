"""Loading input images with the checks that turn bad data into clear messages.

Every reader of a NIfTI input goes through ``load_image`` so that a truncated file, a 4-D image
where 3-D is expected, an all-zero image or non-finite voxels are reported the same way, naming
the file, with exit code 65 (``BadDataError``).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from qmri_bids.errors import BadDataError, MissingInputError

LOGGER = logging.getLogger("qmri_bids.io")


@dataclass
class LoadedImage:
    path: Path
    image: nib.Nifti1Image
    data: np.ndarray  # float64, non-finite voxels replaced by 0
    finite_mask: np.ndarray  # False where the file held NaN/Inf

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(z) for z in self.image.header.get_zooms()[: self.data.ndim])


def load_image(path: Path | str, max_ndim: int = 3) -> LoadedImage:
    """Load a NIfTI as float64 with its geometry, rejecting what the pipeline cannot use.

    A 4-D image whose last axis has one volume is accepted as 3-D. NaN/Inf voxels are set to 0
    and flagged in ``finite_mask`` (so they are background for every method), with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj).astype(np.float64)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError) as exc:
        raise BadDataError(f"{path}: cannot read the image ({exc}); is the file truncated?") from exc
    while data.ndim > max_ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > max_ndim:
        raise BadDataError(
            f"{path}: expected a {max_ndim}-D image, got shape {data.shape} "
            f"({data.ndim}-D); split the volumes or select one"
        )
    if data.ndim < 2:
        raise BadDataError(f"{path}: expected an image, got shape {data.shape}")
    finite = np.isfinite(data)
    n_bad = int(data.size - finite.sum())
    if n_bad == data.size:
        raise BadDataError(f"{path}: every voxel is NaN or Inf")
    if n_bad:
        LOGGER.warning("%s: %d NaN/Inf voxel(s) set to 0 and treated as background", path, n_bad)
        data = np.where(finite, data, 0.0)
    if not np.any(data):
        raise BadDataError(f"{path}: the image is all zero")
    if np.ptp(data[finite]) == 0:
        raise BadDataError(f"{path}: the image is constant ({data[finite].flat[0]:g} everywhere)")
    return LoadedImage(path=path, image=img, data=data, finite_mask=finite)


def check_image_header(path: Path | str, max_ndim: int = 3) -> tuple[int, ...]:
    """Cheap pre-flight check (header and full decompression) used before a workflow is built."""
    return load_image(path, max_ndim=max_ndim).data.shape
