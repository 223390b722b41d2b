"""Storage of trained estimators: protocol hash, model cards, shipped models and the user cache.

A trained network is two files: ``<stem>.safetensors`` (weights, incl. the SVD basis and the
output bounds) and ``<stem>.json`` (the *model card*: model name, protocol, prior, estimator
config, training settings, validation efficiency, sha256 of the weights, hardware, torch
version). ``<stem>`` is ``<model name>-<protocol hash>``; the hash covers the model name, the
acquisition parameters (rounded to 6 significant digits) and ``ESTIMATOR_VERSION``, so a changed
flip angle selects (or trains) another network, while the same protocol reuses the cached one.

Look-up order of :func:`find_or_train`: the shipped models (``qmri_bids/models/qmri``), any
other ``search_dirs``, the user cache; otherwise train and write to the cache atomically
(temporary files + ``os.replace``; the card, written last, marks a complete pair) under a file
lock so that parallel participants with the same protocol train it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.provenance import sha256_file
from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.estimator import (
    ESTIMATOR_VERSION,
    CrbEstimator,
    config_from_dict,
    config_to_dict,
)

log = logging.getLogger("qmri_bids.qmri")

CARD_FORMAT = "qmri-bids-crb-estimator"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models" / "qmri"
_REQUIRED_CARD_KEYS = ("format", "model", "protocol", "config", "weights_sha256")


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


def protocol_hash(model_name: str, protocol_dict: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the canonical JSON of model name, protocol and estimator version."""
    payload = {"model": model_name, "protocol": _canonical(protocol_dict),
               "estimator_version": ESTIMATOR_VERSION}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def protocol_dict(model: SignalModel) -> dict[str, Any]:
    """The constructor arguments of ``model`` (JSON-able): what defines its protocol.

    Supported: vfa, irt1, irt1-tr, mese-mono, megre, mts, mese-epg, mrf.
    """
    def lst(t: Any) -> list[float]:
        return [float(v) for v in np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor)
                                             else t, dtype=np.float64).reshape(-1)]

    n = model.name
    if n == "vfa":
        return {"flip_angle_deg": lst(model.flip_angle_deg), "tr": lst(model.tr)}
    if n == "irt1":
        return {"inversion_time": lst(model.inversion_time), "magnitude": bool(model.magnitude)}
    if n == "irt1-tr":
        return {"inversion_time": lst(model.inversion_time), "tr": float(model.tr),
                "magnitude": bool(model.magnitude)}
    if n in ("mese-mono", "megre"):
        return {"echo_time": lst(model.echo_time)}
    if n == "mts":
        return {"flip_angle_deg": lst(model.flip_angle_deg), "tr": lst(model.tr),
                "mt_on": [bool(v) for v in np.asarray(model.mt_on).reshape(-1)]}
    if n == "mese-epg":
        return {k: getattr(model, k) for k in (
            "echo_spacing", "n_echoes", "t1", "refocus_deg", "excitation_deg",
            "b1_scales_excitation", "estimate_b1", "n_states")}
    if n == "mrf":
        s = model.schedule
        return {"schedule": {"flip_angle_deg": lst(s.flip_angle_deg), "tr": lst(s.tr),
                             "te": lst(s.te), "rf_phase_deg": lst(s.rf_phase_deg),
                             "inversion_time": s.inversion_time},
                "estimate_b1": bool(model.estimate_b1), "n_states": int(model.n_states)}
    raise ValueError(f"no protocol description for model {n!r}")


_ORDER_KEYS = {"vfa": "flip_angle_deg", "irt1": "inversion_time", "irt1-tr": "inversion_time",
               "mese-mono": "echo_time", "megre": "echo_time"}


def canonical_order(model: SignalModel) -> tuple[np.ndarray, SignalModel]:
    """(permutation, model with its members in that order): members sorted by their varying
    parameter (flip angle, TI, TE), so that the same protocol listed in another member order
    gets the same hash and network. Apply it to the data: ``data[..., perm]``. Models without
    a member axis (MRF, EPG, MTS) are returned unchanged with the identity permutation."""
    key = _ORDER_KEYS.get(model.name)
    proto = protocol_dict(model)
    if key is None:
        n = getattr(model, "n_timepoints", None) or 0
        return np.arange(n), model
    values = np.asarray(proto[key])
    perm = np.argsort(values, kind="stable")
    if np.array_equal(perm, np.arange(values.size)):
        return perm, model
    for k, v in proto.items():
        if isinstance(v, list) and len(v) == values.size:
            proto[k] = [v[i] for i in perm]
    return perm, model_from_protocol(model.name, proto)


