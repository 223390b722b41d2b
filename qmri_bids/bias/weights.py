"""Load a bias-field CNN shipped inside the package, verified against its model card.

A model is two files in ``qmri_bids/models/``: ``<name>.safetensors`` (weights only, no pickle)
and ``<name>.json`` (the model card written by :func:`qmri_bids.bias.train.export_model`). The
card's ``sha256`` must match the weights file byte for byte. Any problem -- missing file, missing
or unreadable card, wrong hash, truncated/corrupt weights, weights that do not fit the declared
architecture -- raises :class:`qmri_bids.errors.BadDataError` (exit code 65) naming the file.
There is deliberately no fallback (no untrained net, no "skip correction"): a silently different
model would give silently different results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from qmri_bids.bias.cnn import BiasNet, BiasNetConfig, FusionConfig
from qmri_bids.errors import BadDataError

log = logging.getLogger("qmri_bids.bias")

DEFAULT_MODEL = "bias_cnn_v2"


@dataclass
class BiasModel:
    """A verified, ready-to-run model: the net (eval mode), its fusion settings and its card."""

    net: BiasNet
    fusion: FusionConfig
    card: dict
    path: Path

    @property
    def sha256(self) -> str:
        return str(self.card["sha256"])

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.stem))


def models_dir() -> Path:
    """``qmri_bids/models`` of the installed package."""
    return Path(str(resources.files("qmri_bids") / "models"))


def resolve_model_path(name_or_path: str | Path = DEFAULT_MODEL) -> Path:
    """A name (``bias_cnn_v2``) means the packaged model; a path to ``*.safetensors`` is used as is."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.parent != Path("."):
        return p
    return models_dir() / f"{p.name}.safetensors"


def read_card(weights: Path) -> dict:
    """The model card next to ``weights`` (version 2, or a shipped version-1 card)."""
    from qmri_bids.artifacts import read_card as read_model_card

    return read_model_card(weights, kind="bias-cnn", required=("architecture",))


def load_model(name_or_path: str | Path = DEFAULT_MODEL, device: torch.device | str = "cpu"
               ) -> BiasModel:
    """Load and verify a model (default: the shipped ``DEFAULT_MODEL``); see module docstring."""
    from qmri_bids.artifacts import load_weights

    weights = resolve_model_path(name_or_path)
    if not weights.is_file():
        raise BadDataError(f"bias-field model weights {weights} not found "
                           "(the installation is incomplete; reinstall qmri-bids)")
    state, card = load_weights(weights, kind="bias-cnn", required=("architecture",))
    try:
        cfg = BiasNetConfig.from_dict(card["architecture"]["config"])
        fusion = FusionConfig.from_dict(card.get("inference", {}).get("fusion", {}))
        net = BiasNet(cfg)
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise BadDataError(f"bias-field model {weights} does not match the architecture its "
                           f"card declares: {exc}") from exc
    net.eval().to(torch.device(device))
    log.info("loaded bias CNN %s (sha256 %s..., %s steps)", weights.name, card["sha256"][:12],
             card.get("training", {}).get("steps", "?"))
    return BiasModel(net=net, fusion=fusion, card=card, path=weights)
