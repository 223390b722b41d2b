"""Map one qMRI collection: the planned estimators, the noise level, the CRB SD, named maps.

Nipype-free glue between a collection, its plan (:mod:`qmri_bids.qmri.plan`) and the estimators
(:mod:`qmri_bids.qmri.estimators`): read the members the plan names, run each planned estimator
on what the model says it fits, let the model derive its other quantities, estimate the noise,
and turn everything into maps named with the model's BIDS qMRI suffixes (``outputs``). The
Nipype interface (``qmri_bids.interfaces.qmri``) only writes what this returns.

Maps per collection: each model's ``outputs`` (e.g. VFA: T1map, R1map, M0map; MTS: also MTsat;
MTR: MTRmap; MP2RAGE: UNIT1, T1map, R1map), from the primary estimator (the network, or the
closed form), ``desc-nlls``/``desc-dict`` from the reference estimators and ``desc-crbsd``: the
Cramér-Rao standard deviation at the primary estimate and the measured noise level. Models whose
M0 is a proton density (``proton_density``: VFA, MTS, TR-aware IR) also get a receive-corrected
``PDmap`` and the receive field (``desc-<method>_RB1map``) from the primary M0
(:mod:`qmri_bids.qmri.receive`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmri_bids.qmri.base import MapSpec, ProtonDensitySpec
from qmri_bids.qmri.estimators import FitContext, MapSet, make_estimator
from qmri_bids.qmri.plan import CollectionPlan
from qmri_bids.qmri.receive import PDReference

LOGGER = logging.getLogger("qmri_bids.qmri")

ZHANG_2022 = ("Zhang X, Duchemin Q, Liu K, Gultekin C, Flassbeck S, Fernandez-Granda C, "
              "Assländer J. Cramér-Rao bound-informed training of neural networks for "
              "quantitative MRI. MRM 2022;88:436-448")


@dataclass
class ParameterMap:
    """One output map: ``suffix`` (BIDS qMRI suffix), ``desc`` (None = primary)."""

    suffix: str
    desc: str | None
    data: np.ndarray
    units: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class MappingResult:
    maps: list[ParameterMap]
    affine: np.ndarray
    shape: tuple[int, ...]
    metadata: dict[str, Any]  # common sidecar fields (protocol, noise, model...)
    mask: np.ndarray  # the voxels that were estimated
    mapsets: list[MapSet] = field(default_factory=list)  # per estimator, primary first


def _output_maps(outputs: Iterable[MapSpec], values: dict[str, np.ndarray], desc: str | None,
                 meta: dict[str, Any], reciprocals: bool = True,
                 derived: dict[str, dict[str, Any]] | None = None) -> list[ParameterMap]:
    """``derived``: the model's sidecar fields per output (``derived_metadata``); its
    ``EstimationAlgorithm`` comes first, then the estimator's that gave its inputs."""
    out = []
    for spec in outputs:
        if spec.name not in values:
            continue
        data = values[spec.name]
        data = np.abs(data) if np.iscomplexobj(data) else data
        spec_meta = dict(meta)
        extra = (derived or {}).get(spec.name, {})
        if extra:
            spec_meta.update(extra)
            if "EstimationAlgorithm" in extra and "EstimationAlgorithm" in meta:
                spec_meta["EstimationAlgorithm"] = (f"{extra['EstimationAlgorithm']}; from the "
                                                    f"estimates of {meta['EstimationAlgorithm']}")
        out.append(ParameterMap(spec.suffix, desc, data, spec.unit, spec_meta))
        if spec.reciprocal and reciprocals:
            with np.errstate(divide="ignore", invalid="ignore"):
                out.append(ParameterMap(spec.reciprocal[0], desc, 1.0 / data, spec.reciprocal[1],
                                        dict(spec_meta)))
    return out


def _noise_sigma(model, data, params, mask, b1, background: float | None
                 ) -> tuple[float | None, str]:
    from qmri_bids.qmri.predict import noise_sigma_from_residuals

    if background is not None:
        return background, "background (Rayleigh median of voxels outside the object)"
    sigma = noise_sigma_from_residuals(model, data, params, mask, b1)
    if sigma is not None:
        return float(sigma), "residuals of the fit inside the object"
    return None, "not estimable (no background and no residual degrees of freedom)"


def _nlls_as_primary(mapsets: list[MapSet], model, est_model, est_data: np.ndarray,
                     raw: np.ndarray, mask: np.ndarray, b1: np.ndarray | None,
                     context: FitContext) -> list[MapSet]:
    """The network failed its validation (:mod:`qmri_bids.qmri.gate`): NLLS makes the primary
    maps and the network's maps are kept beside them as ``desc-nn`` for comparison."""
    network = mapsets[0]
    nlls = next((m for m in mapsets if m.estimator == "nlls"), None)
    if nlls is None:
        nlls = make_estimator("nlls", context).fit(est_model, est_data, mask=mask, b1=b1,
                                                   noise=None)
        nlls.values = model.derived_maps(nlls.values, raw, b1, mask)
    reason = "; ".join(network.metadata.get("EstimatorValidation", {}).get("Reasons", []))
    nlls.desc = None
    nlls.algorithm += (" (primary estimate: the network failed its validation at the data's "
                       f"noise level: {reason})")
    network.desc = "nn"
    return [nlls, network, *(m for m in mapsets[1:] if m is not nlls)]