def model_from_protocol(model_name: str, protocol: Mapping[str, Any]) -> SignalModel:
    """Inverse of :func:`protocol_dict`."""
    from qmri_bids.qmri.models import MODELS

    if model_name == "mrf":
        from qmri_bids.qmri.models.mrf import MRFModel, MRFSchedule

        return MRFModel(MRFSchedule(**protocol["schedule"]), estimate_b1=protocol["estimate_b1"],
                        n_states=protocol["n_states"])
    if model_name == "mese-epg":
        from qmri_bids.qmri.models.mese_epg import MESEEPG

        return MESEEPG(**protocol)
    if model_name == "mts":
        kw = dict(protocol)
        kw["mt_on"] = np.asarray(kw["mt_on"], dtype=bool)
        return MODELS["mts"](**kw)
    if model_name not in MODELS:
        raise BadDataError(f"unknown signal model {model_name!r} in a model card")
    return MODELS[model_name](**protocol)


# ----------------------------------------------------------------------------- files


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def export_estimator(net: CrbEstimator, path_stem: str | Path, card: Mapping[str, Any]
                     ) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns their paths.

    ``card`` holds the caller's fields (protocol, training report, validation...); this adds
    format, estimator version, config, prior, weights file name and sha256, number of weights.
    """
    from safetensors.torch import save_file

    stem = _stem(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, card_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    full = dict(card)
    full.update({
        "format": CARD_FORMAT,
        "estimator_version": ESTIMATOR_VERSION,
        "model": net.config.model_name,
        "config": config_to_dict(net.config),
        "prior": net.config.prior,
        "weights_file": weights.name,
        "n_weights": net.n_weights(),
    })
    full.setdefault("protocol", None)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    fd, tmpw = tempfile.mkstemp(prefix=f".{stem.name}.", suffix=".safetensors.tmp",
                                dir=stem.parent)
    os.close(fd)
    try:
        save_file(tensors, tmpw, metadata={"format": CARD_FORMAT, "model": full["model"]})
        full["weights_sha256"] = sha256_file(Path(tmpw))
        fd, tmpc = tempfile.mkstemp(prefix=f".{stem.name}.", suffix=".json.tmp", dir=stem.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(full, fh, indent=2, sort_keys=True)
            fh.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        for t in (tmpw, tmpc):  # mkstemp creates 0600; shipped/cached files must be readable
            os.chmod(t, 0o644 & ~umask)
        os.replace(tmpw, weights)
        os.replace(tmpc, card_path)  # last: a card next to its weights marks a complete pair
    finally:
        for t in (tmpw,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
    return weights, card_path


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of ``path`` (stem, .json or .safetensors); BadDataError if unusable."""
    card_path = _stem(path).with_suffix(".json")
    if not card_path.is_file():
        raise BadDataError(f"{card_path}: model card missing (every estimator needs its .json "
                           "card next to the .safetensors weights)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadDataError(f"{card_path}: model card is not valid JSON ({exc})") from exc
    missing = [k for k in _REQUIRED_CARD_KEYS if not isinstance(card, dict) or k not in card]
    if missing or card.get("format") != CARD_FORMAT:
        raise BadDataError(f"{card_path}: not a qmri-bids estimator card (missing "
                           f"{', '.join(missing) or 'format'})")
    return card


def load_estimator(path: str | Path, model: SignalModel | None = None
                   ) -> tuple[CrbEstimator, dict[str, Any]]:
    """Load and verify an estimator (``path``: stem, .safetensors or .json).

    The weights' sha256 must match the card. ``model`` is the protocol's ``SignalModel``; when
    None it is rebuilt from the card. Any problem → :class:`~qmri_bids.errors.BadDataError`
    naming the file.
    """
    from safetensors.torch import load_file

    stem = _stem(path)
    card = read_card(stem)
    weights = stem.with_suffix(".safetensors")
    if not weights.is_file():
        raise BadDataError(f"{weights}: estimator weights missing (card {stem.name}.json exists)")
    digest = sha256_file(weights)
    if digest != card["weights_sha256"]:
        raise BadDataError(f"{weights}: sha256 {digest[:16]}… does not match its model card "
                           f"({str(card['weights_sha256'])[:16]}…): the file is corrupt, "
                           "truncated or was replaced; delete it to retrain")
    try:
        config = config_from_dict(card["config"])
        if model is None:
            model = model_from_protocol(card["model"], card["protocol"])
        net = CrbEstimator(config, model)
        state = load_file(str(weights))
        net.load_state_dict(state)
    except BadDataError:
        raise
    except Exception as exc:  # safetensors/torch raise several types
        raise BadDataError(f"{weights}: cannot load the estimator ({exc})") from exc
    if model.name != card["model"]:
        raise BadDataError(f"{weights}: trained for model {card['model']!r}, not {model.name!r}")
    net.eval()
    return net, card


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float = 3600.0) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"{path}: lock held for over {timeout_s:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def estimator_stem(model_name: str, protocol: Mapping[str, Any]) -> str:
    return f"{model_name}-{protocol_hash(model_name, protocol)}"


