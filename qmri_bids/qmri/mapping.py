"""Map one qMRI collection: network estimate (primary), NLLS / dictionary (reference), CRB SD.

Nipype-free glue between discovery's collections and the physics core: load and validate the
collection (``protocols``), pick its signal model, run the CRB-trained network found for the
protocol (``model_store``), optionally the reference estimators, estimate the noise level and
turn everything into named maps with the BIDS qMRI suffixes. The Nipype interface
(``qmri_bids.interfaces.qmri``) only writes what this returns.

Maps per collection (primary = network, unless stated):

=========  ==========================================================================
VFA        T1map, R1map, M0map
IRT1       T1map, R1map
MESE       T2map, R2map, M0map (dictionary: EPG T2, B1)
MEGRE      T2starmap, R2starmap, S0map
MTS        MTsat (Helms, from the network's T1/M0 of the mt-off pair), T1map, R1map, M0map
MTR        MTRmap (closed form: no estimator to train)
MP2RAGE    UNIT1 and T1map (UNI lookup table of Marques et al.: a 1-D deterministic mapping)
MRF        T1map, T2map, M0map (|M0|); dictionary matching as reference
=========  ==========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmri_bids.errors import BadDataError

LOGGER = logging.getLogger("qmri_bids.qmri")

ESTIMATORS = ("nn", "nlls", "dict")
ZHANG_2022 = ("Zhang X, Duchemin Q, Liu K, Gultekin C, Flassbeck S, Fernandez-Granda C, "
              "Assländer J. Cramér-Rao bound-informed training of neural networks for "
              "quantitative MRI. MRM 2022;88:436-448")

# parameter name -> (BIDS suffix, unit); and the reciprocal maps written beside them
SUFFIXES: dict[str, tuple[str, str]] = {
    "T1": ("T1map", "s"), "T2": ("T2map", "s"), "T2star": ("T2starmap", "s"),
    "R2star": ("R2starmap", "1/s"), "M0": ("M0map", "arbitrary"), "S0": ("S0map", "arbitrary"),
    "MTsat": ("MTsat", "p.u."), "MTR": ("MTRmap", "p.u."), "UNI": ("UNIT1", "arbitrary"),
}
RECIPROCALS = {"T1": ("R1map", "1/s"), "T2": ("R2map", "1/s")}


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


def _model_and_data(collection, protocol, data: np.ndarray):
    """Signal model of the collection and its data in the order the model expects."""
    from qmri_bids.qmri import protocols as pr
    from qmri_bids.qmri.model_store import canonical_order

    if collection.suffix == "MRF":
        from qmri_bids.qmri.models.mrf import MRFModel

        model = MRFModel(protocol, estimate_b1=False)  # ``protocol`` is the MRF schedule
    elif isinstance(protocol, pr.MTSProtocol):
        pair = protocol.t1_pair()
        data = data[..., ~np.asarray(protocol.mt_on)]
        model = pair.model()
    else:
        model = protocol.model()
    perm, model = canonical_order(model)
    if perm.size == data.shape[-1]:
        data = data[..., perm]
    return model, data


def _load(collection):
    """(data [X,Y,Z,N] real or complex, protocol or MRF schedule, affine, excluded)."""
    from qmri_bids.qmri import protocols as pr

    if collection.suffix == "MRF":
        from qmri_bids.qmri.models.mrf import load_mrf_series

        member = collection.members[0]
        try:
            data, affine, schedule = load_mrf_series(member.path, member.metadata)
        except (ValueError, KeyError, OSError) as exc:
            raise BadDataError(f"{member.path}: cannot read the MRF series ({exc})") from exc
        if data.ndim == 3:  # (x, y, t): a single slice
            data = data[:, :, None, :]
        finite = np.isfinite(data)
        if not finite.all():
            LOGGER.warning("%s: %d non-finite values set to 0", member.path.name,
                           int((~finite).sum()))
            data = np.where(finite, data, 0)
        return data, schedule, affine, []
    return pr.load_collection_data(collection)


def resolve_model(collection):
    """(signal model, protocol dict) of a collection from its sidecars only (no image I/O).

    Used before a workflow runs to decide whether the estimator exists or must be trained.
    Returns None for collections mapped in closed form (MTR, MP2RAGE).
    """
    from qmri_bids.qmri import protocols as pr
    from qmri_bids.qmri.model_store import canonical_order, protocol_dict

    if collection.suffix in ("MTR", "MP2RAGE"):
        return None
    if collection.suffix == "MRF":
        from qmri_bids.qmri.models.mrf import MRFModel, read_mrf_schedule

        member = collection.members[0]
        model = MRFModel(read_mrf_schedule(member.path, member.metadata), estimate_b1=False)
    else:
        protocol = pr.protocol_from_collection(collection)
        model = (protocol.t1_pair().model() if isinstance(protocol, pr.MTSProtocol)
                 else protocol.model())
    _, model = canonical_order(model)
    return model, protocol_dict(model)


def _foreground(data: np.ndarray) -> np.ndarray:
    from qmri_bids.qmri import protocols as pr

    mask = pr.object_mask(np.abs(data))
    if not mask.any():
        raise BadDataError("no voxel of the collection is above the background level")
    return mask


def _noise_sigma(model, data, params, mask, b1) -> tuple[float | None, str]:
    from qmri_bids.qmri.predict import noise_sigma_from_background, noise_sigma_from_residuals

    magnitude = np.abs(data) if np.iscomplexobj(data) else data
    sigma = noise_sigma_from_background(magnitude, mask)
    if sigma is not None:
        return float(sigma), "background (Rayleigh median of voxels outside the object)"
    sigma = noise_sigma_from_residuals(model, data, params, mask, b1)
    if sigma is not None:
        return float(sigma), "residuals of the fit inside the object"
    return None, "not estimable (no background and no residual degrees of freedom)"


def _param_maps(names: Iterable[str], values: dict[str, np.ndarray], desc: str | None,
                meta: dict[str, Any]) -> list[ParameterMap]:
    out = []
    for name in names:
        if name not in values or name not in SUFFIXES:
            continue
        suffix, unit = SUFFIXES[name]
        data = np.abs(values[name]) if np.iscomplexobj(values[name]) else values[name]
        out.append(ParameterMap(suffix, desc, data, unit, dict(meta)))
        if name in RECIPROCALS and desc in (None, "nlls", "dict"):
            rsuffix, runit = RECIPROCALS[name]
            with np.errstate(divide="ignore", invalid="ignore"):
                out.append(ParameterMap(rsuffix, desc, 1.0 / data, runit, dict(meta)))
    return out


def _complex_m0(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "M0_re" in values and "M0_im" in values:
        values = {**values, "M0": np.hypot(values["M0_re"], values["M0_im"])}
    return values


def map_collection(
    collection,
    estimators: Iterable[str] = ("nn",),
    estimator_file: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> MappingResult:
    """All maps of ``collection`` (a discovery ``Collection``) with the requested estimators.

    ``estimator_file``: the network's ``.safetensors`` (found or trained beforehand by the
    workflow); when None, the model store looks it up (shipped → cache) or trains it.
    """
    from qmri_bids.qmri import protocols as pr
    from qmri_bids.qmri.model_store import find_or_train, load_estimator, protocol_dict
    from qmri_bids.qmri.predict import crb_sd_maps, estimate_maps

    estimators = tuple(dict.fromkeys(estimators))
    unknown = set(estimators) - set(ESTIMATORS)
    if unknown:
        raise ValueError(f"unknown estimators {sorted(unknown)}")
    raw, protocol, affine, excluded = _load(collection)
    spatial = raw.shape[:-1]
    mask = _foreground(raw)
    b1 = None
    if getattr(collection, "b1map", None) is not None:
        b1 = pr.load_b1map(collection.b1map, spatial)
        mask &= np.isfinite(b1) & (b1 > 0)
    meta: dict[str, Any] = {
        "ExcludedSources": [f"{Path(p).name}: {why}" for p, why in excluded],
        "B1Map": Path(collection.b1map).name if getattr(collection, "b1map", None) else None,
    }
    maps: list[ParameterMap] = []

    if collection.suffix == "MTR":
        on = int(np.argmax(protocol.mt_on))
        off = int(np.argmin(protocol.mt_on))
        with np.errstate(divide="ignore", invalid="ignore"):
            mtr = np.where(mask, 100.0 * (raw[..., off] - raw[..., on]) / raw[..., off], np.nan)
        maps.append(ParameterMap("MTRmap", None, mtr, "p.u.", {
            "EstimationAlgorithm": "MTR = 100 (S_off - S_on) / S_off"}))
        return MappingResult(maps, affine, spatial, meta)

    if collection.suffix == "MP2RAGE":
        model = protocol.model()
        gre = torch.as_tensor(raw)
        uni = model.uni_from_signals(gre)
        t1 = model.t1_from_uni(uni, None if b1 is None else torch.as_tensor(b1))
        algo = {"EstimationAlgorithm": "UNI lookup table (Marques et al., NeuroImage 2010)"}
        maps.append(ParameterMap("UNIT1", None, uni.numpy(), "arbitrary", algo))
        maps += _param_maps(["T1"], {"T1": np.where(mask, t1.numpy(), np.nan)}, None, algo)
        return MappingResult(maps, affine, spatial, meta)

    model, data = _model_and_data(collection, protocol, raw)
    b1_t = None if b1 is None else torch.as_tensor(b1)
    results: dict[str, dict[str, np.ndarray]] = {}

    if "nn" in estimators:
        if estimator_file is not None:
            net, card = load_estimator(Path(estimator_file), model)
        else:
            net, card, estimator_file, _ = find_or_train(model.name, model, protocol_dict(model),
                                                         None, cache_dir)
        results["nn"] = _complex_m0(estimate_maps(net, data, b1=b1, mask=mask, device=device))
        meta["Estimator"] = {"Name": Path(estimator_file).stem,
                             "SHA256": card.get("weights_sha256"),
                             "Loss": card.get("loss"),
                             "ProtocolHash": card.get("protocol_hash")}
    if "nlls" in estimators:
        values = _fit_nlls_in_chunks(model, data, b1, mask)
        if "R2star" in values:
            values["T2star"] = 1.0 / values["R2star"]
        results["nlls"] = _complex_m0(values)
    if "dict" in estimators:
        matched = _dictionary_match(collection, model, data, b1, mask)
        if matched is not None:
            results["dict"] = matched

    reference = results.get("nn") or results.get("nlls") or results.get("dict")
    if reference is None:
        raise ValueError("no estimator produced maps")
    names = [n for n in ("T1", "T2", "T2star", "R2star", "M0", "S0") if n in reference]
    params = np.stack([reference[n] if n in reference else np.full(spatial, np.nan)
                       for n in model.parameter_names], -1)
    sigma, how = _noise_sigma(model, data, params, mask, b1)
    meta["NoiseSigma"] = sigma
    meta["NoiseEstimation"] = how

    algorithms = {
        "nn": f"CRB-trained neural network (Zhang et al. 2022), {model.name} model",
        "nlls": f"non-linear least squares (batched Levenberg-Marquardt), {model.name} model",
        "dict": "dictionary matching (SVD-compressed, maximum inner product)",
    }
    for est, values in results.items():
        desc = None if est == "nn" else est
        if isinstance(protocol, pr.MTSProtocol):
            mts = protocol.model()
            s_mt = torch.as_tensor(raw[..., mts.index_mt])
            mtsat = mts.mtsat(s_mt, torch.as_tensor(values["M0"]), torch.as_tensor(values["T1"]),
                              b1_t).numpy() * 100.0
            values = {**values, "MTsat": np.where(mask, mtsat, np.nan)}
            est_names = [*names, "MTsat"]
        else:
            est_names = names
        maps += _param_maps(est_names, values, desc,
                            {"EstimationAlgorithm": algorithms[est]})
    if sigma is not None:
        sds = crb_sd_maps(model, params, sigma, b1, mask)
        maps += _param_maps([n for n in names if n in sds], sds, "crbsd", {
            "EstimationAlgorithm": "square root of the Cramér-Rao bound at the primary "
                                   "estimate and the measured noise level",
            "Description": "per-voxel standard deviation that an efficient unbiased estimator "
                           "would reach (uncertainty map)"})
    return MappingResult(maps, affine, spatial, meta)


def _fit_nlls_in_chunks(model, data: np.ndarray, b1: np.ndarray | None,
                        mask: np.ndarray) -> dict[str, np.ndarray]:
    """NLLS over the masked voxels in chunks, so that Jacobians of long signals (MRF: 1000
    outputs per voxel) stay within memory; forward-mode Jacobians where outputs outnumber
    parameters."""
    from qmri_bids.qmri.nlls import fit_nlls

    n_out = data.shape[-1] * (2 if np.iscomplexobj(data) else 1)
    chunk = max(64, int(2**22 // max(n_out * model.n_parameters, 1)))
    mode = "fwd" if n_out > 4 * model.n_parameters else "rev"
    index = np.flatnonzero(mask.reshape(-1))
    flat = data.reshape(-1, data.shape[-1])
    flat_b1 = None if b1 is None else b1.reshape(-1)
    params = np.full((flat.shape[0], model.n_parameters), np.nan)
    for start in range(0, index.size, chunk):
        sel = index[start:start + chunk]
        fit = fit_nlls(model, torch.as_tensor(flat[sel]),
                       b1=None if flat_b1 is None else torch.as_tensor(flat_b1[sel]),
                       jacobian_mode=mode)
        params[sel] = fit.params.detach().cpu().numpy()
    return {n: params[:, i].reshape(mask.shape) for i, n in enumerate(model.parameter_names)}


def _dictionary_match(collection, model, data, b1, mask) -> dict[str, np.ndarray] | None:
    """Dictionary matching where it is the field's reference method (MRF, EPG-MESE)."""
    from qmri_bids.qmri.dictionary import (
        DictionaryMatcher,
        default_mese_epg_grid,
        default_mrf_grid,
    )

    if collection.suffix == "MRF":
        # With a TB1map each voxel is matched against the atoms of its B1 (grid step 0.05:
        # under 2.5 % flip-angle error); without one the grid assumes B1 = 1.
        b1_axis = None
        if b1 is not None:
            lo, hi = np.nanpercentile(b1[mask], [0.5, 99.5])
            b1_axis = np.arange(np.floor(lo * 20) / 20, np.ceil(hi * 20) / 20 + 1e-9, 0.05)
        grid = default_mrf_grid(b1=b1_axis)
        dict_model = model
    elif collection.suffix == "MESE":
        from qmri_bids.qmri.models.mese_epg import MESEEPG

        dict_model = MESEEPG.from_echo_times(model.echo_time.tolist())
        grid = default_mese_epg_grid()
    else:
        LOGGER.info("dictionary matching is not a reference method for %s: skipped",
                    collection.suffix)
        return None
    matcher = DictionaryMatcher(dict_model, grid)
    known_b1 = None if b1 is None or collection.suffix != "MRF" else torch.as_tensor(b1)
    fit = matcher.match(torch.as_tensor(data), b1=known_b1, mask=torch.as_tensor(mask))
    values = {k: np.where(mask, v.detach().cpu().numpy() if torch.is_tensor(v) else v, np.nan)
              for k, v in fit.maps.items()}
    m0 = fit.m0.detach().cpu().numpy() if torch.is_tensor(fit.m0) else fit.m0
    values["M0"] = np.where(mask, np.abs(m0), np.nan)
    return values
