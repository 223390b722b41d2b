"""Writing simulated volumes and adding magnitude noise: shared by every demo collection."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from qmri_bids.bids.derivatives import save_like


def save_volume(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.float32) -> None:
    """Save ``data`` with ``affine`` as both qform and sform (code 1, scanner), in mm and s."""
    ref = nib.Nifti1Image(np.zeros(data.shape, dtype=dtype), affine)
    ref.set_qform(affine, 1)
    ref.set_sform(affine, 1)
    ref.header.set_xyzt_units("mm", "sec")
    save_like(data, ref, path, dtype=dtype)


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of ``sigma`` per channel."""
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag)