def find_or_train(
    model_name: str,
    model: SignalModel,
    protocol_dict: Mapping[str, Any],
    search_dirs: list[Path] | None,
    cache_dir: Path | None,
    train_kwargs: Mapping[str, Any] | None = None,
) -> tuple[CrbEstimator, dict[str, Any], Path, bool]:
    """The estimator of this protocol: shipped → ``search_dirs`` → cache → train (and cache).

    ``search_dirs`` None means ``[SHIPPED_DIR]``; the shipped dir is always searched first.
    ``train_kwargs`` go to :func:`~qmri_bids.qmri.training.train_estimator`, over
    :func:`recommended_train_kwargs` (plus ``validate=False`` to skip the post-training
    validation written to the card; ``time_budget_s`` caps the training time).
    Returns (net, card, weights path, trained_now). A corrupt *shipped/searched* model raises
    BadDataError; a corrupt *cache* entry is retrained and replaced.
    """
    stem = estimator_stem(model_name, protocol_dict)
    dirs = [SHIPPED_DIR] + [Path(d) for d in (search_dirs or []) if Path(d) != SHIPPED_DIR]
    for d in dirs:
        if (d / f"{stem}.json").is_file() or (d / f"{stem}.safetensors").is_file():
            net, card = load_estimator(d / stem, model)
            log.info("%s: using estimator %s", model_name, d / f"{stem}.safetensors")
            return net, card, d / f"{stem}.safetensors", False
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / stem
    with _file_lock(cache_dir / f"{stem}.lock"):
        if target.with_suffix(".json").is_file():
            try:
                net, card = load_estimator(target, model)
                log.info("%s: using cached estimator %s", model_name,
                         target.with_suffix(".safetensors"))
                return net, card, target.with_suffix(".safetensors"), False
            except BadDataError as exc:
                log.warning("%s; retraining", exc)
        kw = {**recommended_train_kwargs(model), **dict(train_kwargs or {})}
        net, card = train_and_card(model, dict(protocol_dict), **kw)
        weights, _ = export_estimator(net, target, card)
        log.info("%s: trained and cached %s", model_name, weights)
        return net, json.loads(target.with_suffix(".json").read_text()), weights, True


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
                   validate: bool = True, validate_n_rep: int = 100, **train_kwargs: Any
                   ) -> tuple[CrbEstimator, dict[str, Any]]:
    """Train an estimator and build its model card (not yet written)."""
    from qmri_bids.qmri.training import efficiency_summary, train_estimator
    from qmri_bids.qmri.training import validate as run_validation

    protocol = dict(protocol) if protocol is not None else protocol_dict(model)
    net, report = train_estimator(model, **train_kwargs)
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
    if validate:
        val = run_validation(net, model, n_rep=validate_n_rep,
                             snr_reference=report.snr_reference)
        card["validation"] = {"efficiency_median": efficiency_summary(val),
                              "crb_loss": {s: round(d["crb_loss"], 4)
                                           for s, d in val["snr"].items()},
                              "grid_points": val["grid_points"], "n_rep": val["n_rep"]}
    return net, card
