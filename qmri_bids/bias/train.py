"""Training of :class:`~qmri_bids.bias.cnn.BiasNet`: implicit (Simkó et al., MIDL 2022) and
explicit terms on content that is bias-free by construction.

For an image ``v`` (foreground mask ``m``) draw a synthetic field ``b`` and, with ``l = log F``,
minimise inside the foreground (``b~`` is ``b`` at geometric mean 1 there: a global scale is not a
field, and F is normalised that way)

* implicit (the paper's terms, in log space, ``alpha = 0.2``):
  ``MSE(l(v b) - l(v), log b~) + alpha * [MSE(l(v / F(v)), 0) + MSE(l(v b / F(v b)), 0)]``.
  "Whatever F believes about v, multiplying by b must change its answer by b; a corrected image
  has no field left." These need no truth.
* explicit: ``MSE(l(v b), log b~) + MSE(l(v), 0)``. Only valid on content with no field of its own:
  the MR-like content of :mod:`qmri_bids.bias.synth` is bias-free by construction, the legacy
  dead leaves/photos are not (shaded leaves, lit photographs), so for them only the implicit terms
  apply.

``total = w_implicit * implicit + w_explicit * explicit``; the mix and the content were chosen by
an ablation (``benchmarks/bias/ablation.py``, table in the README). Log-space MSE equals the paper's
ratio MSE to first order and stays well-conditioned for strong fields.

Fields are the project's one generator (:mod:`qmri_bids.bias.fields`): Gaussian random fields
(the paper's kind) and, in ``p_coil`` of the samples, receive-coil-like one-sided profiles.

Determinism and resumption: batch ``k`` is drawn from a generator seeded by ``(seed, k)`` and the
learning rate is a function of ``k``, so a run interrupted after a checkpoint and resumed reaches
bit-identical weights to an uninterrupted one (CPU, same thread count).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qmri_bids.artifacts import atomic_write, atomic_write_json, write_model
from qmri_bids.bias.cnn import BiasNet, BiasNetConfig, FusionConfig, count_parameters
from qmri_bids.bias.fields import random_bias_field_torch, random_coil_field_torch
from qmri_bids.bias.synth import SynthConfig, SynthPool, synth_slices
from qmri_bids.bias.training_data import (
    VALIDATION_PHOTOS,
    TrainingPool,
    dead_leaves,
    load_photos,
    object_mask,
    random_crop,
)
from qmri_bids.progress import progress
from qmri_bids.provenance import hardware_string

log = logging.getLogger("qmri_bids.bias")

CONTENTS = ("synth", "legacy", "mix")


@dataclass
class TrainConfig:
    net: BiasNetConfig = field(default_factory=BiasNetConfig)
    steps: int = 12000
    batch_size: int = 16
    lr: float = 1e-3
    lr_final: float = 5e-5
    alpha: float = 0.2
    w_implicit: float = 1.0
    w_explicit: float = 1.0
    content: str = "synth"  # synth (MR-like), legacy (dead leaves + photos) or mix (half each)
    length_scale: tuple[float, float] = (0.12, 0.6)  # GRF correlation length, fraction of in_size
    max_value: tuple[float, float] = (1.05, 1.5)  # GRF peak (mean 1)
    p_coil: float = 0.3  # fraction of coil-like fields
    coil_ratio: tuple[float, float] = (1.3, 3.0)  # max / min of a coil-like field in the object
    seed: int = 0
    n_volumes: int = 1500  # synthetic 3-D volumes (4 slices per axis each)
    n_dead_leaves: int = 3000
    n_photo_crops: int = 3000
    n_masks: int = 500
    p_background: float = 0.7
    checkpoint_every: int = 250
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.content not in CONTENTS:
            raise ValueError(f"content must be one of {CONTENTS}, got {self.content!r}")
        if self.content == "legacy" and self.w_explicit > 0:
            raise ValueError("the legacy content (dead leaves, photos) has no known field: "
                             "the explicit term needs w_explicit = 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["net"] = self.net.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["net"] = BiasNetConfig.from_dict(d.get("net", {}))
        for k in ("length_scale", "max_value", "coil_ratio"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- data
class MixedPool:
    """Half of every batch from each of two pools (MR-like synthetic + legacy content); the
    explicit term applies to the first half only."""

    def __init__(self, synth: SynthPool, legacy: TrainingPool) -> None:
        self.synth, self.legacy = synth, legacy

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.synth.batch(n - n // 2, generator)
        b = self.legacy.batch(n // 2, generator)
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


def build_pool(cfg: TrainConfig) -> SynthPool | TrainingPool | MixedPool:
    size = cfg.net.in_size
    synth = legacy = None
    if cfg.content in ("synth", "mix"):
        synth = SynthPool.build(cfg.n_volumes, cfg.seed, SynthConfig(size=size))
        log.info("training pool: %d MR-like slices of %d synthetic volumes", len(synth),
                 cfg.n_volumes)
    if cfg.content in ("legacy", "mix"):
        legacy = TrainingPool.build(size, cfg.n_dead_leaves, cfg.n_photo_crops, cfg.n_masks,
                                    seed=cfg.seed, p_background=cfg.p_background)
    if synth is not None and legacy is not None:
        return MixedPool(synth, legacy)
    return synth if synth is not None else legacy


def pool_tensors(pool: SynthPool | TrainingPool | MixedPool) -> dict[str, torch.Tensor]:
    """A pool as named tensors (to store it as safetensors between workflow nodes)."""
    parts = {"synth": pool.synth, "legacy": pool.legacy} if isinstance(pool, MixedPool) else \
        {"synth" if isinstance(pool, SynthPool) else "legacy": pool}
    return {f"{name}/{key}": getattr(part, key).contiguous() for name, part in parts.items()
            for key in ("images", "masks")}


def pool_from_tensors(tensors: dict[str, torch.Tensor], cfg: TrainConfig
                      ) -> SynthPool | TrainingPool | MixedPool:
    """Inverse of :func:`pool_tensors`."""
    synth = legacy = None
    if "synth/images" in tensors:
        synth = SynthPool(tensors["synth/images"], tensors["synth/masks"])
    if "legacy/images" in tensors:
        legacy = TrainingPool(tensors["legacy/images"], tensors["legacy/masks"], cfg.p_background)
    if synth is not None and legacy is not None:
        return MixedPool(synth, legacy)
    if synth is None and legacy is None:
        raise ValueError("no training pool in the tensors")
    return synth if synth is not None else legacy


def explicit_mask(cfg: TrainConfig, n: int) -> torch.Tensor:
    """Which samples of a batch are bias-free by construction (the explicit term applies)."""
    keep = torch.zeros(n, dtype=torch.bool)
    if cfg.content == "synth":
        keep[:] = True
    elif cfg.content == "mix":
        keep[: n - n // 2] = True
    return keep


def training_fields(cfg: TrainConfig, n: int, mask: torch.Tensor, generator: torch.Generator
                    ) -> torch.Tensor:
    """``(n, 1, S, S)`` fields: GRFs and, in ``p_coil`` of the samples, coil-like profiles."""
    size = cfg.net.in_size
    ls = (cfg.length_scale[0] * size, cfg.length_scale[1] * size)
    b = random_bias_field_torch(n, (size, size), generator, ls, cfg.max_value, mask)
    coil = torch.rand(n, generator=generator) < cfg.p_coil
    if bool(coil.any()):
        k = int(coil.sum())
        b[coil] = random_coil_field_torch(k, (size, size), generator, cfg.coil_ratio, mask[coil])
    return b


# --------------------------------------------------------------------------- loss
def _masked_mse(a: torch.Tensor, b: torch.Tensor | float, m: torch.Tensor) -> torch.Tensor:
    return (((a - b) ** 2) * m).sum() / m.sum().clamp_min(1.0)


def geometric_normalise(b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``b`` divided by its geometric mean inside ``m`` (per sample)."""
    lb = torch.log(b)
    mean = (lb * m).sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    return torch.exp(lb - mean)