def map_collection(
    collection,
    plan: CollectionPlan,
    *,
    estimator_file: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
    mask: np.ndarray | None = None,
    b1map: Path | None = None,
    receive_method: str = "cnn",
    pd_reference: PDReference | None = None,
) -> MappingResult:
    """All maps of ``collection`` (a discovery ``Collection``) as ``plan`` decided.

    ``estimator_file``: the network's ``.safetensors`` when it was trained after the plan was
    made (the training sub-workflow); otherwise the plan's network, or, when the plan says
    "train on demand", one found or trained now into ``cache_dir``. ``mask``: the voxels to
    estimate (default: the foreground of the data). ``b1map``: the B1+ map, on the collection's
    grid, that another collection provides (``plan.b1_provider``); a TB1map of the collection's
    own (``collection.b1map``, from fmap/) wins. ``receive_method`` (``cnn``, ``n4``, ``none``)
    and ``pd_reference``: how the PD map of a model with a ``proton_density`` is made
    (:mod:`qmri_bids.qmri.receive`).
    """
    from qmri_bids.qmri import protocols as pr
    from qmri_bids.qmri.predict import crb_sd_maps, noise_sigma_from_background

    model = plan.model()
    by_path = {str(m.path): m for m in collection.members}
    members = [by_path[p] for p in plan.members]
    raw, affine = type(model).read_images(members)
    spatial = raw.shape[:-1]
    fg = pr.foreground_mask(raw) if mask is None else np.asarray(mask, bool).reshape(spatial)
    b1 = None
    b1_path = getattr(collection, "b1map", None) or b1map
    if b1_path is not None:
        b1 = pr.load_b1map(b1_path, spatial)
        fg &= np.isfinite(b1) & (b1 > 0)
    meta: dict[str, Any] = {
        "ExcludedSources": [f"{name}: {why}" for name, why in plan.excluded],
        "B1Map": Path(collection.b1map).name if getattr(collection, "b1map", None) else None,
    }
    est_model = model.estimation_model(b1_known=b1 is not None)
    est_data = model.estimation_data(raw)
    background = None
    if not plan.closed_form:
        magnitude = np.abs(est_data) if np.iscomplexobj(est_data) else est_data
        background = noise_sigma_from_background(magnitude, fg)
    if estimator_file is None and plan.network is not None:
        estimator_file = plan.network.weights
    context = FitContext(weights=None if estimator_file is None else Path(estimator_file),
                         cache_dir=cache_dir, device=device)
    mapsets = []
    for name in plan.estimators:
        mapset = make_estimator(name, context).fit(est_model, est_data, mask=fg, b1=b1,
                                                   noise=background)
        mapset.values = model.derived_maps(mapset.values, raw, b1, fg)
        meta.update(mapset.metadata)
        mapsets.append(mapset)
    if mapsets and mapsets[0].passed_validation is False:
        mapsets = _nlls_as_primary(mapsets, model, est_model, est_data, raw, fg, b1, context)
    if mapsets:
        meta["PrimaryEstimator"] = mapsets[0].estimator

    outputs = type(model).outputs
    maps: list[ParameterMap] = []
    sigma = None
    if not plan.closed_form:
        primary = mapsets[0]
        params = primary.parameters(est_model, spatial)
        sigma, how = _noise_sigma(est_model, est_data, params, fg, b1, background)
        meta["NoiseSigma"] = sigma
        meta["NoiseEstimation"] = how
    derived = model.derived_metadata(b1)
    for mapset in mapsets:
        maps += _output_maps(outputs, mapset.values, mapset.desc,
                             {"EstimationAlgorithm": mapset.algorithm}, derived=derived)
    if sigma is not None:
        sds = crb_sd_maps(est_model, params, sigma, b1, fg)
        maps += _output_maps(outputs, sds, "crbsd", {
            "EstimationAlgorithm": "square root of the Cramér-Rao bound at the primary "
                                   "estimate and the measured noise level",
            "Description": "per-voxel standard deviation that an efficient unbiased estimator "
                           "would reach (uncertainty map)"}, reciprocals=False)
    if type(model).proton_density is not None and mapsets:
        maps += _proton_density_maps(type(model).proton_density, mapsets[0], fg, affine,
                                     receive_method, pd_reference, device, collection)
    return MappingResult(maps, affine, spatial, meta, fg, mapsets)


def _proton_density_maps(spec: ProtonDensitySpec, primary: MapSet, mask: np.ndarray,
                         affine: np.ndarray, method: str, reference: PDReference | None,
                         device: str, collection) -> list[ParameterMap]:
    """PDmap (or the unscaled ``desc-rcorr_M0map``) and the receive field from the primary
    estimate's M0 and T1; an M0 map that cannot carry a receive field (too small, empty) only
    costs the PD map, with a warning."""
    from qmri_bids.errors import BadDataError
    from qmri_bids.qmri.receive import proton_density, voxel_spacing

    if spec.m0 not in primary.values:
        return []
    try:
        result = proton_density(primary.values[spec.m0], primary.values.get(spec.t1), mask,
                                voxel_spacing(affine), method=method, reference=reference,
                                device=device)
    except BadDataError as exc:
        LOGGER.warning("%s collection (%s): no PD map: %s", collection.suffix,
                       Path(collection.members[0].path).name, exc)
        return []
    return [ParameterMap(suffix, desc, data, unit,
                         {**meta, "M0Source": primary.algorithm})
            for suffix, desc, data, unit, meta in result.maps()]
