"""Atomic writes and the one model-card format (version 2, with the shipped version-1 cards)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qmri_bids import artifacts
from qmri_bids.errors import BadDataError, CannotWriteError

PACKAGE_MODELS = Path(artifacts.__file__).parent / "models"


def test_write_model_writes_weights_and_a_version_2_card(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    weights, card_file = artifacts.write_model(tmp_path / "m" / "net.safetensors", tensors,
                                               {"architecture": {"width": 3}, "sha256": "x"},
                                               kind="bias-cnn", metadata={"note": "test"})
    card = json.loads(card_file.read_text())
    assert card_file == tmp_path / "m" / "net.json"
    assert {k: card[k] for k in ("format", "format_version", "kind", "name", "weights_file")} == {
        "format": "qmri-bids-model-card", "format_version": 2, "kind": "bias-cnn",
        "name": "net", "weights_file": "net.safetensors"}
    # the envelope wins over a same-named field of the caller
    assert card["sha256"] == artifacts.sha256_file(weights) != "x"
    assert card["size_bytes"] == weights.stat().st_size and card["architecture"] == {"width": 3}
    loaded, read = artifacts.load_weights(tmp_path / "m" / "net", kind="bias-cnn")
    assert torch.equal(loaded["w"], tensors["w"]) and read == card
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


def test_reader_accepts_version_1_cards_of_both_kinds(tmp_path):
    """Cards written before the common format (the first shipped models): ``format``
    ``qmri-bids-bias-cnn`` with ``sha256``, ``qmri-bids-crb-estimator`` with ``weights_sha256``,
    and no envelope; rebuilt here field for field from those cards."""
    for kind, fmt, key in (("bias-cnn", "qmri-bids-bias-cnn", "sha256"),
                           ("crb-estimator", "qmri-bids-crb-estimator", "weights_sha256")):
        weights = tmp_path / f"{kind}.safetensors"
        artifacts.write_model(weights, {"w": torch.ones(2)}, {"protocol": {"a": 1}}, kind=kind)
        card_file = weights.with_suffix(".json")
        v2 = json.loads(card_file.read_text())
        v1 = {k: v for k, v in v2.items()
              if k not in ("format", "format_version", "kind", "name", "sha256", "size_bytes")}
        v1.update({"format": fmt, key: v2["sha256"]})
        card_file.write_text(json.dumps(v1))
        card = artifacts.verify_weights(weights, kind=kind, required=("protocol",))
        assert card["format_version"] == 1 and card["kind"] == kind
        assert card["sha256"] == artifacts.sha256_file(weights)
        assert card["weights_file"] == weights.name
        other = "crb-estimator" if kind == "bias-cnn" else "bias-cnn"
        with pytest.raises(BadDataError, match=f"is not a {other} model card"):
            artifacts.read_card(card_file, kind=other)


def test_card_problems_name_the_file(tmp_path):
    weights, card_file = artifacts.write_model(tmp_path / "net.safetensors",
                                               {"w": torch.ones(3)}, {}, kind="crb-estimator")
    with pytest.raises(BadDataError, match="describes a 'crb-estimator' model"):
        artifacts.read_card(card_file, kind="bias-cnn")
    with pytest.raises(BadDataError, match="missing protocol"):
        artifacts.read_card(card_file, kind="crb-estimator", required=("protocol",))
    weights.write_bytes(weights.read_bytes()[:-4] + b"abcd")
    with pytest.raises(BadDataError, match=r"net.safetensors failed its integrity check"):
        artifacts.verify_weights(weights, kind="crb-estimator")
    card_file.write_text("{broken")
    with pytest.raises(BadDataError, match=r"net.json is not readable JSON"):
        artifacts.read_card(weights, kind="crb-estimator")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    artifacts.atomic_write_json(target, {"a": 1})

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        artifacts.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CannotWriteError, match="cannot write .*file/x.json"):
        artifacts.atomic_write_text(blocker / "x.json", "{}")
