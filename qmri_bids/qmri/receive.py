"""Receive-corrected proton density (``PDmap``) from the M0 of a T1 mapping collection.

The M0 that VFA, MTS (its mt-off pair) and the TR-aware IR model estimate is the proton density
times the coil's receive sensitivity (and a scanner gain). As in the hMRI toolbox (Weiskopf et
al., Front. Neurosci. 2013;7:95; Tabelow et al., NeuroImage 2019;194:191), the receive field is
estimated as the smooth multiplicative bias field of the M0 map and divided out, and the
corrected M0 is scaled to water:

1. **receive field** (``method``): the project's bias-field CNN on the M0 map
   (:func:`qmri_bids.bias.inference.correct_bias_cnn`, the shipped model, default) or N4
   (:func:`qmri_bids.bias.n4.n4_correct`, the baseline), inside the voxels that were estimated;
   normalised to a median of 1 there, so that the corrected M0 keeps the M0's scale. ``"none"``
   leaves the receive field in (for comparison).
2. **reference region**: a user-given region with its PD (:class:`PDReference`), else the CSF,
   found by one rule: the voxels with T1 > ``CSF_T1_MIN`` (2.5 s: CSF is ~4 s at 1.5-7 T, no brain
   tissue is above ~2 s) and, of those, the brighter class of a two-class Otsu split of their
   log M0 (the long-T1 voxels also hold partial-volume and noisy voxels, which are darker), when
   the two classes differ by more than ``CLASS_GAP`` (25 %, the PD step from GM to CSF); else
   all of them. It needs at least ``MIN_REFERENCE_VOXELS`` voxels, and its median M0 must not be
   below that of the whole object (water has the highest PD in the head): otherwise there is no
   usable reference.
3. **scaling**: PD = value · M0_corr / median(M0_corr in the reference), value = 100 p.u. for CSF
   (pure water) or the user's. hMRI calibrates to a white-matter PD of 69 p.u. instead; that
   needs a tissue segmentation, CSF only T1.

Without a usable reference the receive-corrected M0 is written unscaled (``desc-rcorr_M0map``)
and no PDmap. The receive field is written as ``desc-<method>_RB1map`` (BIDS: receive (B1−)
sensitivity map, arbitrary units). The PD is PD* in the hMRI sense: the M0 includes the
transverse decay at the echo time (exp(−TE/T2*), exp(−TE/T2) for spin-echo readouts), which is
not corrected here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmri_bids.errors import BadDataError

LOGGER = logging.getLogger("qmri_bids.qmri")

RECEIVE_METHODS = ("cnn", "n4", "none")
#: T1 above which a voxel may be CSF (s)
CSF_T1_MIN = 2.5
#: relative M0 gap between the two classes of long-T1 voxels for the brighter to be taken alone
CLASS_GAP = 0.25
MIN_REFERENCE_VOXELS = 20
#: PD of the CSF reference (p.u., percent water)
CSF_PD = 100.0

WEISKOPF_2013 = ("Weiskopf N, Suckling J, Williams G, Correia MM, Inkster B, Tait R, Ooi C, "
                 "Bullmore ET, Lutti A. Quantitative multi-parameter mapping of R1, PD*, MT, and "
                 "R2* at 3T: a multi-center validation. Front Neurosci 2013;7:95")
TABELOW_2019 = ("Tabelow K, Balteau E, Ashburner J, et al. hMRI - A toolbox for quantitative MRI "
                "in neuroscience and clinical research. NeuroImage 2019;194:191-210")
SIMKO_2022 = ("Simko A, Lofstedt T, Garpebring A, Nyholm T, Jonsson J. MRI bias field correction "
              "with an implicitly trained CNN. MIDL 2022, PMLR 172:1125-1138")
TUSTISON_2010 = ("Tustison NJ, Avants BB, Cook PA, et al. N4ITK: improved N3 bias correction. "
                 "IEEE TMI 2010;29:1310-1320")


@dataclass(frozen=True)
class PDReference:
    """A reference region for the PD scale: a mask on the collection's grid and its PD (p.u.)."""

    mask: np.ndarray
    value: float = CSF_PD
    name: str = "user-given reference region"


