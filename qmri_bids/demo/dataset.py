"""Writes the demo BIDS dataset: simulated images of the head phantom with known ground truth.

Anatomical images are simulated with the project's own signal models (the SPGR/VFA model for
T1w; the mono-exponential spin-echo model times the longitudinal recovery for T2w), multiplied by
a smooth receive bias field from the one field generator (``qmri_bids.bias.fields``), and given
Rician noise. The truth — bias field, tissue labels and parameter maps — goes to
``derivatives/groundtruth``. Everything is a function of the seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qmri_bids.bias.fields import random_bias_field
from qmri_bids.bids.derivatives import atomic_write_json, atomic_write_text
from qmri_bids.demo import qmri_collections
from qmri_bids.demo.phantom import LABELS, Phantom, make_head_phantom
from qmri_bids.demo.volumes import add_rician_noise, save_volume
from qmri_bids.qmri.models.mese import MESEMonoModel
from qmri_bids.qmri.models.vfa import VFAModel

LOGGER = logging.getLogger("qmri_bids.demo")


@dataclass(frozen=True)
class DemoSettings:
    n_subjects: int = 2
    seed: int = 20221
    shape: tuple[int, int, int] = (80, 96, 72)
    spacing: tuple[float, float, float] = (2.2, 2.2, 2.2)
    snr_wm: float = 40.0  # white-matter signal / noise sigma of the T1w image
    inhomogeneity: tuple[float, float] = (0.20, 0.40)  # (max - min) / mean of the field in head
    t1w_flip_deg: float = 20.0
    t1w_tr: float = 0.018
    t2w_tr: float = 4.0
    t2w_te: float = 0.09
    qmri: bool = True  # add the VFA/TB1map/IRT1/MESE/MRF collections (qmri_collections.py)
    qmri_slices: int = 8  # central axial slices of the VFA/IRT1/MESE slab
    mrf_slices: int = 1
    qmri_snr_wm: float = 100.0
    mrf_snr_wm: float = 10.0
    nist_mrf_dir: Path | None = None  # reference maps for the optional sub-nistmrf


def demo_bias_field(phantom: Phantom, rng: np.random.Generator,
                    inhomogeneity: tuple[float, float]) -> tuple[np.ndarray, float]:
    """A smooth field with (max − min)/mean inside the head drawn from ``inhomogeneity``."""
    head = phantom.head_mask
    field = random_bias_field(phantom.labels.shape, rng, length_scale=(90.0, 140.0),
                              spacing=phantom.spacing, mask=head).astype(np.float64)
    target = rng.uniform(*inhomogeneity)
    log_field = np.log(field)
    log_field -= log_field[head].mean()
    spread = field[head].max() - field[head].min()
    # Rescale in the log domain (keeps the field positive) until the spread hits the target.
    for _ in range(30):
        scaled = np.exp(log_field * target / max(spread, 1e-6))
        scaled /= scaled[head].mean()
        achieved = scaled[head].max() - scaled[head].min()
        if abs(achieved - target) < 1e-3:
            break
        log_field *= target / achieved
    return scaled, float(achieved)


def simulate_anatomical(phantom: Phantom, settings: DemoSettings) -> dict[str, np.ndarray]:
    """Noise-free, bias-free T1w (SPGR) and T2w (spin echo) signals of the phantom."""
    params = torch.from_numpy(np.stack([phantom.pd, np.maximum(phantom.t1, 1e-3)], -1))
    spgr = VFAModel([settings.t1w_flip_deg], [settings.t1w_tr])
    t1w = spgr(params)[..., 0].numpy()
    recovery = 1.0 - np.exp(-settings.t2w_tr / np.maximum(phantom.t1, 1e-3))
    se = MESEMonoModel([settings.t2w_te])
    se_params = torch.from_numpy(np.stack([phantom.pd * recovery, np.maximum(phantom.t2, 1e-4)],
                                          -1))
    t2w = se(se_params)[..., 0].numpy()
    return {"T1w": t1w, "T2w": t2w}


def write_demo_dataset(out_dir: Path, settings: DemoSettings | None = None) -> Path:
    """Write the demo dataset to ``out_dir`` (created; existing demo files are overwritten)."""
    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gt_dir = out_dir / "derivatives" / "groundtruth"
    atomic_write_json(out_dir / "dataset_description.json", {
        "Name": "qmri-bids demo: simulated head phantom",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["qmri-bids"],
        "GeneratedBy": [{"Name": "qmri-bids demo", "Description":
                         f"seed {settings.seed}, {settings.n_subjects} subjects"}],
    })
    atomic_write_text(out_dir / "README", (
        "Simulated BIDS dataset written by 'qmri-bids demo'. Digital head phantom (geometric "
        "shapes, literature tissue values at 3 T) imaged with a known smooth bias field and "
        "Rician noise. Ground truth in derivatives/groundtruth.\n"))
    atomic_write_text(out_dir / ".bidsignore", "*_MRF.nii.gz\n*_MRF.json\n*_mrfschedule.tsv\n"
                      "*_mrfschedule.json\n")
    atomic_write_json(gt_dir / "dataset_description.json", {
        "Name": "qmri-bids demo ground truth",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qmri-bids demo"}],
    })
    atomic_write_text(gt_dir / "desc-tissue_dseg.tsv",
                      "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LABELS.items()))
    rows = ["participant_id\tseed\tinhomogeneity"]
    for index in range(1, settings.n_subjects + 1):
        label = f"{index:02d}"
        rng = np.random.default_rng([settings.seed, index])
        phantom = make_head_phantom(settings.shape, settings.spacing, rng)
        field, achieved = demo_bias_field(phantom, rng, settings.inhomogeneity)
        clean = simulate_anatomical(phantom, settings)
        anat = out_dir / f"sub-{label}" / "anat"
        gt_anat = gt_dir / f"sub-{label}" / "anat"
        meta = {
            "T1w": {"PulseSequenceType": "SPGR", "FlipAngle": settings.t1w_flip_deg,
                    "RepetitionTime": settings.t1w_tr, "EchoTime": 0.003,
                    "MagneticFieldStrength": 3},
            "T2w": {"PulseSequenceType": "SE", "FlipAngle": 90,
                    "RepetitionTime": settings.t2w_tr, "EchoTime": settings.t2w_te,
                    "MagneticFieldStrength": 3},
        }
        for suffix, signal in clean.items():
            # Each image: white matter at 1000 (scanner-like units) and at SNR ``snr_wm``.
            wm_level = float(np.median(signal[phantom.labels == 5]))
            sigma = wm_level / settings.snr_wm
            noisy = add_rician_noise(signal * field, sigma, rng)
            scale = 1000.0 / wm_level
            save_volume(noisy * scale, phantom.affine, anat / f"sub-{label}_{suffix}.nii.gz")
            atomic_write_json(anat / f"sub-{label}_{suffix}.json", meta[suffix])
            save_volume(field, phantom.affine, gt_anat / f"sub-{label}_desc-truefield_{suffix}.nii.gz")
        save_volume(phantom.labels, phantom.affine, gt_anat / f"sub-{label}_desc-tissue_dseg.nii.gz",
              dtype=np.int16)
        for name, suffix in (("t1", "T1map"), ("t2", "T2map"), ("t2star", "T2starmap"),
                             ("pd", "PDmap")):
            save_volume(getattr(phantom, name), phantom.affine, gt_anat / f"sub-{label}_{suffix}.nii.gz")
        if settings.qmri:
            qmri_collections.write_subject_collections(
                out_dir, label, phantom, np.random.default_rng([settings.seed, index, 1]),
                qmri_collections.QmriSettings(settings.qmri_slices, settings.mrf_slices,
                                              settings.qmri_snr_wm, settings.mrf_snr_wm))
        rows.append(f"sub-{label}\t{settings.seed}\t{achieved:.3f}")
        LOGGER.info("demo: sub-%s written (field spread %.0f %%)", label, 100 * achieved)
    if settings.qmri:
        qmri_collections.write_groundtruth_readme(gt_dir)
    if settings.nist_mrf_dir is not None and qmri_collections.write_nist_mrf_subject(
            out_dir, settings.nist_mrf_dir, settings.seed,
            qmri_collections.QmriSettings(mrf_snr_wm=settings.mrf_snr_wm)):
        rows.append("sub-nistmrf\tn/a\tn/a")
    atomic_write_text(out_dir / "participants.tsv", "\n".join(rows) + "\n")
    atomic_write_json(out_dir / "participants.json", {
        "seed": {"Description": "seed of the simulation"},
        "inhomogeneity": {"Description": "(max - min) / mean of the true bias field in the head"},
    })
    return out_dir
