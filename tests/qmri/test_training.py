"""Training and validation of CRB-loss estimators (qmri_bids.qmri.training)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.estimator import CrbEstimator, default_config
from qmri_bids.qmri.models import MESEMonoModel, VFAModel
from qmri_bids.qmri.training import (
    add_noise,
    efficiency_summary,
    make_pool,
    train_estimator,
    validate,
)

VFA = VFAModel([3.0, 20.0], 0.015)
FAST = {"batch_size": 256, "pool_size": 8_000}


@pytest.fixture(scope="module")
def vfa_pool():
    return make_pool(VFA, VFA.default_prior(), 8_000, seed=1)


def test_rician_noise_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.zeros(200_000, 1, dtype=torch.float64)
    y = add_noise(s, torch.full((200_000,), 2.0, dtype=torch.float64), True, gen)
    # zero signal → Rayleigh, mean σ√(π/2)
    assert abs(float(y.mean()) / (2.0 * (torch.pi / 2) ** 0.5) - 1) < 0.01
    c = add_noise(torch.ones(1000, 3, dtype=torch.complex128), torch.full((1000,), 0.1,
                  dtype=torch.float64), False, gen)
    assert c.is_complex() and c.shape == (1000, 3)


def test_short_training_lowers_the_loss(vfa_pool, caplog) -> None:
    torch.manual_seed(0)
    untrained = CrbEstimator(default_config(VFA), VFA).eval()
    before = validate(untrained, VFA, snrs=(50,), n_rep=50)["snr"]["50"]["crb_loss"]
    with caplog.at_level(logging.INFO, logger="qmri_bids.qmri"):
        net, report = train_estimator(VFA, n_steps=400, seed=0, pool=vfa_pool, **FAST)
    assert any("step 400/400" in r.message for r in caplog.records)
    val = validate(net, VFA, snrs=(20, 50, 100), n_rep=50)
    after = val["snr"]["50"]["crb_loss"]
    assert after < 0.2 * before
    assert report.history[-1][1] < report.history[0][1]
    assert set(efficiency_summary(val)) == {"20", "50", "100"}
    assert val["snr"]["50"]["parameters"]["T1"]["efficiency_median"] > 0.3
    assert not report.truncated and report.steps_done == 400


def test_mse_loss_runs_and_differs(vfa_pool) -> None:
    a, ra = train_estimator(VFA, n_steps=30, seed=0, pool=vfa_pool, loss="mse", **FAST)
    b, _ = train_estimator(VFA, n_steps=30, seed=0, pool=vfa_pool, loss="crb", **FAST)
    assert ra.loss == "mse"
    assert not torch.equal(a.out.weight, b.out.weight)
    with pytest.raises(ValueError):
        train_estimator(VFA, n_steps=1, loss="l1", pool=vfa_pool)


def test_reproducible_from_seed() -> None:
    kw = {"n_steps": 40, "batch_size": 128, "pool_size": 4000}
    a, _ = train_estimator(VFA, seed=3, **kw)
    b, _ = train_estimator(VFA, seed=3, **kw)
    c, _ = train_estimator(VFA, seed=4, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_checkpoint_resume_equals_uninterrupted(tmp_path: Path) -> None:
    kw = {"n_steps": 60, "batch_size": 128, "pool_size": 4000, "seed": 5}
    ref, _ = train_estimator(VFA, **kw)
    _part, rep = train_estimator(VFA, checkpoint_dir=tmp_path, checkpoint_every=20, stop_after=30,
                                **kw)
    assert rep.truncated and rep.steps_done == 30
    assert (tmp_path / "weights.safetensors").is_file() and (tmp_path / "state.json").is_file()
    done, rep2 = train_estimator(VFA, checkpoint_dir=tmp_path, checkpoint_every=20, **kw)
    assert rep2.steps_done == 60 and not rep2.truncated
    sr, sd = ref.state_dict(), done.state_dict()
    assert all(torch.allclose(sr[k].float(), sd[k].float(), atol=1e-6) for k in sr)


def test_continued_training_starts_from_the_given_weights(tmp_path: Path, vfa_pool) -> None:
    """``init_weights`` loads a finished network and trains on with a fresh schedule: with a
    zero learning rate the linear weights stay those of the start, and the report says where
    it started."""
    from safetensors.torch import save_file

    first, _ = train_estimator(VFA, n_steps=40, seed=0, pool=vfa_pool, **FAST)
    path = tmp_path / "first.safetensors"
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(path))
    same, report = train_estimator(VFA, n_steps=5, seed=1, pool=vfa_pool, learning_rate=0.0,
                                   init_weights=path, **FAST)
    assert report.initialised_from == "first.safetensors"
    a, b = first.state_dict(), same.state_dict()
    linear = [k for k in a if k.endswith(".weight") and a[k].ndim == 2]
    assert linear and all(torch.equal(a[k], b[k]) for k in linear)
    fresh, fresh_report = train_estimator(VFA, n_steps=5, seed=1, pool=vfa_pool,
                                          learning_rate=0.0, **FAST)
    assert fresh_report.initialised_from is None
    assert not all(torch.equal(a[k], fresh.state_dict()[k]) for k in linear)


def test_unidentifiable_protocols_are_rejected() -> None:
    with pytest.raises(BadDataError, match="cannot determine"):
        make_pool(VFAModel([10.0], 0.015), VFA.default_prior(), 256, seed=0)
    with pytest.raises(BadDataError, match="cannot determine"):
        make_pool(VFAModel([10.0, 10.0, 10.0], 0.015), VFA.default_prior(), 256, seed=0)
    with pytest.raises(BadDataError):
        make_pool(MESEMonoModel([0.02]), MESEMonoModel([0.02]).default_prior(), 256, seed=0)
