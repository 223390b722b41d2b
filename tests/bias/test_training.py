"""Training data, the loss terms, a short training run, resumption and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qmri_bids.artifacts import sha256_file
from qmri_bids.bias.cnn import BiasNetConfig
from qmri_bids.bias.synth import SynthConfig, SynthPool
from qmri_bids.bias.train import (
    TrainConfig,
    export_model,
    implicit_loss,
    train,
    training_fields,
    training_loss,
    validate,
    validation_set,
)
from qmri_bids.bias.training_data import TrainingPool, dead_leaves, load_photos

TINY = BiasNetConfig(in_size=32, base_channels=4, depth=3, out_level=1)


@pytest.fixture(scope="module")
def tiny_pool() -> TrainingPool:
    return TrainingPool.build(size=32, n_dead_leaves=24, n_photo_crops=24, n_masks=12, seed=0)


@pytest.fixture(scope="module")
def synth_pool() -> SynthPool:
    return SynthPool.build(16, seed=0, cfg=SynthConfig(size=32), per_axis=3)


def test_dead_leaves_statistics() -> None:
    rng = np.random.default_rng(0)
    im = dead_leaves(64, rng)
    assert im.shape == (64, 64) and im.dtype == np.float32
    assert im.min() >= 0.02 and im.max() <= 1.5
    # occluding leaves: many distinct levels and edges, not noise and not flat
    assert im.std() > 0.05
    assert len(np.unique(np.round(im, 2))) > 20


def test_photos_offline_and_pool_background(tiny_pool: TrainingPool) -> None:
    assert len(load_photos(("camera", "astronaut"))) == 2
    v, m = tiny_pool.batch(8, torch.Generator().manual_seed(1))
    assert v.shape == (8, 1, 32, 32)
    assert torch.all(v[~m] == 0) and torch.all(v[m] > 0)
    assert bool((~m).any())  # some air present


def test_loss_is_zero_for_a_perfect_oracle() -> None:
    """For flat content u (constant inside the mask) the field of u*b is b itself, so the oracle
    F(x) = x / geometric_mean(x) is exact: every term of the loss vanishes. F = 1, which ignores
    the field, is penalised. The loss measures what it claims."""

    class Oracle(torch.nn.Module):
        def log_field(self, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            lv = torch.log(v.clamp_min(1e-6))
            mean = (lv * m).sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True)
            return torch.where(m > 0, lv - mean, torch.zeros_like(v))

    class Identity(torch.nn.Module):
        def log_field(self, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(v)

    m = torch.zeros(3, 1, 24, 24)
    m[:, :, 4:20, 2:22] = 1
    v = 3.0 * m
    from qmri_bids.bias.fields import random_bias_field_torch

    b = random_bias_field_torch(3, (24, 24), torch.Generator().manual_seed(0), (4, 8), mask=m)
    loss, _terms = implicit_loss(Oracle(), v, m, b)  # type: ignore[arg-type]
    assert float(loss) == pytest.approx(0.0, abs=1e-9)
    _loss_id, terms_id = implicit_loss(Identity(), v, m, b)  # type: ignore[arg-type]
    assert terms_id["consistency"] > 1e-4
    assert terms_id["idempotence_v"] == pytest.approx(0.0, abs=1e-12)
    # the explicit terms know the truth (u is bias-free): zero for the oracle, not for F = 1
    every = torch.ones(3, dtype=torch.bool)
    _, t_or = training_loss(Oracle(), v, m, b, w_explicit=1.0, explicit=every)  # type: ignore
    _, t_id = training_loss(Identity(), v, m, b, w_explicit=1.0, explicit=every)  # type: ignore
    assert t_or["explicit"] == pytest.approx(0.0, abs=1e-9)
    assert t_id["explicit"] == pytest.approx(terms_id["consistency"], rel=1e-5)


def test_short_training_lowers_both_losses_and_resumes_identically(synth_pool: SynthPool,
                                                                  tmp_path) -> None:
    cfg = TrainConfig(net=TINY, steps=60, batch_size=8, lr=3e-3, lr_final=1e-3, seed=3,
                      checkpoint_every=20, log_every=10)
    # held out: slices of other volumes (another seed) and fields never drawn in training
    held = SynthPool.build(4, seed=99, cfg=SynthConfig(size=32), per_axis=3)
    v, m = held.batch(32, torch.Generator().manual_seed(5))
    b = training_fields(cfg, 32, m.float(), torch.Generator().manual_seed(6))
    every = torch.ones(32, dtype=torch.bool)

    def held_out_terms(net: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return training_loss(net, v, m.float(), b, cfg.alpha, 1.0, 1.0, every)[1]

    untrained, _ = train(TrainConfig(**{**cfg.__dict__, "steps": 0}), pool=synth_pool)
    before = held_out_terms(untrained)
    net, summary = train(cfg, tmp_path / "full", pool=synth_pool)
    after = held_out_terms(net)
    assert summary["steps_done"] == 60
    # both losses drop on held-out data: the implicit one (consistency of F(v b) / F(v)) and
    # the explicit one (F(v b) against the true field)
    assert after["consistency"] < 0.95 * before["consistency"], (before, after)
    assert after["explicit"] < 0.95 * before["explicit"], (before, after)
    vset = validation_set(size=32, n=12, seed=11)
    assert set(validate(net, vset)) >= {"synth_field_mae", "synth_consistency_mae",
                                        "photos_consistency_mae"}

    # interrupted after 20 steps...
    train(cfg, tmp_path / "resumed", pool=synth_pool, until_step=20)
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert state["step"] == 20
    # ...and resumed to 60 with the full config: bit-identical weights to the uninterrupted run
    resumed, s2 = train(cfg, tmp_path / "resumed", pool=synth_pool)
    assert s2["steps_done"] == 60
    for (k, a), (_, b) in zip(net.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k

    # export: weights + card with hash and recipe
    out = export_model(net, tmp_path / "m" / "tiny.safetensors", cfg, summary, after)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(out)
    assert card["architecture"]["config"] == TINY.to_dict()
    assert card["training"]["steps"] == 60 and card["training"]["seed"] == 3
    assert "torch" in card["hardware"]
    assert set(load_file(str(out))) == set(net.state_dict())


def test_wall_budget_stops_and_checkpoints(synth_pool: SynthPool, tmp_path) -> None:
    cfg = TrainConfig(net=TINY, steps=1000, batch_size=4, seed=0, checkpoint_every=500)
    _, summary = train(cfg, tmp_path, pool=synth_pool, max_wall_s=0.0)
    assert summary["steps_done"] == 1
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 1
