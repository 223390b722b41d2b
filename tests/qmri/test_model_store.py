"""Protocol hash, model cards, shipped models and the estimator cache (model_store)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qmri_bids.artifacts import sha256_file
from qmri_bids.errors import BadDataError
from qmri_bids.qmri.estimator import ESTIMATOR_VERSION
from qmri_bids.qmri.model_store import (
    SHIPPED_DIR,
    estimator_stem,
    export_estimator,
    find_or_train,
    load_estimator,
    locate_estimator,
    protocol_hash,
    read_card,
    train_and_card,
)
from qmri_bids.qmri.models import VFAModel, model_class

TINY = {"n_steps": 20, "batch_size": 64, "pool_size": 2000, "validate": False}


def _vfa(fa=(4.0, 17.0)) -> VFAModel:
    return VFAModel(list(fa), 0.0123)  # deliberately not a shipped protocol


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = _vfa()
    net, card = train_and_card(model, model.to_protocol(), **TINY)
    stem = tmp_path_factory.mktemp("store") / estimator_stem("vfa", model.to_protocol())
    export_estimator(net, stem, card)
    return model, net, stem


def test_protocol_hash_is_canonical() -> None:
    p = {"flip_angle_deg": [3.0, 20.0], "tr": [0.015, 0.015]}
    h = protocol_hash("vfa", p)
    assert len(h) == 16 and int(h, 16) >= 0
    assert protocol_hash("vfa", {"tr": np.array([0.015, 0.015]),
                                 "flip_angle_deg": [3.0000000001, 20]}) == h
    assert protocol_hash("vfa", {"flip_angle_deg": [3.0, 21.0], "tr": [0.015, 0.015]}) != h
    assert protocol_hash("megre", p) != h
    assert protocol_hash("vfa", VFAModel([3, 20], 0.015).to_protocol()) == h


def test_export_load_round_trip(trained) -> None:
    model, net, stem = trained
    card = json.loads(stem.with_suffix(".json").read_text())
    for key in ("protocol", "prior", "snr_range", "loss", "seed", "steps", "sha256",
                "training_time_s", "hardware", "torch_version", "config", "protocol_hash"):
        assert key in card
    # the common card envelope of qmri_bids.artifacts, version 2
    assert (card["format"], card["format_version"], card["kind"]) == (
        "qmri-bids-model-card", 2, "crb-estimator")
    assert card["sha256"] == sha256_file(stem.with_suffix(".safetensors"))
    assert card["weights_file"] == stem.name + ".safetensors"
    loaded, card2 = load_estimator(stem.with_suffix(".safetensors"))  # model rebuilt from card
    x = torch.rand(16, 2)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert card2["protocol_hash"] == protocol_hash("vfa", model.to_protocol())


def _copy(stem: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for ext in (".safetensors", ".json"):
        (dest / (stem.name + ext)).write_bytes(stem.with_suffix(ext).read_bytes())
    return dest / stem.name


def test_corrupt_truncated_or_missing_files_raise_bad_data(trained, tmp_path: Path) -> None:
    _, _, stem = trained
    bad = _copy(stem, tmp_path / "flip")
    w = bytearray(bad.with_suffix(".safetensors").read_bytes())
    w[-5] ^= 0xFF
    bad.with_suffix(".safetensors").write_bytes(bytes(w))
    with pytest.raises(BadDataError, match=r"integrity check: sha256.*corrupt") as exc:
        load_estimator(bad)
    assert bad.name in str(exc.value)
    trunc = _copy(stem, tmp_path / "trunc")
    data = trunc.with_suffix(".safetensors").read_bytes()
    trunc.with_suffix(".safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadDataError):
        load_estimator(trunc)
    nocard = _copy(stem, tmp_path / "nocard")
    nocard.with_suffix(".json").unlink()
    with pytest.raises(BadDataError, match="model card .* is missing"):
        load_estimator(nocard)
    badjson = _copy(stem, tmp_path / "badjson")
    badjson.with_suffix(".json").write_text("{not json")
    with pytest.raises(BadDataError, match="not readable JSON"):
        load_estimator(badjson)
    noweights = _copy(stem, tmp_path / "now")
    noweights.with_suffix(".safetensors").unlink()
    with pytest.raises(BadDataError, match="weights .* not found"):
        load_estimator(noweights)


def test_find_or_train_caches_and_retrains_on_protocol_change(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    m = _vfa((5.0, 18.0))
    net, _card, path, now = find_or_train(m, cache_dir=cache, train_kwargs=TINY)
    assert now and path.parent == cache and path.is_file()
    net2, _, path2, now2 = find_or_train(m, cache_dir=cache, train_kwargs=TINY)
    assert not now2 and path2 == path
    assert torch.equal(net.out.weight, net2.out.weight)
    m3 = _vfa((6.0, 18.0))
    _, _, path3, now3 = find_or_train(m3, cache_dir=cache, train_kwargs=TINY)
    assert now3 and path3 != path
    # a corrupt cache entry is planned for retraining, then retrained (and replaced)
    path.write_bytes(b"garbage")
    assert locate_estimator(m, model_dir=cache).train_on_demand
    _, _, path4, now4 = find_or_train(m, cache_dir=cache, train_kwargs=TINY)
    assert now4 and path4 == path
    load_estimator(path)
    assert not list(cache.glob(".*.tmp"))
    # force trains again although the cache holds the protocol (qmri-bids train qmri --force)
    before = read_card(path)["sha256"]
    _, card5, path5, now5 = find_or_train(m, cache_dir=cache, force=True,
                                          train_kwargs={**TINY, "seed": 1})
    assert now5 and path5 == path and card5["sha256"] != before
    assert read_card(path)["sha256"] == card5["sha256"] == sha256_file(path)


def test_search_dirs_come_before_the_cache(trained, tmp_path: Path) -> None:
    model, _net, stem = trained
    shipped = _copy(stem, tmp_path / "ship")
    _, _, path, now = find_or_train(model, search_dirs=[shipped.parent],
                                    cache_dir=tmp_path / "cache", train_kwargs=TINY)
    assert not now and path == shipped.with_suffix(".safetensors")
    plan = locate_estimator(model, model_dir=tmp_path / "cache", search_dirs=[shipped.parent])
    assert plan.weights == path and plan.sha256 == sha256_file(path)
    # a corrupt shipped/searched model is an error, never silently retrained
    shipped.with_suffix(".safetensors").write_bytes(b"x")
    with pytest.raises(BadDataError):
        find_or_train(model, search_dirs=[shipped.parent], cache_dir=tmp_path / "c2",
                      train_kwargs=TINY)
    with pytest.raises(BadDataError):
        locate_estimator(model, search_dirs=[shipped.parent])


def test_parallel_participants_train_once(tmp_path: Path) -> None:
    m = _vfa((7.0, 19.0))
    results = []

    def worker() -> None:
        results.append(find_or_train(m, cache_dir=tmp_path, train_kwargs=TINY).trained_now)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]


def test_shipped_models_load_and_are_verified() -> None:
    cards = sorted(SHIPPED_DIR.glob("*.json"))
    if not cards:
        pytest.skip("no shipped models")
    for card in cards:
        _net, c = load_estimator(card)
        assert c["validation"]["efficiency_median"]
        assert card.stem == estimator_stem(c["model"], c["protocol"])
        # the shipped cards are version 2 (qmri_bids.artifacts), validated before shipping ...
        assert c["format_version"] == 2 and c["estimator_version"] == ESTIMATOR_VERSION
        assert len(c["sha256"]) == 64 and "gate" in c["validation"]
        # ... and the model rebuilt from the card names the same file: protocol hashes of the
        # shipped estimators are unchanged by the model classes' to_protocol()
        model = model_class(c["model"]).from_protocol(c["protocol"])
        assert estimator_stem(model.name, model.to_protocol()) == card.stem
        assert locate_estimator(model).weights == card.with_suffix(".safetensors")


@pytest.mark.parametrize("sub, suffix", [("sub-brain02", "VFA"), ("sub-brain03", "IRT1"),
                                         ("sub-kidney01", "MESE")])
def test_demo_protocols_find_their_shipped_model(ds_real, sub, suffix) -> None:
    from qmri_bids.qmri import protocols as pr

    paths = sorted((ds_real / sub / "anat").glob(f"*_{suffix}.nii*"))
    model = pr.resolve_collection(pr.collection_from_paths(paths, suffix)).model
    stem = SHIPPED_DIR / estimator_stem(model.name, model.to_protocol())
    if not stem.with_suffix(".json").is_file():
        pytest.skip(f"{stem.name} not shipped")
    _net, card = load_estimator(stem, model)
    assert card["model"] == model.name
