"""Storage of trained estimators: protocol hash, model cards, shipped models and the user cache.

A trained network is two files (:mod:`qmri_bids.artifacts`, kind ``"crb-estimator"``):
``<stem>.safetensors`` (weights, incl. the SVD basis and the output bounds) and ``<stem>.json``
(the model card: model name, protocol, prior, estimator config, training settings, validation
efficiency, sha256 of the weights, hardware, torch version). ``<stem>`` is
``<model name>-<protocol hash>``; the hash covers the model name, the acquisition parameters
(:meth:`~qmri_bids.qmri.base.SignalModel.to_protocol`, rounded to 6 significant digits) and
``ESTIMATOR_VERSION``, so a changed flip angle selects (or trains) another network, while the
same protocol reuses the cached one.

Look-up order (:func:`locate_estimator`, used by the run's plan, and :func:`find_or_train`, used
by the training node and ``qmri-bids train qmri``): the shipped models
(``qmri_bids/models/qmri``), any other ``search_dirs``, the user cache (``--model-dir``);
otherwise train and write to the cache atomically under a file lock so that parallel
participants with the same protocol train it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from qmri_bids import artifacts
from qmri_bids.errors import BadDataError
from qmri_bids.locks import file_lock
from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.estimator import (
    ESTIMATOR_VERSION,
    CrbEstimator,
    config_from_dict,
    config_to_dict,
)
from qmri_bids.qmri.models import model_class

log = logging.getLogger("qmri_bids.qmri")

CARD_KIND = "crb-estimator"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models" / "qmri"
_REQUIRED_CARD_KEYS = ("model", "protocol", "config")


def default_cache_dir() -> Path:
    """``$QMRI_BIDS_CACHE/estimators``, else ``$XDG_CACHE_HOME`` or ``~/.cache``
    ``/qmri-bids/estimators``."""
    if os.environ.get("QMRI_BIDS_CACHE"):
        return Path(os.environ["QMRI_BIDS_CACHE"]) / "estimators"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "qmri-bids" / "estimators"


# ----------------------------------------------------------------------------- protocols


def _canonical(value: Any) -> Any:
    """JSON-able, order-stable, floats rounded to 6 significant digits."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        r = float(f"{v:.6g}")
        return int(r) if r.is_integer() and abs(r) < 1e15 else r
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot hash protocol value of type {type(value).__name__}")


