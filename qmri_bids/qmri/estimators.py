"""One interface for every way of turning a collection's data into parameter maps.

In the spirit of DIPY's ``Model.fit(data) -> Fit``: an :class:`Estimator` is registered by name
(``ESTIMATORS``) and fits a signal model to data ::

    make_estimator("nlls", context).fit(model, data, mask=mask, b1=b1, noise=sigma) -> MapSet

* ``"nn"``: the CRB-trained network of the protocol (Zhang et al. 2022), the primary estimate;
* ``"nlls"``: bounded Levenberg-Marquardt non-linear least squares (reference);
* ``"dict"``: dictionary matching, where the model names a dictionary (MRF, EPG MESE);
* ``"closed-form"``: the model's own formula (MTR, MP2RAGE).

``data[..., N]`` holds the members in the model's order, ``mask`` the voxels to estimate (NaN
elsewhere), ``b1`` the relative B1+ map or None, ``noise`` the noise level σ measured in the
background (None when there is none). Which estimators apply to a model is the model's
``estimators``; the run's plan (:mod:`qmri_bids.qmri.plan`) picks them.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from qmri_bids.progress import progress
from qmri_bids.qmri.base import CLOSED_FORM, SignalModel

LOGGER = logging.getLogger("qmri_bids.qmri")

#: the order estimators run and are reported in (the first that runs is the primary estimate)
ESTIMATOR_ORDER = ("nn", "nlls", "dict", CLOSED_FORM)


@dataclass
class MapSet:
    """What one estimator made of a collection.

    Attributes:
        estimator: registry name of the estimator.
        desc: BIDS ``desc`` entity of its maps (None: the primary maps).
        values: estimate name -> map ``[...]`` (model parameters, then derived quantities added
            by the model's ``derived_maps``); NaN outside the mask.
        algorithm: ``EstimationAlgorithm`` of the maps' sidecars.
        metadata: sidecar fields common to the collection's maps (the network's name and hash).
        diagnostics: per-voxel information that is not a map (NLLS convergence).
        passed_validation: the network's verdict at the data's noise level
            (:mod:`qmri_bids.qmri.gate`); None for estimators that are not gated.
    """

    estimator: str
    desc: str | None
    values: dict[str, np.ndarray]
    algorithm: str
    metadata: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)
    passed_validation: bool | None = None

    def parameters(self, model: SignalModel, shape: tuple[int, ...]) -> np.ndarray:
        """``[..., P]`` in ``model``'s parameter order (NaN for parameters it did not estimate)."""
        return np.stack([self.values.get(n, np.full(shape, np.nan))
                         for n in model.parameter_names], -1)


@dataclass(frozen=True)
class FitContext:
    """What estimators may need beyond the data: the network file, where to cache a network
    trained on demand, and the torch device."""

    weights: Path | None = None
    cache_dir: Path | None = None
    device: str = "cpu"