@dataclass
class ProtonDensityResult:
    """What :func:`proton_density` made of an M0 map (NaN outside the estimated voxels)."""

    m0_corrected: np.ndarray
    pd: np.ndarray | None  # p.u.; None without a usable reference
    receive: np.ndarray | None  # relative receive field; None for method "none"
    reference_mask: np.ndarray | None
    correction: dict[str, Any] = field(default_factory=dict)  # sidecar: how the field was removed
    reference: dict[str, Any] = field(default_factory=dict)  # sidecar: what scaled the PD

    def maps(self) -> list[tuple[str, str | None, np.ndarray, str, dict[str, Any]]]:
        """(suffix, desc, data, unit, sidecar fields) of the maps to write."""
        common = {"ReceiveFieldCorrection": self.correction, "PDReference": self.reference}
        out = []
        if self.pd is not None:
            out.append(("PDmap", None, self.pd, "p.u.", {
                **common,
                "EstimationAlgorithm": "receive-corrected M0 scaled to water: " + (
                    f"{self.reference['Value']:g} p.u. x M0_corr / median of M0_corr in the "
                    f"reference region ({self.reference['Region']})"),
                "Description": "proton density in percent of water (PD*: the transverse decay "
                               "at the echo time is not corrected)",
                "EstimationReference": [r for r in (WEISKOPF_2013, TABELOW_2019,
                                                    self.correction.get("Reference")) if r]}))
        elif self.correction.get("Method") != "none":
            out.append(("M0map", "rcorr", self.m0_corrected, "arbitrary", {
                **common,
                "EstimationAlgorithm": "M0 divided by the estimated receive field; not scaled to "
                                       "water: no usable reference region",
                "Description": "receive-corrected M0 (proportional to proton density)",
                "EstimationReference": self.correction.get("Reference")}))
        if self.receive is not None:
            out.append(("RB1map", self.correction["Method"], self.receive, "arbitrary", {
                "ReceiveFieldCorrection": self.correction,
                "EstimationAlgorithm": self.correction["Description"],
                "EstimationReference": self.correction.get("Reference"),
                "Description": "relative receive (B1-) sensitivity: M0 = receive x M0_corr; "
                               "median 1 over the estimated voxels"}))
        return out


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the three array axes of ``affine``."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def estimate_receive_field(m0: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...],
                           method: str = "cnn", device: str = "cpu",
                           bias_model: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The smooth multiplicative field of ``m0`` inside ``mask`` (median 1 there) and its
    sidecar description. ``bias_model``: a loaded :class:`~qmri_bids.bias.weights.BiasModel`
    (default: the shipped one). BadDataError when the map cannot carry an estimate."""
    if method not in RECEIVE_METHODS or method == "none":
        raise ValueError(f"receive-field method must be 'cnn' or 'n4', got {method!r}")
    valid = mask & np.isfinite(m0) & (m0 > 0)
    if valid.sum() < MIN_REFERENCE_VOXELS:
        raise BadDataError(f"only {int(valid.sum())} voxels with a positive M0: too few for a "
                           "receive field")
    # Failed fits (M0 orders of magnitude off) would steer a field that must follow the object.
    valid &= m0 < 10.0 * np.median(m0[valid])
    image = np.where(valid, m0, 0.0)
    if method == "cnn":
        from qmri_bids.bias.inference import correct_bias_cnn
        from qmri_bids.bias.weights import load_model

        model = bias_model if bias_model is not None else load_model(device=device)
        _, receive = correct_bias_cnn(image, spacing, model, device=device, mask=valid)
        meta = {"Method": "cnn", "Model": model.name, "SHA256": model.sha256,
                "Description": "smooth multiplicative bias field of the M0 map estimated by the "
                               "implicitly trained bias-field CNN",
                "Reference": SIMKO_2022}
    else:
        from qmri_bids.bias.n4 import N4Settings, n4_correct

        _, receive = n4_correct(image, tuple(spacing), mask=valid)
        meta = {"Method": "n4", "Settings": N4Settings().as_dict(),
                "Description": "smooth multiplicative bias field of the M0 map estimated by N4 "
                               "(SimpleITK, fMRIPrep settings)",
                "Reference": TUSTISON_2010}
    receive = np.asarray(receive, dtype=np.float64).reshape(m0.shape)
    receive = receive / np.median(receive[valid])
    meta["Description"] += ("; M0 was divided by it (median 1 over the estimated voxels), as in "
                            "the hMRI toolbox")
    return receive, meta


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values, nbins=128))


def csf_reference(m0_corrected: np.ndarray, t1: np.ndarray, mask: np.ndarray
                  ) -> tuple[np.ndarray | None, str]:
    """The CSF voxels that scale PD (the rule in the module docstring), or None and why not."""
    m0c = np.where(mask, m0_corrected, np.nan)
    positive = np.isfinite(m0c) & (m0c > 0)
    long_t1 = positive & np.isfinite(t1) & (t1 > CSF_T1_MIN)
    n_long = int(long_t1.sum())
    if n_long < MIN_REFERENCE_VOXELS:
        return None, (f"only {n_long} voxels with T1 > {CSF_T1_MIN:g} s (need "
                      f"{MIN_REFERENCE_VOXELS} for a CSF reference)")
    values = m0c[long_t1]
    csf = long_t1
    how = f"all {n_long} voxels with T1 > {CSF_T1_MIN:g} s"
    if np.ptp(np.log(values)) > 0:
        cut = np.exp(_otsu(np.log(values)))
        upper, lower = values[values >= cut], values[values < cut]
        if (upper.size >= MIN_REFERENCE_VOXELS and lower.size
                and np.median(upper) > (1.0 + CLASS_GAP) * np.median(lower)):
            csf = long_t1 & (m0c >= cut)
            how = (f"the brighter Otsu class of the {n_long} voxels with T1 > {CSF_T1_MIN:g} s "
                   f"({upper.size} voxels, M0 >= {cut:.4g})")
    tissue = float(np.median(m0c[positive]))
    reference = float(np.median(m0c[csf]))
    if reference < tissue:
        return None, (f"the long-T1 voxels ({how}) are darker than the object (median M0 "
                      f"{reference:.4g} < {tissue:.4g}): they are not CSF")
    return csf, how


def proton_density(m0: np.ndarray, t1: np.ndarray | None, mask: np.ndarray,
                   spacing: tuple[float, ...], *, method: str = "cnn",
                   reference: PDReference | None = None, device: str = "cpu",
                   bias_model: Any = None) -> ProtonDensityResult:
    """Receive-corrected M0 and, with a usable reference region, the PD map in p.u. (see the
    module docstring). ``mask``: the voxels that were estimated."""
    if method not in RECEIVE_METHODS:
        raise ValueError(f"unknown receive-field method {method!r} (known: "
                         f"{', '.join(RECEIVE_METHODS)})")
    mask = np.asarray(mask, dtype=bool)
    m0 = np.where(mask, np.asarray(m0, dtype=np.float64), np.nan)
    if method == "none":
        receive = None
        correction: dict[str, Any] = {"Method": "none",
                                      "Description": "receive field not removed"}
        m0c = m0
    else:
        receive, correction = estimate_receive_field(m0, mask, spacing, method, device,
                                                     bias_model)
        m0c = m0 / receive
    ref_mask, why = None, ""
    if reference is not None:
        user = np.asarray(reference.mask, dtype=bool).reshape(mask.shape)
        ref_mask = user & mask & np.isfinite(m0c) & (m0c > 0)
        value, region = float(reference.value), reference.name
        if not ref_mask.any():
            ref_mask, why = None, f"{reference.name} holds no estimated voxel with M0 > 0"
    else:
        value, region = CSF_PD, "CSF"
        if t1 is None:
            why = "no T1 map to find the CSF"
        else:
            ref_mask, why = csf_reference(m0c, np.asarray(t1, dtype=np.float64), mask)
            region = f"CSF: {why}"
    if ref_mask is None:
        LOGGER.warning("PD: no usable reference region (%s): writing the receive-corrected M0 "
                       "unscaled (desc-rcorr_M0map) and no PDmap", why)
        return ProtonDensityResult(m0c, None, receive, None, correction,
                                   {"Region": None, "Reason": why})
    scale = float(np.median(m0c[ref_mask]))
    pd = value * m0c / scale
    LOGGER.info("PD: receive field by %s; %s (%d voxels, median corrected M0 %.4g) = %g p.u.",
                correction["Method"], region, int(ref_mask.sum()), scale, value)
    return ProtonDensityResult(m0c, pd, receive, ref_mask, correction,
                               {"Region": region, "Voxels": int(ref_mask.sum()),
                                "MedianM0": scale, "Value": value, "Unit": "p.u."})


__all__ = [
    "CSF_T1_MIN",
    "RECEIVE_METHODS",
    "PDReference",
    "ProtonDensityResult",
    "csf_reference",
    "estimate_receive_field",
    "proton_density",
    "voxel_spacing",
]
