"""qMRI file collections of the demo dataset, simulated from the phantom's ground-truth maps.

Every signal comes from the project's own signal models (``qmri_bids.qmri.models``); nothing here
re-implements a signal equation. Per demo subject, on a slab of central axial slices of the
phantom (affine = the phantom's, shifted to the first slab slice):

* ``anat/*_flip-{1,2}_VFA``: SPGR, FlipAngle 3/20 deg, RepetitionTimeExcitation 0.015 s, with
  the true B1 (:class:`~qmri_bids.qmri.models.vfa.VFAModel`), Rician noise;
* ``fmap/*_TB1map``: the true relative B1+ (smooth, 0.8-1.2), ``IntendedFor`` the VFA files
  (``fmap/*_acq-mrf_TB1map``: the same on the MRF grid, ``IntendedFor`` the MRF files);
  for the subjects in ``QmriSettings.tb1dam_subjects`` (sub-02) no VFA TB1map but
  ``fmap/*_flip-{1,2}_TB1DAM``: double-angle B1+ mapping, FlipAngle 60/120 deg, RepetitionTime
  10 s, on the VFA slab at twice its voxel size (2x2x2 block means of the VFA-grid signals of a
  spoiled gradient echo, :class:`~qmri_bids.qmri.models.vfa.VFAModel` with the true B1, so
  with its small T1 saturation), Rician noise, ``IntendedFor`` the VFA files: the pipeline
  maps the VFA of that subject with the B1 map it computes from them;
* ``anat/*_inv-{1..9}_IRT1``: magnitude IR, TI 0.35-1.7 s, RepetitionTime 2.55 s
  (:class:`~qmri_bids.qmri.models.irt1.IRT1TRModel`), Rician noise;
* ``anat/*_echo-{1..10}_MESE``: CPMG, TE 12.9 ms x k, nominal RefocusingFlipAngle 180,
  simulated with the EPG model of the train at the true B1 (stimulated echoes where B1 is not
  1; :class:`~qmri_bids.qmri.models.mese_epg.MESEEPG`), Rician noise;
* ``anat/*_part-{mag,phase}_MRF`` + ``*_mrfschedule.{tsv,json}`` (MRF_CONVENTION.md): FISP-MRF
  with the default schedule (:func:`~qmri_bids.qmri.models.mrf.default_mrf_schedule`),
  :class:`~qmri_bids.qmri.models.mrf.MRFModel` (default EPG truncation) with the true B1
  (quantised to 0.01), complex Gaussian noise, on ``mrf_slices`` central slices.

Ground truth (``derivatives/groundtruth/sub-XX/anat``), named ``sub-XX_acq-<collection>_<map>``
with ``<collection>`` = ``vfa``, ``irt1``, ``mese`` or ``mrf`` (lower-case suffix):

* ``_T1map`` (s), ``_T2map`` (s) and ``_M0map`` (the M0 the collection's model uses, a.u.) on the
  collection's grid; their JSON sidecars carry ``NoiseSigma`` (σ of the Gaussian noise of each
  real/imaginary channel, in image units), ``NoiseDistribution`` and the simulating model;
* ``_TB1map``: true relative B1+ on that grid (VFA: the field itself, MRF: the quantised field the
  simulation used; ``acq-tb1dam``: its block means on the TB1DAM grid); ``_desc-tissue_dseg``:
  tissue labels on that grid.

M0 is 1000 × proton density for VFA, IRT1 and MRF (MRF: times ``exp(i·MRF_M0_PHASE)``) and
1000 × PD × (1 − exp(−TR/T1)) for MESE (the T1 saturation at its RepetitionTime, as for the T2w
image). Noise σ = (median white-matter signal of the brightest member) / ``snr_wm`` (MRF: the
median white-matter RMS over the time course / ``mrf_snr_wm``).

The optional NIST subject (:func:`write_nist_mrf_subject`) simulates the same MRF protocol from
the measured T1/T2 maps of the NIST MnCl2 array at 3 T (one ``acq-<site>`` collection per site).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import torch

from qmri_bids.bids.derivatives import atomic_write_json, atomic_write_text
from qmri_bids.demo.phantom import Phantom
from qmri_bids.demo.volumes import add_rician_noise, save_volume
from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.models.mrf import MRFModel, default_mrf_schedule, write_mrf_series
from qmri_bids.qmri.models.vfa import VFAModel
from qmri_bids.qmri.protocols import resolve_collection

LOGGER = logging.getLogger("qmri_bids.demo")

# Protocols (BIDS units: s, deg); they match what the shipped estimators are trained for.
VFA_FLIP_DEG = (3.0, 20.0)
VFA_TR = 0.015
VFA_TE = 0.002
IRT1_TI = (0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4, 1.7)
IRT1_TR = 2.55
IRT1_TE = 0.012
MESE_TE = tuple(round(0.0129 * k, 6) for k in range(1, 11))
MESE_TR = 4.0
B1_RANGE = (0.8, 1.2)
MRF_B1_STEP = 0.01  # B1 quantisation of the MRF simulation (one EPG run per distinct value)
MRF_M0_PHASE = 0.5  # rad, constant receiver phase of the MRF M0
DAM_FLIP_DEG = (60.0, 120.0)
DAM_TR = 10.0  # long against the tissues' T1 (CSF's 4 s aside): the double-angle assumption
DAM_BLOCK = 2  # the TB1DAM voxels are 2x the VFA's along every axis
NIST_LOG_STEP = 0.01  # NIST T1/T2 quantised on a 1 % log grid (one EPG run per distinct pair)
NIST_STRIDE = 2  # in-plane subsampling of the 256 x 256 NIST maps (every other voxel, no averaging)
FIELD = 3


@dataclass(frozen=True)
class QmriSettings:
    n_slices: int = 8  # central axial slices of the VFA/IRT1/MESE slab
    mrf_slices: int = 1
    snr_wm: float = 100.0  # white-matter signal of the brightest member / sigma
    mrf_snr_wm: float = 10.0  # white-matter RMS signal over the MRF time course / sigma
    #: subjects whose B1+ comes from a TB1DAM collection instead of a TB1map beside the VFA
    tb1dam_subjects: tuple[str, ...] = ("02",)


def slab(n_total: int, n: int) -> slice:
    n = max(1, min(n, n_total))
    z0 = (n_total - n) // 2
    return slice(z0, z0 + n)


def slab_affine(affine: np.ndarray, z: slice) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, :3] @ np.array([0.0, 0.0, float(z.start)]) + out[:3, 3]
    return out


def _simulate(model, params: np.ndarray, b1: np.ndarray | None = None) -> np.ndarray:
    """``model(params, b1)`` on numpy arrays (float64), any leading shape."""
    p = torch.from_numpy(np.ascontiguousarray(params, dtype=np.float64))
    b = None if b1 is None else torch.from_numpy(np.ascontiguousarray(b1, dtype=np.float64))
    with torch.no_grad():
        return model(p, b1=b).numpy()


def b1_field(phantom: Phantom, rng: np.random.Generator) -> np.ndarray:
    """A smooth relative B1+ on the phantom grid: the centre-bright pattern of 3 T head coils
    (a broad Gaussian bump with a random centre and width) plus a random linear tilt, mapped
    linearly to ``B1_RANGE`` inside the head (and clipped to it outside)."""
    head = phantom.head_mask
    shape, spacing = phantom.labels.shape, np.asarray(phantom.spacing)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    centre = rng.uniform(-15.0, 15.0, 3)
    width = rng.uniform(60.0, 90.0)
    tilt = rng.normal(0.0, 1.0, 3)
    tilt *= rng.uniform(0.1, 0.3) / np.linalg.norm(tilt)
    r2 = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / width**2
    f = np.exp(-0.5 * r2) + (tilt[0] * x + tilt[1] * y + tilt[2] * z) / 100.0
    lo, hi = f[head].min(), f[head].max()
    b1 = B1_RANGE[0] + (B1_RANGE[1] - B1_RANGE[0]) * (f - lo) / max(hi - lo, 1e-9)
    return np.clip(b1, *B1_RANGE)


def mrf_fingerprints(t1: np.ndarray, t2: np.ndarray, b1: np.ndarray | None = None,
                     chunk: int = 2048, n_states: int | str | None = None) -> np.ndarray:
    """Unit-M0 FISP-MRF signals (complex ``[..., 500]``) of the default schedule.

    ``MRFModel`` with its default EPG truncation (48 orders: error < 2e-4 of the peak signal for
    T2 <= 300 ms and < 1e-2 for CSF's T2 of 2 s, far below the demo's noise; ``n_states="exact"``
    costs 5x more).

    The model runs once per distinct (T1, T2, B1) triple (the maps are piecewise constant or
    quantised), in chunks, and the result is scattered back to every voxel.
    """
    model = MRFModel(default_mrf_schedule(), estimate_b1=False, n_states=n_states)
    shape = t1.shape
    cols = [t1.reshape(-1), t2.reshape(-1)] + ([] if b1 is None else [b1.reshape(-1)])
    keys = np.stack(cols, -1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = np.empty((uniq.shape[0], model.n_timepoints), dtype=np.complex128)
    for s in range(0, uniq.shape[0], chunk):
        u = uniq[s: s + chunk]
        params = np.stack([np.ones(len(u)), np.zeros(len(u)), u[:, 0], u[:, 1]], -1)
        out[s: s + chunk] = _simulate(model, params, None if b1 is None else u[:, 2])
    LOGGER.info("demo: MRF simulated for %d distinct parameter sets", uniq.shape[0])
    return out[inverse].reshape(*shape, model.n_timepoints)


def _truth(gt_anat: Path, prefix: str, affine: np.ndarray, maps: dict[str, np.ndarray],
           meta: dict) -> list[Path]:
    written = []
    for suffix, data in maps.items():
        path = gt_anat / f"{prefix}_{suffix}.nii.gz"
        dtype = np.int16 if suffix.endswith(("dseg", "mask")) else np.float32
        save_volume(data, affine, path, dtype=dtype)
        if not suffix.endswith(("dseg", "mask")):
            atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")), meta)
        written.append(path)
    return written


def sidecar_model(suffix: str, names: list[str], metas: list[dict]) -> SignalModel:
    """The signal model the pipeline will resolve from these sidecars (the collection's model
    class, ``from_sidecars``): the demo simulates with exactly the model it will be fitted
    with, so its protocols find the shipped estimators."""
    members = [SimpleNamespace(path=Path(f"{name}.nii.gz"), entities={}, metadata=meta)
               for name, meta in zip(names, metas, strict=True)]
    resolved = resolve_collection(SimpleNamespace(suffix=suffix, members=members, b1map=None))
    if [m.path.name for m in resolved.members] != [f"{n}.nii.gz" for n in names]:
        raise ValueError(f"demo {suffix} members must be listed in the model's order")
    return resolved.model


def _write_members(anat: Path, names: list[str], volumes: np.ndarray, affine: np.ndarray,
                   metas: list[dict]) -> list[Path]:
    paths = []
    for i, (name, meta) in enumerate(zip(names, metas, strict=True)):
        path = anat / f"{name}.nii.gz"
        save_volume(volumes[..., i], affine, path)
        atomic_write_json(anat / f"{name}.json", meta)
        paths.append(path)
    return paths


def write_subject_collections(out_dir: Path, label: str, phantom: Phantom,
                              rng: np.random.Generator,
                              settings: QmriSettings | None = None) -> dict[str, float]:
    """Write the VFA, TB1map (or TB1DAM), IRT1, MESE and MRF collections of ``sub-<label>`` and
    their truth.

    Returns the noise sigma of each collection."""
    settings = settings or QmriSettings()
    out_dir = Path(out_dir)
    anat = out_dir / f"sub-{label}" / "anat"
    fmap = out_dir / f"sub-{label}" / "fmap"
    gt_anat = out_dir / "derivatives" / "groundtruth" / f"sub-{label}" / "anat"
    sub = f"sub-{label}"
    b1_full = b1_field(phantom, rng)

    z = slab(phantom.labels.shape[2], settings.n_slices)
    aff = slab_affine(phantom.affine, z)
    labels = phantom.labels[..., z]
    pd, t1, t2 = phantom.pd[..., z], np.maximum(phantom.t1[..., z], 1e-3), np.maximum(
        phantom.t2[..., z], 1e-3)
    b1 = b1_full[..., z]
    wm = labels == 5
    m0 = 1000.0 * pd
    sigmas: dict[str, float] = {}
    common = {"MagneticFieldStrength": FIELD, "Manufacturer": "qmri-bids demo (simulated)"}

    def noisy(clean: np.ndarray, name: str) -> tuple[np.ndarray, float]:
        sigma = float(np.median(clean[wm].max(-1))) / settings.snr_wm if wm.any() else 1.0
        sigmas[name] = sigma
        return add_rician_noise(clean, sigma, rng).astype(np.float32), sigma

    # --- VFA + TB1map
    names = [f"{sub}_flip-{i}_VFA" for i in range(1, len(VFA_FLIP_DEG) + 1)]
    metas = [{**common, "PulseSequenceType": "SPGR", "FlipAngle": fa,
              "RepetitionTimeExcitation": VFA_TR, "RepetitionTime": VFA_TR, "EchoTime": VFA_TE}
             for fa in VFA_FLIP_DEG]
    vfa = sidecar_model("VFA", names, metas)
    clean = _simulate(vfa, np.stack([m0, t1], -1), b1)
    data, sigma = noisy(clean, "VFA")
    vfa_paths = _write_members(anat, names, data, aff, metas)
    vfa_uris = [f"bids::{sub}/anat/{p.name}" for p in vfa_paths]
    if label not in settings.tb1dam_subjects:
        save_volume(b1, aff, fmap / f"{sub}_TB1map.nii.gz")
        atomic_write_json(fmap / f"{sub}_TB1map.json", {
            **common, "IntendedFor": vfa_uris,
            "Description": "relative B1+ (1 = nominal flip angle); here the true simulated field"})
    meta = {"Model": type(vfa).__name__, "NoiseSigma": sigma, "NoiseDistribution": "Rician",
            "Units": {"T1map": "s", "M0map": "a.u.", "TB1map": "relative"}}
    _truth(gt_anat, f"{sub}_acq-vfa", aff, {"T1map": t1, "M0map": m0, "TB1map": b1,
                                            "desc-tissue_dseg": labels}, meta)

    # --- IRT1 (magnitude, TR known: the TR-aware model)
    names = [f"{sub}_inv-{i}_IRT1" for i in range(1, len(IRT1_TI) + 1)]
    metas = [{**common, "PulseSequenceType": "IR-SE", "InversionTime": ti,
              "RepetitionTime": IRT1_TR, "EchoTime": IRT1_TE, "FlipAngle": 90}
             for ti in IRT1_TI]
    ir = sidecar_model("IRT1", names, metas)
    data, sigma = noisy(_simulate(ir, np.stack([m0, t1], -1)), "IRT1")
    _write_members(anat, names, data, aff, metas)
    meta = {"Model": type(ir).__name__, "NoiseSigma": sigma, "NoiseDistribution": "Rician",
            "Units": {"T1map": "s", "M0map": "a.u."}}
    _truth(gt_anat, f"{sub}_acq-irt1", aff, {"T1map": t1, "M0map": m0,
                                             "desc-tissue_dseg": labels}, meta)

    # --- MESE: a CPMG train at the true B1, so with the stimulated echoes of real trains
    m0_se = m0 * (1.0 - np.exp(-MESE_TR / t1))
    names = [f"{sub}_echo-{i}_MESE" for i in range(1, len(MESE_TE) + 1)]
    metas = [{**common, "PulseSequenceType": "SE", "EchoTime": te, "RepetitionTime": MESE_TR,
              "FlipAngle": 90, "RefocusingFlipAngle": 180} for te in MESE_TE]
    mese = sidecar_model("MESE", names, metas).estimation_model(b1_known=True)
    data, sigma = noisy(_simulate(mese, np.stack([m0_se, t2], -1), b1), "MESE")
    _write_members(anat, names, data, aff, metas)
    meta = {"Model": type(mese).__name__, "NoiseSigma": sigma, "NoiseDistribution": "Rician",
            "Units": {"T2map": "s", "M0map": "a.u."},
            "M0Definition": "1000 * PD * (1 - exp(-RepetitionTime / T1))",
            "Simulation": "EPG of the CPMG train (refocusing and excitation scaled by the true "
                          f"B1 of the VFA's TB1map, T1 {mese.t1:g} s in the stimulated-echo "
                          "pathways): no TB1map is given for the MESE collection, so the "
                          "pipeline estimates B1 from the train"}
    _truth(gt_anat, f"{sub}_acq-mese", aff, {"T2map": t2, "M0map": m0_se,
                                             "desc-tissue_dseg": labels}, meta)

    # --- MRF (complex, default schedule, quantised true B1)
    zm = slab(phantom.labels.shape[2], settings.mrf_slices)
    aff_m = slab_affine(phantom.affine, zm)
    lab_m = phantom.labels[..., zm]
    t1m, t2m = np.maximum(phantom.t1[..., zm], 1e-2), np.maximum(phantom.t2[..., zm], 2e-3)
    b1m = np.round(b1_full[..., zm] / MRF_B1_STEP) * MRF_B1_STEP
    m0m = 1000.0 * phantom.pd[..., zm] * np.exp(1j * MRF_M0_PHASE)
    fp = mrf_fingerprints(t1m, t2m, b1m)
    clean = m0m[..., None] * fp
    wm_m = lab_m == 5
    rms = np.sqrt((np.abs(clean[wm_m]) ** 2).mean(-1)) if wm_m.any() else np.ones(1)
    sigma = float(np.median(rms)) / settings.mrf_snr_wm
    sigmas["MRF"] = sigma
    noise = rng.normal(0.0, sigma, clean.shape) + 1j * rng.normal(0.0, sigma, clean.shape)
    mrf_files = write_mrf_series(anat, sub, clean + noise, aff_m, default_mrf_schedule(),
                                 extra_metadata={**common, "PulseSequenceType": "MRF"})
    save_volume(b1m, aff_m, fmap / f"{sub}_acq-mrf_TB1map.nii.gz")
    atomic_write_json(fmap / f"{sub}_acq-mrf_TB1map.json", {
        **common, "IntendedFor": [f"bids::{sub}/anat/{p.name}" for p in mrf_files
                                  if p.name.endswith(".nii.gz")],
        "Description": "relative B1+ (1 = nominal flip angle) on the MRF grid; here the true "
                       "field the simulation used"})
    meta = {"Model": "MRFModel(default_mrf_schedule())", "NoiseSigma": sigma,
            "NoiseDistribution": "complex Gaussian (sigma per real/imaginary channel)",
            "M0Phase": MRF_M0_PHASE,
            "Units": {"T1map": "s", "T2map": "s", "M0map": "a.u. (magnitude)",
                      "TB1map": "relative"}}
    _truth(gt_anat, f"{sub}_acq-mrf", aff_m, {"T1map": t1m, "T2map": t2m, "M0map": np.abs(m0m),
                                              "TB1map": b1m, "desc-tissue_dseg": lab_m}, meta)

    # --- TB1DAM instead of the VFA's TB1map; last, so the other collections' noise is unchanged
    if label in settings.tb1dam_subjects:
        names = [f"{sub}_flip-{i}_TB1DAM" for i in range(1, len(DAM_FLIP_DEG) + 1)]
        metas = [{**common, "PulseSequenceType": "SPGR", "FlipAngle": fa,
                  "RepetitionTime": DAM_TR, "EchoTime": VFA_TE, "IntendedFor": vfa_uris}
                 for fa in DAM_FLIP_DEG]
        sidecar_model("TB1DAM", names, metas)  # the sidecars are a valid double-angle protocol
        spgr = VFAModel(DAM_FLIP_DEG, [DAM_TR] * len(DAM_FLIP_DEG))
        blocks = tuple(DAM_BLOCK if n >= DAM_BLOCK else 1 for n in m0.shape)
        coarse = _block_mean(_simulate(spgr, np.stack([m0, t1], -1), b1), blocks)
        wm_c = _block_mean(wm.astype(np.float64)[..., None], blocks)[..., 0] > 0.5
        sigma = float(np.median(coarse[wm_c].max(-1))) / settings.snr_wm if wm_c.any() else 1.0
        sigmas["TB1DAM"] = sigma
        data = add_rician_noise(coarse, sigma, rng).astype(np.float32)
        # a block's centre lies between the centres of the voxels it holds
        aff_d = aff @ np.diag([*map(float, blocks), 1.0])
        aff_d[:3, 3] = aff[:3, :3] @ ((np.array(blocks) - 1) / 2) + aff[:3, 3]
        _write_members(fmap, names, data, aff_d, metas)
        b1_dam = _block_mean(b1[..., None], blocks)[..., 0]
        _truth(gt_anat, f"{sub}_acq-tb1dam", aff_d, {"TB1map": b1_dam}, {
            "Model": "VFAModel (spoiled gradient echo) at RepetitionTime 10 s, 2x2x2 block means",
            "NoiseSigma": sigma, "NoiseDistribution": "Rician",
            "Units": {"TB1map": "relative"}})
    return sigmas


def _block_mean(data: np.ndarray, blocks: tuple[int, int, int]) -> np.ndarray:
    """Means of ``blocks``-sized blocks of ``data[x, y, z, n]`` (trailing voxels that fill no
    block are dropped): the signal of the bigger voxels."""
    (kx, ky, kz), (nx, ny, nz) = blocks, (n // k for n, k in zip(data.shape[:3], blocks,
                                                                  strict=True))
    data = data[: nx * kx, : ny * ky, : nz * kz]
    return data.reshape(nx, kx, ny, ky, nz, kz, data.shape[-1]).mean(axis=(1, 3, 5))


def _nist_sites(reference_dir: Path) -> list[tuple[str, Path, Path]]:
    out = []
    for t1 in sorted(Path(reference_dir).glob("nist_mncl2_3p0T_*_T1map.nii.gz")):
        stem = t1.name[: -len("_T1map.nii.gz")]
        t2 = t1.with_name(f"{stem}_T2map.nii.gz")
        if t2.is_file():
            out.append((stem.split("_")[-1], t1, t2))
    return out


def write_nist_mrf_subject(out_dir: Path, reference_dir: Path, seed: int,
                           settings: QmriSettings | None = None,
                           label: str = "nistmrf") -> bool:
    """``sub-<label>``: MRF (default schedule) simulated from the measured NIST MnCl2 T1/T2 maps at
    3 T, one ``acq-<site>`` collection per site found in ``reference_dir``; False (with a warning)
    when the maps are missing.

    Voxels of the reference ``_mask`` with T1 in [10 ms, 6 s] and T2 in [2 ms, min(T1, 3 s)] get
    M0 = 1000 (others 0: background). The maps are cropped to the bounding box of those voxels
    (plus 4 voxels) and subsampled in-plane by ``NIST_STRIDE`` (every other voxel: the affine
    doubles the spacing; no averaging, so every voxel keeps a measured value); T1 and T2 are
    quantised on a 1 % logarithmic grid (one EPG run per distinct pair) and the ground truth
    holds the quantised maps. B1 = 1, and noise is complex
    Gaussian with the demo's MRF SNR relative to the median RMS signal of the simulated voxels.
    """
    settings = settings or QmriSettings()
    sites = _nist_sites(Path(reference_dir))
    if not sites:
        LOGGER.warning("demo: no nist_mncl2_3p0T_*_T1map.nii.gz/_T2map.nii.gz in %s; sub-%s "
                       "(NIST MRF) skipped", reference_dir, label)
        return False
    sub = f"sub-{label}"
    anat = Path(out_dir) / sub / "anat"
    gt_anat = Path(out_dir) / "derivatives" / "groundtruth" / sub / "anat"
    rng = np.random.default_rng([seed, 9999])
    for site, t1_path, t2_path in sites:
        img = nib.load(str(t1_path))
        t1 = np.asarray(img.get_fdata(dtype=np.float64))
        t2 = np.asarray(nib.load(str(t2_path)).get_fdata(dtype=np.float64))
        while t1.ndim < 3:
            t1, t2 = t1[..., None], t2[..., None]
        mask_path = t1_path.with_name(t1_path.name.replace("_T1map", "_mask"))
        mask = (np.asarray(nib.load(str(mask_path)).dataobj) > 0) if mask_path.is_file() else (
            np.ones(t1.shape, dtype=bool))
        mask = mask.reshape(t1.shape)
        ok = (mask & np.isfinite(t1) & np.isfinite(t2) & (t1 >= 0.01) & (t1 <= 6.0)
              & (t2 >= 0.002) & (t2 <= 3.0) & (t2 <= t1))
        idx = np.argwhere(ok)
        lo = np.maximum(idx.min(0) - 4, 0)
        hi = np.minimum(idx.max(0) + 5, ok.shape)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        step = (NIST_STRIDE, NIST_STRIDE, 1)
        crop = tuple(slice(c.start, c.stop, k) for c, k in zip(crop, step, strict=True))
        ok, t1, t2 = ok[crop], t1[crop], t2[crop]
        aff = np.array(img.affine, dtype=np.float64)
        aff[:3, 3] = aff[:3, :3] @ lo.astype(np.float64) + aff[:3, 3]
        aff[:3, :3] = aff[:3, :3] @ np.diag(np.asarray(step, dtype=np.float64))
        q1 = np.where(ok, np.exp(np.round(np.log(np.where(ok, t1, 1.0)) / NIST_LOG_STEP)
                                 * NIST_LOG_STEP), 0.0)
        q2 = np.where(ok, np.exp(np.round(np.log(np.where(ok, t2, 1.0)) / NIST_LOG_STEP)
                                 * NIST_LOG_STEP), 0.0)
        q2 = np.minimum(q2, q1)
        fp = np.zeros((*ok.shape, default_mrf_schedule().n_timepoints), dtype=np.complex128)
        fp[ok] = mrf_fingerprints(q1[ok], q2[ok])
        m0 = np.where(ok, 1000.0, 0.0)
        clean = (m0 * np.exp(1j * MRF_M0_PHASE))[..., None] * fp
        rms = np.sqrt((np.abs(clean[ok]) ** 2).mean(-1))
        sigma = float(np.median(rms)) / settings.mrf_snr_wm
        noise = rng.normal(0.0, sigma, clean.shape) + 1j * rng.normal(0.0, sigma, clean.shape)
        prefix = f"{sub}_acq-{site}"
        write_mrf_series(anat, prefix, clean + noise, aff, default_mrf_schedule(),
                         extra_metadata={"MagneticFieldStrength": FIELD,
                                         "PulseSequenceType": "MRF",
                                         "Manufacturer": "qmri-bids demo (simulated)"})
        meta = {"Model": "MRFModel(default_mrf_schedule())",
                "NoiseSigma": sigma, "NoiseDistribution": "complex Gaussian",
                "M0Phase": MRF_M0_PHASE, "Sources": [t1_path.name, t2_path.name],
                "Description": "reference maps cropped, subsampled in-plane by "
                               f"{NIST_STRIDE}, quantised on a 1 % log grid; B1 = 1"}
        _truth(gt_anat, f"{sub}_acq-{site}mrf", aff, {"T1map": q1, "T2map": q2, "M0map": m0,
                                                      "desc-fit_mask": ok.astype(np.int16)},
               meta)
        LOGGER.info("demo: %s MRF written from %s (%d voxels)", sub, t1_path.name, int(ok.sum()))
    return True


def write_groundtruth_readme(gt_dir: Path) -> None:
    atomic_write_text(Path(gt_dir) / "README", (
        "Ground truth of the qmri-bids demo.\n\n"
        "Full phantom grid: sub-XX_{T1map,T2map,T2starmap,PDmap}, sub-XX_desc-tissue_dseg, and "
        "the receive field sub-XX_desc-truefield_{T1w,T2w}.\n"
        "qMRI collections (slab grids): sub-XX_acq-<collection>_{T1map,T2map,M0map,TB1map,"
        "desc-tissue_dseg} with <collection> = vfa, irt1, mese, mrf; each map's JSON gives the "
        "simulating model, NoiseSigma and NoiseDistribution of that collection. Subjects with a "
        "double-angle TB1DAM collection (no VFA TB1map): sub-XX_acq-tb1dam_TB1map on its grid "
        "(2x the VFA voxels).\n"
        "Optional sub-nistmrf: sub-nistmrf_acq-<site>mrf_{T1map,T2map,M0map,desc-fit_mask}.\n"))


__all__ = ["QmriSettings", "b1_field", "mrf_fingerprints", "write_groundtruth_readme",
           "write_nist_mrf_subject", "write_subject_collections"]