class Estimator(abc.ABC):
    """Fits a signal model to the data of one collection (see the module docstring)."""

    name: ClassVar[str]
    desc: ClassVar[str | None]

    def __init__(self, context: FitContext) -> None:
        self.context = context

    @abc.abstractmethod
    def fit(self, model: SignalModel, data: np.ndarray, *, mask: np.ndarray,
            b1: np.ndarray | None, noise: float | None) -> MapSet:
        """Estimates of ``model``'s parameters from ``data[..., N]`` inside ``mask``."""


ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: make ``cls`` available as ``ESTIMATORS[cls.name]``."""
    ESTIMATORS[cls.name] = cls
    return cls


def make_estimator(name: str, context: FitContext | None = None) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r} (known: {', '.join(ESTIMATORS)})")
    return ESTIMATORS[name](context or FitContext())


def _masked(values: dict[str, Any], mask: np.ndarray) -> dict[str, np.ndarray]:
    def array(v: Any) -> np.ndarray:
        return v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)

    return {k: np.where(mask, array(v), np.nan) for k, v in values.items()}


@register
class NetworkEstimator(Estimator):
    """The CRB-trained network of the model's protocol (trained on demand when none exists),
    validated at the data's noise level before its maps count (:mod:`qmri_bids.qmri.gate`),
    with its extrapolated voxels refitted by NLLS."""

    name = "nn"
    desc = None

    def fit(self, model: SignalModel, data: np.ndarray, *, mask: np.ndarray,
            b1: np.ndarray | None, noise: float | None) -> MapSet:
        from qmri_bids.qmri import gate
        from qmri_bids.qmri.model_store import find_or_train, load_estimator
        from qmri_bids.qmri.predict import estimate_maps

        weights = self.context.weights
        if weights is not None:
            net, card = load_estimator(Path(weights), model)
        else:
            net, card, weights, _ = find_or_train(model, cache_dir=self.context.cache_dir)
        name = Path(weights).stem
        if noise is not None:
            _check_snr(data, mask, noise, card, name)
        values = estimate_maps(net, data, b1=b1, mask=mask, device=self.context.device)
        snr = gate.data_snr(data, mask, noise)
        verdict = gate.validate_network(net, model, snr if snr is not None else
                                        gate.REFERENCE_SNR)
        if not verdict.passed:
            LOGGER.warning("%s failed its validation at SNR %.3g (%s): the primary maps come "
                           "from NLLS instead", name, verdict.snr, "; ".join(verdict.reasons))
        validation = {**verdict.to_json(),
                      "SNRSource": "measured in the data (brightest member / background σ)"
                      if snr is not None else "reference SNR (no background noise estimate)",
                      "CardValidation": card.get("validation", {}).get("efficiency_median")}
        flags = gate.suspicious_voxels(net, model, data, values, mask, b1, noise)
        if verdict.passed:
            values, refit = _refit_with_nlls(model, data, values, flags, b1)
        else:  # NLLS maps every voxel; the network's own maps are kept as they are (desc-nn)
            refit = {"Count": 0, "Reasons": {k: int(v.sum()) for k, v in flags.items()},
                     "Method": "none: the network failed its validation and NLLS makes the "
                               "primary maps"}
        return MapSet(self.name, self.desc, values,
                      f"CRB-trained neural network (Zhang et al. 2022), {model.name} model",
                      metadata={"Estimator": {"Name": name,
                                              "SHA256": card.get("sha256"),
                                              "Loss": card.get("loss"),
                                              "ProtocolHash": card.get("protocol_hash")},
                                "EstimatorValidation": validation,
                                "RefitVoxels": refit},
                      diagnostics={"refit": np.any(list(flags.values()), axis=0)},
                      passed_validation=verdict.passed)


def _check_snr(data: np.ndarray, mask: np.ndarray, noise: float, card: dict[str, Any],
               name: str) -> None:
    """Warn when the data's SNR lies outside the range the network was trained on: its
    estimates there are extrapolations (the training SNR is the brightest member over σ)."""
    trained = card.get("snr_range")
    if not trained or noise <= 0:
        return
    snr = float(np.median(np.abs(data[mask]).max(-1))) / noise
    if not trained[0] <= snr <= trained[1]:
        LOGGER.warning("%s: the median SNR of the data (%.3g) is outside the SNR range the "
                       "network was trained on (%g-%g): its estimates may be biased; compare "
                       "with --qmri-estimator nlls", name, snr, trained[0], trained[1])


def _refit_with_nlls(model: SignalModel, data: np.ndarray, values: dict[str, np.ndarray],
                     flags: dict[str, np.ndarray], b1: np.ndarray | None
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """NLLS on the voxels the safety net flagged; their network values are replaced."""
    refit = np.any(list(flags.values()), axis=0)
    counts = {k: int(v.sum()) for k, v in flags.items()}
    summary: dict[str, Any] = {"Count": int(refit.sum()), "Reasons": counts,
                               "Method": "non-linear least squares (batched Levenberg-Marquardt)"
                                         " from the model's initial guess"}
    if not refit.any():
        return values, summary
    LOGGER.info("%s: %d voxel(s) refitted with NLLS (%s)", model.name, int(refit.sum()),
                ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    nlls = NllsEstimator(FitContext()).fit(model, data, mask=refit, b1=b1, noise=None)
    merged = {k: np.where(refit, nlls.values[k], v) if k in nlls.values else v
              for k, v in values.items()}
    return merged, summary


@register
class NllsEstimator(Estimator):
    """Bounded Levenberg-Marquardt from the model's initial guess, voxel by voxel."""

    name = "nlls"
    desc = "nlls"

    def fit(self, model: SignalModel, data: np.ndarray, *, mask: np.ndarray,
            b1: np.ndarray | None, noise: float | None) -> MapSet:
        from qmri_bids.qmri.nlls import fit_nlls

        # Chunks keep the Jacobians of long signals (MRF: 1000 real outputs per voxel) within
        # memory; fit_nlls differentiates as the CRB does for the same model ("auto").
        n_out = data.shape[-1] * (2 if np.iscomplexobj(data) else 1)
        chunk = max(64, int(2**22 // max(n_out * model.n_parameters, 1)))
        index = np.flatnonzero(mask.reshape(-1))
        flat = data.reshape(-1, data.shape[-1])
        flat_b1 = None if b1 is None else b1.reshape(-1)
        params = np.full((flat.shape[0], model.n_parameters), np.nan)
        converged = np.zeros(flat.shape[0], dtype=bool)
        for start in progress(range(0, index.size, chunk), desc=f"NLLS ({model.name})",
                              unit="chunks"):
            sel = index[start:start + chunk]
            fit = fit_nlls(model, torch.as_tensor(flat[sel]),
                           b1=None if flat_b1 is None else torch.as_tensor(flat_b1[sel]))
            params[sel] = fit.params.detach().cpu().numpy()
            converged[sel] = fit.converged.cpu().numpy()
        values = {n: params[:, i].reshape(mask.shape) for i, n in enumerate(model.parameter_names)}
        return MapSet(self.name, self.desc, values,
                      f"non-linear least squares (batched Levenberg-Marquardt), {model.name} "
                      "model", diagnostics={"converged": converged.reshape(mask.shape)})


@register
class DictionaryEstimator(Estimator):
    """Maximum inner product against the model's dictionary (SVD-compressed)."""

    name = "dict"
    desc = "dict"

    def fit(self, model: SignalModel, data: np.ndarray, *, mask: np.ndarray,
            b1: np.ndarray | None, noise: float | None) -> MapSet:
        from qmri_bids.qmri.dictionary import DictionaryMatcher

        spec = model.dictionary(b1, mask)
        if spec is None:
            raise ValueError(f"model {model.name!r} has no dictionary: dictionary matching is not "
                             "one of its estimators")
        dict_model, grid, known_b1 = spec
        matcher = DictionaryMatcher(dict_model, grid)
        fit = matcher.match(torch.as_tensor(data),
                            b1=torch.as_tensor(b1) if known_b1 and b1 is not None else None,
                            mask=torch.as_tensor(mask))
        values = _masked(fit.maps, mask)
        values["M0"] = np.abs(_masked({"M0": fit.m0}, mask)["M0"])
        return MapSet(self.name, self.desc, values,
                      "dictionary matching (SVD-compressed, maximum inner product)")


@register
class ClosedFormEstimator(Estimator):
    """The model's own formula (no fit): MTR, the MP2RAGE UNI lookup table."""

    name = CLOSED_FORM
    desc = None

    def fit(self, model: SignalModel, data: np.ndarray, *, mask: np.ndarray,
            b1: np.ndarray | None, noise: float | None) -> MapSet:
        values, algorithm = model.closed_form_maps(data, b1, mask)
        return MapSet(self.name, self.desc, values, algorithm)


__all__ = ["ESTIMATORS", "ESTIMATOR_ORDER", "ClosedFormEstimator", "DictionaryEstimator",
           "Estimator", "FitContext", "MapSet", "NetworkEstimator", "NllsEstimator",
           "make_estimator", "register"]