def training_loss(net: BiasNet, v: torch.Tensor, m: torch.Tensor, b: torch.Tensor,
                  alpha: float = 0.2, w_implicit: float = 1.0, w_explicit: float = 0.0,
                  explicit: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The implicit and explicit terms (module docstring); returns the total and the terms.

    ``explicit`` (bool per sample) says which samples are bias-free; default none.
    """
    m = (m > 0).to(v.dtype)
    target = torch.log(geometric_normalise(b, m))
    vg = v * b
    lv = net.log_field(v, m)
    lg = net.log_field(vg, m)
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros((), dtype=v.dtype, device=v.device)
    if w_implicit > 0:
        terms["consistency"] = _masked_mse(lg - lv, target, m)
        terms["idempotence_v"] = _masked_mse(net.log_field(v / torch.exp(lv), m), 0.0, m)
        terms["idempotence_g"] = _masked_mse(net.log_field(vg / torch.exp(lg), m), 0.0, m)
        total = total + w_implicit * (terms["consistency"] + alpha * (terms["idempotence_v"]
                                                                     + terms["idempotence_g"]))
    if w_explicit > 0 and explicit is not None and bool(explicit.any()):
        e = explicit.view(-1, 1, 1, 1).to(v.dtype) * m
        terms["explicit"] = _masked_mse(lg, target, e) + _masked_mse(lv, 0.0, e)
        total = total + w_explicit * terms["explicit"]
    terms["total"] = total
    return total, {k: float(t.detach()) for k, t in terms.items()}


def implicit_loss(net: BiasNet, v: torch.Tensor, m: torch.Tensor, b: torch.Tensor,
                  alpha: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's implicit loss alone (no truth needed)."""
    return training_loss(net, v, m, b, alpha, w_implicit=1.0, w_explicit=0.0)


# --------------------------------------------------------------------------- validation
def validation_set(size: int = 64, n: int = 48, seed: int = 987654,
                   length_scale: tuple[float, float] = (0.12, 0.6)) -> dict[str, torch.Tensor]:
    """Held-out images (seeds never used in training; photos never used in training) with masks
    and fields (GRFs of peak 1.1-1.3). Groups: ``synth`` (MR-like volumes of another seed),
    ``dead_leaves`` and ``photos`` (half of them with air around an object)."""
    rng = np.random.default_rng(seed)
    ls = (length_scale[0] * size, length_scale[1] * size)
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    sv, sm = synth_slices(max(1, n // 12), seed + 1, SynthConfig(size=size), per_axis=4)
    sv, sm = torch.from_numpy(sv[:n]).unsqueeze(1), torch.from_numpy(sm[:n]).unsqueeze(1).float()
    out["synth/v"], out["synth/m"] = sv * sm, sm
    out["synth/b"] = random_bias_field_torch(len(sv), (size, size), g, ls, (1.1, 1.3), sm)
    groups: dict[str, list[np.ndarray]] = {"dead_leaves": [dead_leaves(size, rng)
                                                           for _ in range(n)]}
    photos = load_photos(VALIDATION_PHOTOS)
    if photos:
        groups["photos"] = [random_crop(photos[i % len(photos)], size, rng) for i in range(n)]
    for name, ims in groups.items():
        v = torch.from_numpy(np.stack(ims)).unsqueeze(1)
        m = torch.from_numpy(np.stack([object_mask(size, rng) if i % 2 else np.ones((size, size),
                                                                                     bool)
                                       for i in range(len(ims))])).unsqueeze(1).float()
        b = random_bias_field_torch(len(ims), (size, size), g, ls, (1.1, 1.3), m)
        out[f"{name}/v"], out[f"{name}/m"], out[f"{name}/b"] = v * m, m, b
    return out


@torch.no_grad()
def validate(net: BiasNet, vset: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per group: mean |F(v b)/F(v) - b~| (consistency), and for the bias-free ``synth`` group
    mean |F(v b) - b~| (field error against the truth); ``*_identity_mae`` is what doing nothing
    (F = 1) scores. All inside the foreground, b~ = b at geometric mean 1."""
    net.eval()
    res: dict[str, float] = {}
    for name in sorted({k.split("/")[0] for k in vset}):
        v, m, b = vset[f"{name}/v"], vset[f"{name}/m"], vset[f"{name}/b"]
        fg = net(v * b, m)
        ratio = fg / net(v, m)
        target = geometric_normalise(b, m)
        res[f"{name}_consistency_mae"] = float(((ratio - target).abs() * m).sum() / m.sum())
        res[f"{name}_identity_mae"] = float(((1.0 - target).abs() * m).sum() / m.sum())
        if name == "synth":
            res["synth_field_mae"] = float(((fg - target).abs() * m).sum() / m.sum())
    return res


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(ckpt_dir: Path, net: BiasNet, opt: torch.optim.Optimizer, step: int,
                    history: list[dict], wall_s: float, cfg: TrainConfig) -> None:
    """Weights as safetensors, optimiser state (torch.save, only inside the checkpoint dir, never
    shipped), step/history as JSON; JSON is written last so a partial write is never 'valid'."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(ckpt_dir / "weights.safetensors", lambda tmp: save_file(state_dict, str(tmp)))
    atomic_write(ckpt_dir / "optimizer.pt", lambda tmp: torch.save(opt.state_dict(), tmp))
    state = {"step": step, "history": history, "wall_s": wall_s, "config": cfg.to_dict()}
    atomic_write_json(ckpt_dir / "state.json", state)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Cosine decay from lr to lr_final: a pure function of the step (resume-safe)."""
    t = min(step / max(cfg.steps, 1), 1.0)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * t))


def train(cfg: TrainConfig, ckpt_dir: str | Path | None = None, resume: bool = True,
          max_wall_s: float | None = None,
          pool: SynthPool | TrainingPool | MixedPool | None = None,
          vset: dict[str, torch.Tensor] | None = None, validate_every: int = 0,
          until_step: int | None = None, device: str | torch.device = "cpu"
          ) -> tuple[BiasNet, dict]:
    """Train (or resume) and return the net (on the CPU) and a summary (steps, history, wall
    time...).

    ``max_wall_s`` stops this call early (after a checkpoint) once it has trained that long (pool
    building is not counted); the summary says how many steps were done, and a later call
    resumes. ``until_step`` stops this call at that step (the schedule still follows
    ``cfg.steps``). ``pool``/``vset`` can be passed to reuse pre-built data. ``device``: where
    the net and batches live (the data are drawn on the CPU, so the run is the same sequence of
    batches on any device).
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
        pool = build_pool(cfg)
    dev = torch.device(device)
    net.to(dev)
    if start:  # optimiser state follows the parameters' device
        opt.load_state_dict(opt.state_dict())
    t0 = time.perf_counter()
    step = start
    net.train()
    last = cfg.steps if until_step is None else min(until_step, cfg.steps)
    explicit = explicit_mask(cfg, cfg.batch_size).to(dev)
    for _ in progress(range(start, last), desc="bias CNN training", unit="steps"):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        v, m = pool.batch(cfg.batch_size, g)
        mf = m.float()
        b = training_fields(cfg, cfg.batch_size, mf, g)
        v, mf, b = v.to(dev), mf.to(dev), b.to(dev)
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg)
        loss, terms = training_loss(net, v, mf, b, cfg.alpha, cfg.w_implicit, cfg.w_explicit,
                                    explicit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, **terms}
            if vset is not None and validate_every and step % validate_every == 0:
                entry.update(validate(net.cpu(), vset))
                net.to(dev).train()
            history.append(entry)
            log.info("bias CNN step %d/%d loss %.5f (%s)", step, cfg.steps, terms["total"],
                     ", ".join(f"{k} {v:.5f}" for k, v in terms.items() if k != "total"))
        elapsed = time.perf_counter() - t0
        out_of_time = max_wall_s is not None and elapsed >= max_wall_s
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == last
                                 or out_of_time):
            save_checkpoint(ckpt, net, opt, step, history, wall_before + elapsed, cfg)
        if out_of_time:
            log.warning("bias CNN training stopped by the wall-time budget at step %d", step)
            break
    net.cpu().eval()
    return net, {"steps_done": step, "steps_planned": cfg.steps, "history": history,
                 "wall_s": wall_before + time.perf_counter() - t0}


# --------------------------------------------------------------------------- export
def export_model(net: BiasNet, path: str | Path, cfg: TrainConfig, summary: dict,
                 validation: dict[str, float], fusion: FusionConfig | None = None,
                 notes: str = "", hardware: str | None = None) -> Path:
    """Write ``path`` (``*.safetensors``) and its model card ``path.with_suffix('.json')``
    (the project's one card format, :mod:`qmri_bids.artifacts`, kind ``bias-cnn``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model file must end in .safetensors: {path}")
    content = {"synth": "MR-like domain-randomised synthetic volumes (qmri_bids.bias.synth)",
               "legacy": "dead leaves + scikit-image bundled photos (coffee, coins held out)",
               "mix": "half MR-like synthetic volumes, half dead leaves + photos"}[cfg.content]
    card = {
        "architecture": {"class": "qmri_bids.bias.cnn.BiasNet", "backbone": "UNet2D",
                         "config": net.config.to_dict(), "parameters": count_parameters(net),
                         "input": "log(v / median_fg(v)) * mask, mask; (n, 2, S, S)",
                         "output": "log-field on the S / 2**out_level grid, geometric mean 1 "
                                   "in mask, |log| <= log 2"},
        "inference": {"fusion": asdict(fusion or FusionConfig())},
        "training": {
            "method": "implicit (Simko et al., MIDL 2022) + explicit terms on bias-free "
                      "synthetic content" if cfg.w_explicit > 0 else
                      "implicit (Simko et al., MIDL 2022), no ground-truth fields",
            "loss": f"{cfg.w_implicit} * [MSE(l(vb) - l(v), log b~) + {cfg.alpha} * "
                    "(MSE(l(v/F(v)), 0) + MSE(l(vb/F(vb)), 0))] + "
                    f"{cfg.w_explicit} * [MSE(l(vb), log b~) + MSE(l(v), 0)], l = log F, "
                    "masked to the foreground; b~ = b at geometric mean 1",
            "optimizer": "NAdam", "lr_schedule": f"cosine {cfg.lr} -> {cfg.lr_final}",
            "config": cfg.to_dict(),
            "data": content + "; random flips/rot90/intensity scale/field of view",
            "fields": "Gaussian random fields (qmri_bids.bias.fields), mean 1, max "
                      f"{cfg.max_value}, correlation length {cfg.length_scale} x in_size; "
                      f"{cfg.p_coil:.0%} receive-coil-like profiles (max/min {cfg.coil_ratio})",
            "seed": cfg.seed,
            "steps": summary.get("steps_done"),
            "wall_time_s": round(float(summary.get("wall_s", 0.0)), 1),
            "final_loss": (summary.get("history") or [{}])[-1].get("total"),
            "recipe": "python benchmarks/bias/train_shipped.py",
        },
        "validation": validation,
        "hardware": hardware or hardware_string(),
        "notes": notes,
    }
    write_model(path, net.state_dict(), card, kind="bias-cnn")
    log.info("exported bias CNN to %s", path)
    return path