def protocol_hash(model_name: str, protocol: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the canonical JSON of model name, protocol and estimator version."""
    payload = {"model": model_name, "protocol": _canonical(protocol),
               "estimator_version": ESTIMATOR_VERSION}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def estimator_stem(model_name: str, protocol: Mapping[str, Any]) -> str:
    return f"{model_name}-{protocol_hash(model_name, protocol)}"


@dataclass(frozen=True)
class NetworkPlan:
    """Which network maps a protocol: a verified file, or ``weights=None`` (train on demand)."""

    model_name: str
    protocol: dict[str, Any]
    protocol_hash: str
    weights: Path | None = None  # the .safetensors
    sha256: str | None = None

    @property
    def stem(self) -> str:
        return f"{self.model_name}-{self.protocol_hash}"

    @property
    def train_on_demand(self) -> bool:
        return self.weights is None

    def model(self) -> SignalModel:
        return model_class(self.model_name).from_protocol(self.protocol)

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "protocol": self.protocol,
                "protocol_hash": self.protocol_hash,
                "weights": None if self.weights is None else str(self.weights),
                "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkPlan:
        return cls(d["model_name"], dict(d["protocol"]), d["protocol_hash"],
                   None if d.get("weights") is None else Path(d["weights"]), d.get("sha256"))


# ----------------------------------------------------------------------------- files


def export_estimator(net: CrbEstimator, path_stem: str | Path, card: Mapping[str, Any]
                     ) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns their paths.

    ``card`` holds the caller's fields (protocol, training report, validation...); this adds
    the estimator version, config, prior and number of weights (the card envelope with the
    sha256 is :func:`qmri_bids.artifacts.write_model`'s).
    """
    fields = dict(card)
    fields.update({
        "estimator_version": ESTIMATOR_VERSION,
        "model": net.config.model_name,
        "config": config_to_dict(net.config),
        "prior": net.config.prior,
        "n_weights": net.n_weights(),
    })
    fields.setdefault("protocol", None)
    return artifacts.write_model(artifacts.weights_path(path_stem), net.state_dict(), fields,
                                 kind=CARD_KIND, metadata={"model": fields["model"]})


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of an estimator (stem, .json or .safetensors); BadDataError if unusable."""
    return artifacts.read_card(path, kind=CARD_KIND, required=_REQUIRED_CARD_KEYS)


def load_estimator(path: str | Path, model: SignalModel | None = None
                   ) -> tuple[CrbEstimator, dict[str, Any]]:
    """Load and verify an estimator (``path``: stem, .safetensors or .json).

    The weights' sha256 must match the card. ``model`` is the protocol's ``SignalModel``; when
    None it is rebuilt from the card. Any problem → :class:`~qmri_bids.errors.BadDataError`
    naming the file.
    """
    state, card = artifacts.load_weights(path, kind=CARD_KIND, required=_REQUIRED_CARD_KEYS)
    weights = artifacts.weights_path(path)
    try:
        config = config_from_dict(card["config"])
        if model is None:
            model = model_class(card["model"]).from_protocol(card["protocol"])
        net = CrbEstimator(config, model)
        net.load_state_dict(state)
    except BadDataError:
        raise
    except Exception as exc:  # torch raises several types for weights of another shape
        raise BadDataError(f"{weights}: cannot load the estimator ({exc})") from exc
    if model.name != card["model"]:
        raise BadDataError(f"{weights}: trained for model {card['model']!r}, not {model.name!r}")
    net.eval()
    return net, card


def _search_dirs(search_dirs: Sequence[Path]) -> list[Path]:
    """The shipped models first, then the caller's folders."""
    return [SHIPPED_DIR] + [Path(d) for d in search_dirs if Path(d) != SHIPPED_DIR]


def _present(stem: Path) -> bool:
    return stem.with_suffix(".json").is_file() or stem.with_suffix(".safetensors").is_file()


def locate_estimator(model: SignalModel, *, model_dir: Path | None = None,
                     search_dirs: Sequence[Path] = ()) -> NetworkPlan:
    """The network of ``model``'s protocol, verified (sha256 against its card), without loading it.

    Shipped and ``search_dirs`` models that fail the check are errors (BadDataError: a corrupt
    shipped model is never silently replaced); a corrupt entry of the ``model_dir`` cache is
    reported and planned for retraining. ``weights=None`` in the result: train on demand.
    """
    protocol = model.to_protocol()
    digest = protocol_hash(model.name, protocol)
    stem = f"{model.name}-{digest}"
    for folder in _search_dirs(search_dirs):
        if _present(folder / stem):
            card = artifacts.verify_weights(folder / stem, kind=CARD_KIND,
                                            required=_REQUIRED_CARD_KEYS)
            return NetworkPlan(model.name, protocol, digest, folder / f"{stem}.safetensors",
                               card["sha256"])
    if model_dir is not None and _present(Path(model_dir) / stem):
        cached = Path(model_dir) / stem
        try:
            card = artifacts.verify_weights(cached, kind=CARD_KIND, required=_REQUIRED_CARD_KEYS)
            return NetworkPlan(model.name, protocol, digest, cached.with_suffix(".safetensors"),
                               card["sha256"])
        except BadDataError as exc:
            log.warning("%s; it will be retrained", exc)
    return NetworkPlan(model.name, protocol, digest)


class FoundEstimator(NamedTuple):
    net: CrbEstimator
    card: dict[str, Any]
    weights: Path
    trained_now: bool


def find_or_train(
    model: SignalModel,
    *,
    cache_dir: Path | None = None,
    search_dirs: Sequence[Path] = (),
    train_kwargs: Mapping[str, Any] | None = None,
    force: bool = False,
) -> FoundEstimator:
    """The estimator of ``model``'s protocol: shipped → ``search_dirs`` → cache → train.

    ``train_kwargs`` go to :func:`~qmri_bids.qmri.training.train_estimator`, over
    :func:`recommended_train_kwargs` (plus ``validate=False`` to skip the post-training
    validation written to the card; ``time_budget_s`` caps the training time). ``force``:
    train into the cache even when a model exists (e.g. to compare ``loss="mse"``), replacing a
    cached one. A corrupt *shipped/searched* model raises BadDataError; a corrupt *cache* entry
    is retrained and replaced. Training runs under a lock per protocol, and the cache is looked
    at again once the lock is held, so parallel callers train a protocol once.
    """
    protocol = model.to_protocol()
    stem = estimator_stem(model.name, protocol)
    if not force:
        for folder in _search_dirs(search_dirs):
            if _present(folder / stem):
                net, card = load_estimator(folder / stem, model)
                log.info("%s: using estimator %s", model.name, folder / f"{stem}.safetensors")
                return FoundEstimator(net, card, folder / f"{stem}.safetensors", False)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / stem
    # One lock helper for the whole app (qmri_bids.locks): parallel participants with the same
    # protocol train once; a lock left by a dead process is taken over.
    with file_lock(cache_dir / f"{stem}.lock", timeout_s=3600.0,
                   purpose=f"training the {model.name} estimator {stem}"):
        if not force and _present(target):
            try:
                net, card = load_estimator(target, model)
                log.info("%s: using cached estimator %s", model.name,
                         target.with_suffix(".safetensors"))
                return FoundEstimator(net, card, target.with_suffix(".safetensors"), False)
            except BadDataError as exc:
                log.warning("%s; retraining", exc)
        kw = {**recommended_train_kwargs(model), **dict(train_kwargs or {})}
        net, card = train_and_card(model, protocol, **kw)
        weights, _ = export_estimator(net, target, card)
        log.info("%s: trained and cached %s", model.name, weights)
        return FoundEstimator(net, read_card(target), weights, True)


def recommended_train_kwargs(model: SignalModel) -> dict[str, Any]:
    """Default training settings of :func:`find_or_train`. Short protocols: 3000 steps × 1024
    samples, capped at 120 s (measured 60-180 s for 4000 steps on a shared 2-core machine; the
    shipped models used 4000 steps, ``benchmarks/qmri/train_shipped.py``). Long signals (MRF): a
    20 000-sample pool (its CRB needs ~2P+1 EPG runs per sample), 10 000 steps × 256, learning
    rate 1e-3 (~10-20 min on CPU)."""
    if (getattr(model, "n_timepoints", None) or 0) > 64:
        return {"n_steps": 10000, "batch_size": 256, "pool_size": 20_000, "learning_rate": 1e-3}
    return {"n_steps": 3000, "batch_size": 1024, "pool_size": 200_000, "time_budget_s": 120.0}


def train_and_card(model: SignalModel, protocol: Mapping[str, Any] | None = None,
                   validate: bool = True, validate_n_rep: int = 100, extend_on_failure: bool = True,
                   **train_kwargs: Any) -> tuple[CrbEstimator, dict[str, Any]]:
    """Train an estimator and build its model card (not yet written).

    The network is validated (efficiency and bias in CRB-SD units at SNR 20/50/100, the numbers
    go into the card) and gated at :data:`qmri_bids.qmri.gate.REFERENCE_SNR`: a network that
    fails is trained once more with three times the steps (``extend_on_failure``); the card
    records both attempts and whether the final one passed.
    """
    from qmri_bids.qmri import gate
    from qmri_bids.qmri.training import train_estimator

    protocol = dict(protocol) if protocol is not None else model.to_protocol()
    net, report = train_estimator(model, **train_kwargs)
    attempts: list[dict[str, Any]] = []
    val = None
    if validate:
        val = _validation_summary(net, model, validate_n_rep, report.snr_reference)
        attempts.append({"steps": report.steps_done, "gate": val["gate"]})
        if extend_on_failure and not val["gate"]["Passed"]:
            steps = 3 * int(train_kwargs.get("n_steps", report.n_steps))
            log.warning("%s: the trained network failed its validation at SNR %g (%s); training "
                        "again with %d steps", model.name, gate.REFERENCE_SNR,
                        "; ".join(val["gate"]["Reasons"]), steps)
            budget = train_kwargs.get("time_budget_s")
            kw = {**train_kwargs, "n_steps": steps,
                  **({"time_budget_s": 3 * budget} if budget else {})}
            net, report = train_estimator(model, **kw)
            val = _validation_summary(net, model, validate_n_rep, report.snr_reference)
            attempts.append({"steps": report.steps_done, "gate": val["gate"]})
    card: dict[str, Any] = {
        "protocol": _canonical(protocol),
        "protocol_hash": protocol_hash(model.name, protocol),
        "training": report.to_dict(),
        "snr_range": list(report.snr_range),
        "loss": report.loss,
        "seed": report.seed,
        "steps": report.steps_done,
        "training_time_s": report.training_time_s,
        "hardware": report.hardware,
        "torch_version": report.torch_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reference": "Zhang et al., Cramér-Rao bound-informed training of neural networks for "
                     "quantitative MRI, MRM 2022;88:436-448",
    }
    if val is not None:
        card["validation"] = {**val, "attempts": attempts}
    return net, card


def _validation_summary(net: CrbEstimator, model: SignalModel, n_rep: int,
                        snr_reference: str) -> dict[str, Any]:
    """Card fields of a validation at SNR 20/50/100 and the gate at the reference SNR."""
    from qmri_bids.qmri import gate
    from qmri_bids.qmri.training import efficiency_summary
    from qmri_bids.qmri.training import validate as run_validation

    val = run_validation(net, model, n_rep=n_rep, snr_reference=snr_reference,
                         snrs=(20.0, gate.REFERENCE_SNR, 100.0))
    verdict = gate.gate_from_validation(val, f"{gate.REFERENCE_SNR:g}")
    return {"efficiency_median": efficiency_summary(val),
            "bias_over_sd_crb_median": {
                s: {p: round(v["bias_over_sd_crb_median"], 4) for p, v in d["parameters"].items()}
                for s, d in val["snr"].items()},
            "crb_loss": {s: round(d["crb_loss"], 4) for s, d in val["snr"].items()},
            "grid_points": val["grid_points"], "n_rep": val["n_rep"],
            "gate": verdict.to_json()}
