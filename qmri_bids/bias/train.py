"""Implicit training of :class:`~qmri_bids.bias.cnn.BiasNet` (Simkó et al., MIDL 2022).

No ground-truth field is ever needed. For an image ``v`` (with foreground mask ``m``) draw a
synthetic field ``b`` and minimise, inside the foreground,

    MSE(F(v b) / F(v), b~) + alpha * [MSE(F(v / F(v)), 1) + MSE(F(v b / F(v b)), 1)],  alpha = 0.2

The first term says "whatever F believes about v, multiplying by b must change its answer by b";
the other two say "a corrected image has no field left". ``b~`` is ``b`` divided by its geometric
mean in the foreground: F is normalised to geometric mean 1 there (a global scale is not a field),
so the exact paper target would carry an irreducible constant error.

Deviations from the paper, for a CPU budget of ~25 minutes on 2 threads (documented in the card):
32x32 images (paper 256), batch 16 (paper 32), NAdam lr 1e-3 with cosine decay to 1e-4 (paper
1e-4 constant; far more steps than we can afford), dead leaves + scikit-image photos instead of
ImageNet (see :mod:`qmri_bids.bias.training_data`). Field length scales are the paper's 10-50 px on
256 px expressed for 32 px, i.e. 1.25-6.25 px, lower bound raised to 2 px because the inference
fusion (6 cosines per axis) cannot represent finer fields anyway.

Determinism and resumption: batch ``k`` is drawn from a generator seeded by ``(seed, k)`` and the
learning rate is a function of ``k``, so a run interrupted after a checkpoint and resumed reaches
bit-identical weights to an uninterrupted one (CPU, same thread count).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qmri_bids.bias.cnn import BiasNet, BiasNetConfig, FusionConfig, count_parameters
from qmri_bids.bias.fields import random_bias_field_torch
from qmri_bids.bias.training_data import (
    VALIDATION_PHOTOS,
    TrainingPool,
    dead_leaves,
    load_photos,
    object_mask,
    random_crop,
)
from qmri_bids.provenance import hardware_string, sha256_file

log = logging.getLogger("qmri_bids.bias")

MODEL_FORMAT = "qmri-bids-bias-cnn"


@dataclass
class TrainConfig:
    net: BiasNetConfig = field(default_factory=BiasNetConfig)
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    lr_final: float = 1e-4
    alpha: float = 0.2
    length_scale: tuple[float, float] = (2.0, 6.25)  # px on in_size images
    max_value: tuple[float, float] = (1.1, 1.3)
    seed: int = 0
    n_dead_leaves: int = 600
    n_photo_crops: int = 600
    n_masks: int = 300
    p_background: float = 0.7
    checkpoint_every: int = 250
    log_every: int = 50

    def to_dict(self) -> dict:
        d = asdict(self)
        d["net"] = self.net.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["net"] = BiasNetConfig.from_dict(d.get("net", {}))
        for k in ("length_scale", "max_value"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- loss
def _masked_mse(a: torch.Tensor, b: torch.Tensor | float, m: torch.Tensor) -> torch.Tensor:
    return (((a - b) ** 2) * m).sum() / m.sum().clamp_min(1.0)


def geometric_normalise(b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``b`` divided by its geometric mean inside ``m`` (per sample)."""
    lb = torch.log(b)
    mean = (lb * m).sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    return torch.exp(lb - mean)


