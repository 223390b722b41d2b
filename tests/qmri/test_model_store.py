"""Protocol hash, model cards, shipped models and the estimator cache (model_store)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.model_store import (
    SHIPPED_DIR,
    estimator_stem,
    export_estimator,
    find_or_train,
    load_estimator,
    model_from_protocol,
    protocol_dict,
    protocol_hash,
    sha256_file,
    train_and_card,
)
from qmri_bids.qmri.models import IRT1Model, MEGREModel, MESEMonoModel, VFAModel

TINY = {"n_steps": 20, "batch_size": 64, "pool_size": 2000, "validate": False}


def _vfa(fa=(4.0, 17.0)) -> VFAModel:
    return VFAModel(list(fa), 0.0123)  # deliberately not a shipped protocol


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = _vfa()
    net, card = train_and_card(model, protocol_dict(model), **TINY)
    stem = tmp_path_factory.mktemp("store") / estimator_stem("vfa", protocol_dict(model))
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
    assert protocol_hash("vfa", protocol_dict(VFAModel([3, 20], 0.015))) == h


@pytest.mark.parametrize("model", [_vfa(), IRT1Model([0.1, 0.5, 1.0, 2.0]),
                                   MESEMonoModel([0.01, 0.02, 0.03]), MEGREModel([0.01, 0.02])])
def test_model_round_trips_through_its_protocol(model) -> None:
    again = model_from_protocol(model.name, json.loads(json.dumps(protocol_dict(model))))
    p = torch.tensor([[2.0, -3.5, 1.0]] if model.name == "irt1" else [[2.0, 0.05]],
                     dtype=torch.float64)
    assert torch.allclose(model(p), again(p))


def test_canonical_member_order() -> None:
    from qmri_bids.qmri.model_store import canonical_order

    m = MESEMonoModel([0.03, 0.01, 0.02])
    perm, sorted_model = canonical_order(m)
    assert perm.tolist() == [1, 2, 0]
    p = torch.tensor([[5.0, 0.04]], dtype=torch.float64)
    assert torch.allclose(m(p)[..., perm], sorted_model(p))
    assert protocol_hash("mese-mono", protocol_dict(sorted_model)) == protocol_hash(
        "mese-mono", protocol_dict(MESEMonoModel([0.01, 0.02, 0.03])))
    vfa = VFAModel([20.0, 3.0], [0.015, 0.015])
    assert canonical_order(vfa)[0].tolist() == [1, 0]


def test_export_load_round_trip(trained) -> None:
    model, net, stem = trained
    card = json.loads(stem.with_suffix(".json").read_text())
    for key in ("protocol", "prior", "snr_range", "loss", "seed", "steps", "weights_sha256",
                "training_time_s", "hardware", "torch_version", "config", "protocol_hash"):
        assert key in card
    assert card["weights_sha256"] == sha256_file(stem.with_suffix(".safetensors"))
    loaded, card2 = load_estimator(stem.with_suffix(".safetensors"))  # model rebuilt from card
    x = torch.rand(16, 2)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert card2["protocol_hash"] == protocol_hash("vfa", protocol_dict(model))


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
    with pytest.raises(BadDataError, match=r"sha256.*corrupt") as exc:
        load_estimator(bad)
    assert bad.name in str(exc.value)
    trunc = _copy(stem, tmp_path / "trunc")
    data = trunc.with_suffix(".safetensors").read_bytes()
    trunc.with_suffix(".safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadDataError):
        load_estimator(trunc)
    nocard = _copy(stem, tmp_path / "nocard")
    nocard.with_suffix(".json").unlink()
    with pytest.raises(BadDataError, match="model card missing"):
        load_estimator(nocard)
    badjson = _copy(stem, tmp_path / "badjson")
    badjson.with_suffix(".json").write_text("{not json")
    with pytest.raises(BadDataError, match="not valid JSON"):
        load_estimator(badjson)
    noweights = _copy(stem, tmp_path / "now")
    noweights.with_suffix(".safetensors").unlink()
    with pytest.raises(BadDataError, match="weights missing"):
        load_estimator(noweights)


def test_find_or_train_caches_and_retrains_on_protocol_change(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    m = _vfa((5.0, 18.0))
    net, _card, path, now = find_or_train("vfa", m, protocol_dict(m), [], cache, TINY)
    assert now and path.parent == cache and path.is_file()
    net2, _, path2, now2 = find_or_train("vfa", m, protocol_dict(m), [], cache, TINY)
    assert not now2 and path2 == path
    assert torch.equal(net.out.weight, net2.out.weight)
    m3 = _vfa((6.0, 18.0))
    _, _, path3, now3 = find_or_train("vfa", m3, protocol_dict(m3), [], cache, TINY)
    assert now3 and path3 != path
    # a corrupt cache entry is retrained (and replaced)
    path.write_bytes(b"garbage")
    _, _, path4, now4 = find_or_train("vfa", m, protocol_dict(m), [], cache, TINY)
    assert now4 and path4 == path
    load_estimator(path)
    assert not list(cache.glob("*.tmp"))


def test_search_dirs_come_before_the_cache(trained, tmp_path: Path) -> None:
    model, _net, stem = trained
    shipped = _copy(stem, tmp_path / "ship")
    _, _, path, now = find_or_train("vfa", model, protocol_dict(model), [shipped.parent],
                                    tmp_path / "cache", TINY)
    assert not now and path == shipped.with_suffix(".safetensors")
    # a corrupt shipped/searched model is an error, never silently retrained
    shipped.with_suffix(".safetensors").write_bytes(b"x")
    with pytest.raises(BadDataError):
        find_or_train("vfa", model, protocol_dict(model), [shipped.parent], tmp_path / "c2", TINY)


def test_parallel_participants_train_once(tmp_path: Path) -> None:
    m = _vfa((7.0, 19.0))
    results = []

    def worker() -> None:
        results.append(find_or_train("vfa", m, protocol_dict(m), [], tmp_path, TINY)[3])

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


@pytest.mark.parametrize("sub, suffix", [("sub-brain02", "VFA"), ("sub-brain03", "IRT1"),
                                         ("sub-kidney01", "MESE")])
def test_demo_protocols_find_their_shipped_model(ds_real, sub, suffix) -> None:
    from qmri_bids.qmri import protocols as pr
    from qmri_bids.qmri.model_store import canonical_order

    paths = sorted((ds_real / sub / "anat").glob(f"*_{suffix}.nii*"))
    model = pr.protocol_from_collection(pr.collection_from_paths(paths, suffix)).model()
    _, model = canonical_order(model)
    stem = SHIPPED_DIR / estimator_stem(model.name, protocol_dict(model))
    if not stem.with_suffix(".json").is_file():
        pytest.skip(f"{stem.name} not shipped")
    _net, card = load_estimator(stem, model)
    assert card["model"] == model.name
