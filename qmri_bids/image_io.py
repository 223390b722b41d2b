"""Loading input images with the checks that turn bad data into clear messages.

Every reader of a NIfTI input goes through ``load_image`` so that a truncated file, a 4-D image
where 3-D is expected, an all-zero image or non-finite voxels are reported the same way, naming
the file, with exit code 65 (``BadDataError``).

Before any voxel is read, :func:`check_header` applies the rules that need only the header and
the file's size (the CLI runs it on every selected input, B1 maps included):

* the declared data must fit in the file: an uncompressed file must hold ``offset + voxels ×
  bytes``, and a gzip file cannot expand more than deflate allows (about 1032:1), so a header
  declaring huge dimensions on a tiny file is rejected instead of exhausting memory; so is an
  image whose float64 copy would not fit in this machine's memory;
* **complex-valued** images are rejected (exit 65): bias correction and the qMRI models need
  magnitude (or real/imaginary parts as ``part-`` entities), and which one is meant is not
  ours to guess;
* a **singular or non-finite affine** (a zero voxel size, collapsed axes) is rejected (exit 65):
  the voxel geometry that every method and every output needs is unknown.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from qmri_bids.errors import BadDataError, MissingInputError

LOGGER = logging.getLogger("qmri_bids.io")

#: deflate's largest possible expansion (RFC 1951: at most 258 bytes from a 2-bit code), with
#: margin; a gzip file cannot hold more data than this many times its size
MAX_GZIP_RATIO = 1100
#: smallest singular value of the affine's 3x3 part, relative to its largest, that still
#: describes three independent voxel axes
MIN_AFFINE_CONDITION = 1e-6
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
                nib.filebasedimages.ImageFileError)


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
    img = _open(path)
    _check_header(path, img)
    try:
        data = np.asanyarray(img.dataobj).astype(np.float64)
    except MemoryError as exc:
        raise BadDataError(f"{path}: not enough memory to load the image "
                           f"({_gigabytes(img)} as float64)") from exc
    except _READ_ERRORS as exc:
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
    """Pre-flight check (header and full decompression) used before a workflow is built."""
    return load_image(path, max_ndim=max_ndim).data.shape


def check_header(path: Path | str) -> tuple[int, ...]:
    """The header-only rules of the module docstring (no voxel is read); returns the shape."""
    path = Path(path)
    img = _open(path)
    _check_header(path, img)
    return tuple(int(n) for n in img.shape)


def _open(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise MissingInputError(f"{path}: file not found")
    try:
        return nib.load(str(path))
    except MemoryError as exc:  # a corrupt header can make nibabel allocate absurd extensions
        raise BadDataError(f"{path}: cannot read the header (not enough memory)") from exc
    except _READ_ERRORS as exc:
        raise BadDataError(f"{path}: cannot read the image ({exc}); is the file truncated?") from exc


def _gigabytes(img) -> str:
    return f"{math.prod(img.shape) * 8 / 1024**3:.1f} GB"


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_header(path: Path, img) -> None:
    header = img.header
    shape = tuple(int(n) for n in img.shape)
    if not shape or any(n <= 0 for n in shape):
        raise BadDataError(f"{path}: the header declares the shape {shape}, with an empty axis")
    dtype = header.get_data_dtype()
    if dtype.kind == "c":
        raise BadDataError(
            f"{path}: the image is complex-valued ({dtype}); qmri-bids needs magnitude images "
            "(or real and imaginary parts as part-real/part-imag files): convert it first"
        )
    n_bytes = math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    compressed = path.name.endswith(".gz")
    if compressed:
        limit = size * MAX_GZIP_RATIO + 1024**2
        if n_bytes > limit:
            raise BadDataError(
                f"{path}: the header declares {'x'.join(map(str, shape))} voxels of {dtype} "
                f"({n_bytes / 1024**2:.0f} MiB), more than a {size / 1024:.0f} KiB gzip file "
                "can hold: the header is corrupt or the file truncated"
            )
    else:
        offset = max(int(header.get_data_offset() or 0), int(header.sizeof_hdr))
        if offset + n_bytes > size:
            raise BadDataError(
                f"{path}: the header declares {'x'.join(map(str, shape))} voxels of {dtype} "
                f"({offset + n_bytes} bytes with the header), but the file has {size} bytes: "
                "the header is corrupt or the file truncated"
            )
    memory = _total_memory_bytes()
    if memory is not None and math.prod(shape) * 8 > memory:
        raise BadDataError(
            f"{path}: the image ({'x'.join(map(str, shape))} voxels) needs {_gigabytes(img)} "
            f"as float64, more than this machine's {memory / 1024**3:.1f} GB of memory"
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise BadDataError(f"{path}: the affine (voxel-to-world matrix) holds NaN or Inf; the "
                           "voxel geometry is unknown: fix the sform/qform of the header")
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if sv[0] <= 0 or sv[-1] <= MIN_AFFINE_CONDITION * sv[0]:
        raise BadDataError(
            f"{path}: the affine (voxel-to-world matrix) is singular (singular values "
            f"{', '.join(f'{v:.3g}' for v in sv)}): a voxel size is zero or two voxel axes "
            "coincide, so the voxel geometry is unknown; fix the sform/qform of the header"
        )
