"""Loading verified models: the shipped one, and every way a model file can be broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qmri_bids.artifacts import sha256_file
from qmri_bids.bias.cnn import BiasNet, BiasNetConfig
from qmri_bids.bias.train import TrainConfig, export_model
from qmri_bids.bias.weights import DEFAULT_MODEL, load_model, models_dir
from qmri_bids.errors import EXIT_BAD_DATA, BadDataError

TINY = BiasNetConfig(in_size=32, base_channels=4, depth=2)


@pytest.fixture()
def exported(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = BiasNet(TINY)
    return export_model(net, tmp_path / "tiny.safetensors", TrainConfig(net=TINY, steps=0),
                        {"steps_done": 0, "wall_s": 0.0, "history": []}, {"note": 1.0})


def test_shipped_model_loads_and_is_verified() -> None:
    model = load_model()
    path = models_dir() / f"{DEFAULT_MODEL}.safetensors"
    assert model.path == path
    assert model.sha256 == sha256_file(path)
    assert path.stat().st_size < 20 * 1024 * 1024
    card = json.loads(path.with_suffix(".json").read_text())
    for key in ("architecture", "training", "validation", "hardware", "sha256"):
        assert key in card
    assert card["training"]["steps"] > 0
    assert not model.net.training


def test_roundtrip(exported: Path) -> None:
    model = load_model(exported)
    assert model.net.config == TINY
    torch.manual_seed(0)
    ref = BiasNet(TINY)
    for (k, a), (_, b) in zip(model.net.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_wrong_hash(exported: Path) -> None:
    card_path = exported.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(BadDataError, match="integrity check") as err:
        load_model(exported)
    assert err.value.exit_code == EXIT_BAD_DATA


def test_truncated_file_is_caught_by_hash(exported: Path) -> None:
    data = exported.read_bytes()
    exported.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadDataError, match="sha256"):
        load_model(exported)


def test_corrupt_file_with_matching_hash_is_unreadable(exported: Path) -> None:
    # Garbage whose hash was (wrongly) recorded: the hash passes, the parser must still refuse.
    exported.write_bytes(b"\x00\x01not a safetensors file" * 10)
    card_path = exported.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["sha256"] = sha256_file(exported)
    card_path.write_text(json.dumps(card))
    with pytest.raises(BadDataError, match="cannot be read"):
        load_model(exported)


def test_missing_or_bad_card_and_missing_weights(exported: Path, tmp_path: Path) -> None:
    card_path = exported.with_suffix(".json")
    shutil.copy(card_path, tmp_path / "card.bak")
    card_path.write_text("{not json")
    with pytest.raises(BadDataError, match="not readable JSON"):
        load_model(exported)
    card_path.unlink()
    with pytest.raises(BadDataError, match="card .* is missing"):
        load_model(exported)
    with pytest.raises(BadDataError, match="not found"):
        load_model(tmp_path / "absent.safetensors")


def test_architecture_mismatch(exported: Path) -> None:
    card_path = exported.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["architecture"]["config"]["base_channels"] = 8
    card_path.write_text(json.dumps(card))
    with pytest.raises(BadDataError, match="does not match the architecture"):
        load_model(exported)


def test_version_1_card_still_reads(exported: Path) -> None:
    """Cards written before the common card format (``format: qmri-bids-bias-cnn``) load."""
    card_path = exported.with_suffix(".json")
    card = json.loads(card_path.read_text())
    v1 = {k: v for k, v in card.items() if k not in ("format", "format_version", "kind")}
    v1["format"] = "qmri-bids-bias-cnn"
    card_path.write_text(json.dumps(v1))
    model = load_model(exported)
    assert model.sha256 == sha256_file(exported)
    assert model.card["format_version"] == 1