def implicit_loss(net: BiasNet, v: torch.Tensor, m: torch.Tensor, b: torch.Tensor,
                  alpha: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's loss (see module docstring); returns the total and its three terms."""
    m = (m > 0).to(v.dtype)
    vg = v * b
    fv = net(v, m)
    fg = net(vg, m)
    consistency = _masked_mse(fg / fv, geometric_normalise(b, m), m)
    idem_v = _masked_mse(net(v / fv, m), 1.0, m)
    idem_g = _masked_mse(net(vg / fg, m), 1.0, m)
    total = consistency + alpha * (idem_v + idem_g)
    terms = {"consistency": consistency, "idempotence_v": idem_v, "idempotence_g": idem_g,
             "total": total}
    return total, {k: float(t.detach()) for k, t in terms.items()}


# --------------------------------------------------------------------------- validation
def validation_set(size: int = 32, n: int = 48, seed: int = 987654,
                   length_scale: tuple[float, float] = (2.0, 6.25)) -> dict[str, torch.Tensor]:
    """Held-out images (a seed never used in training; photos never used in training) with masks
    and fields. Half of the images get air around an object."""
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[np.ndarray]] = {"dead_leaves": [dead_leaves(size, rng)
                                                           for _ in range(n)]}
    photos = load_photos(VALIDATION_PHOTOS)
    if photos:
        groups["photos"] = [random_crop(photos[i % len(photos)], size, rng) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    for name, ims in groups.items():
        v = torch.from_numpy(np.stack(ims)).unsqueeze(1)
        m = torch.from_numpy(np.stack([object_mask(size, rng) if i % 2 else np.ones((size, size),
                                                                                     bool)
                                       for i in range(len(ims))])).unsqueeze(1).float()
        b = random_bias_field_torch(len(ims), (size, size), g, length_scale, (1.1, 1.3), m)
        out[f"{name}/v"], out[f"{name}/m"], out[f"{name}/b"] = v * m, m, b
    return out


@torch.no_grad()
def validate(net: BiasNet, vset: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean |F(v b)/F(v) - b~| inside the foreground (b~: b at geometric mean 1), per group,
    and the same for the identity F = 1 (what "doing nothing" scores) for reference."""
    net.eval()
    res: dict[str, float] = {}
    for name in sorted({k.split("/")[0] for k in vset}):
        v, m, b = vset[f"{name}/v"], vset[f"{name}/m"], vset[f"{name}/b"]
        ratio = net(v * b, m) / net(v, m)
        target = geometric_normalise(b, m)
        res[f"{name}_consistency_mae"] = float(((ratio - target).abs() * m).sum() / m.sum())
        res[f"{name}_identity_mae"] = float(((1.0 - target).abs() * m).sum() / m.sum())
    return res


# --------------------------------------------------------------------------- checkpoints
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, net: BiasNet, opt: torch.optim.Optimizer, step: int,
                    history: list[dict], wall_s: float, cfg: TrainConfig) -> None:
    """Weights as safetensors, optimiser state (torch.save, only inside the checkpoint dir, never
    shipped), step/history as JSON; JSON is written last so a partial write is never 'valid'."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / "weights.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, ckpt_dir / "weights.safetensors")
    tmp = ckpt_dir / "optimizer.pt.tmp"
    torch.save(opt.state_dict(), tmp)
    os.replace(tmp, ckpt_dir / "optimizer.pt")
    state = {"step": step, "history": history, "wall_s": wall_s, "config": cfg.to_dict()}
    _atomic_write_bytes(ckpt_dir / "state.json", json.dumps(state, indent=1).encode())


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Cosine decay from lr to lr_final: a pure function of the step (resume-safe)."""
    t = min(step / max(cfg.steps, 1), 1.0)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * t))


def train(cfg: TrainConfig, ckpt_dir: str | Path | None = None, resume: bool = True,
          max_wall_s: float | None = None, pool: TrainingPool | None = None,
          vset: dict[str, torch.Tensor] | None = None, validate_every: int = 0,
          until_step: int | None = None) -> tuple[BiasNet, dict]:
    """Train (or resume) and return the net and a summary (steps, history, wall time...).

    ``max_wall_s`` stops early (after a checkpoint) so a budget is never exceeded (pool building
    is not counted); the summary says how many steps were done. ``until_step`` stops this call at
    that step (the schedule still follows ``cfg.steps``), e.g. to train in sessions. ``pool``/``vset`` can be passed to reuse pre-built data.
    """
    torch.manual_seed(cfg.seed)
    net = BiasNet(cfg.net)
    opt = torch.optim.NAdam(net.parameters(), lr=cfg.lr)
    start, history, wall_before = 0, [], 0.0
    ckpt = Path(ckpt_dir) if ckpt_dir is not None else None
    if ckpt is not None and resume and (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        net.load_state_dict(load_file(str(ckpt / "weights.safetensors")))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        start, history, wall_before = state["step"], state["history"], state["wall_s"]
        log.info("resuming bias CNN training at step %d from %s", start, ckpt)
    if pool is None:
        pool = TrainingPool.build(cfg.net.in_size, cfg.n_dead_leaves, cfg.n_photo_crops,
                                  cfg.n_masks, seed=cfg.seed, p_background=cfg.p_background)
    t0 = time.perf_counter()
    step = start
    net.train()
    last = cfg.steps if until_step is None else min(until_step, cfg.steps)
    while step < last:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        v, m = pool.batch(cfg.batch_size, g)
        mf = m.float()
        b = random_bias_field_torch(cfg.batch_size, (cfg.net.in_size,) * 2, g, cfg.length_scale,
                                    cfg.max_value, mf)
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg)
        loss, terms = implicit_loss(net, v, mf, b, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, **terms}
            if vset is not None and validate_every and step % validate_every == 0:
                entry.update(validate(net, vset))
                net.train()
            history.append(entry)
            log.info("bias CNN step %d/%d loss %.5f (consistency %.5f)", step, cfg.steps,
                     terms["total"], terms["consistency"])
        elapsed = time.perf_counter() - t0
        out_of_time = max_wall_s is not None and wall_before + elapsed >= max_wall_s
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == last
                                 or out_of_time):
            save_checkpoint(ckpt, net, opt, step, history, wall_before + elapsed, cfg)
        if out_of_time:
            log.warning("bias CNN training stopped by the wall-time budget at step %d", step)
            break
    net.eval()
    return net, {"steps_done": step, "steps_planned": cfg.steps, "history": history,
                 "wall_s": wall_before + time.perf_counter() - t0}


# --------------------------------------------------------------------------- export
def export_model(net: BiasNet, path: str | Path, cfg: TrainConfig, summary: dict,
                 validation: dict[str, float], fusion: FusionConfig | None = None,
                 notes: str = "") -> Path:
    """Write ``path`` (``*.safetensors``) and the model card ``path.with_suffix('.json')``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model file must end in .safetensors: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": MODEL_FORMAT})
    path.chmod(0o644)  # safetensors writes 0600; a shipped file must be readable by every user
    card = {
        "format": MODEL_FORMAT,
        "format_version": 1,
        "name": path.stem,
        "weights_file": path.name,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "architecture": {"class": "qmri_bids.bias.cnn.BiasNet", "backbone": "UNet2D",
                         "config": net.config.to_dict(), "parameters": count_parameters(net),
                         "input": "log(v / median_fg(v)) * mask, mask; (n, 2, S, S)",
                         "output": "log-field, geometric mean 1 in mask, |log| <= log 2"},
        "inference": {"fusion": asdict(fusion or FusionConfig())},
        "training": {
            "method": "implicit (Simko et al., MIDL 2022), no ground-truth fields",
            "loss": "MSE(F(v b)/F(v), b~) + alpha*(MSE(F(v/F(v)),1) + MSE(F(vb/F(vb)),1)),"
                    " masked to the foreground; b~ = b at geometric mean 1",
            "optimizer": "NAdam", "lr_schedule": f"cosine {cfg.lr} -> {cfg.lr_final}",
            "config": cfg.to_dict(),
            "data": "procedural dead leaves + scikit-image bundled photos (coffee, coins held "
                    "out), random flips/rot90/intensity scale, air around random objects",
            "fields": "Gaussian random fields (qmri_bids.bias.fields), mean 1, max "
                      f"{cfg.max_value}, length scale {cfg.length_scale} px on "
                      f"{cfg.net.in_size} px",
            "seed": cfg.seed,
            "steps": summary.get("steps_done"),
            "wall_time_s": round(float(summary.get("wall_s", 0.0)), 1),
            "final_loss": (summary.get("history") or [{}])[-1].get("total"),
        },
        "validation": validation,
        "hardware": hardware_string(),
        "notes": notes,
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("exported bias CNN to %s (sha256 %s)", path, card["sha256"])
    return path
