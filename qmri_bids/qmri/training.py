"""Training and validation of :class:`~qmri_bids.qmri.estimator.CrbEstimator` networks.

Training data are simulated on the fly from the model's own ``forward``:

1. a *pool* of parameter draws from the prior is simulated once (noise-free unit-M0 signals and
   the unit CRB ``F⁻¹`` at σ = 1, all nuisances unknown) — the Jacobian is the expensive part and
   does not depend on the noise, so it is computed once and rescaled by σ² per sample.
   Measured (1 thread, shared 2-core machine): a per-batch CRB costs 17 ms (VFA, 1024 samples),
   34 ms (MESE, 1024) and 1.3 s (MRF, 256, finite differences) per step, against ~13 ms for
   the whole network step (VFA) — the pool makes training 2-25× faster;
2. every step draws a batch from the pool, a new SNR (log-uniform in ``snr_range``), a new M0
   scale (and phase for complex models) and new noise: Gaussian on the real and imaginary
   channels, then the magnitude for magnitude models (Rician data);
3. loss ``"crb"`` = mean over the batch and the network outputs of (θ̂ − θ)²/CRB (Zhang et al.
   2022), or ``"mse"`` = mean of (θ̂ − θ)²/(prior width)² (the baseline);
4. Adam with a cosine learning-rate decay over ``n_steps``.

Deterministic from ``seed`` on the CPU when ``n_steps`` is given (``time_budget_s`` is only a
safety stop; a run cut by it is flagged ``truncated`` in the returned report).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmri_bids.progress import progress
from qmri_bids.provenance import hardware_string
from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.estimator import (
    CrbEstimator,
    EstimatorConfig,
    ParameterPrior,
    default_config,
    split_params,
    unit_crb,
)

log = logging.getLogger("qmri_bids.qmri")

DEFAULT_SNR_RANGE = (10.0, 200.0)


@dataclass
class TrainingReport:
    """What happened during :func:`train_estimator` (goes into the model card)."""

    loss: str
    seed: int
    n_steps: int
    steps_done: int
    batch_size: int
    pool_size: int
    snr_range: tuple[float, float]
    snr_reference: str
    learning_rate: float
    training_time_s: float
    pool_time_s: float
    final_loss: float
    truncated: bool
    hardware: str
    torch_version: str
    history: list[tuple[int, float]] = field(default_factory=list)
    initialised_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["snr_range"] = list(self.snr_range)
        d["history"] = [list(h) for h in self.history]
        return d


# ----------------------------------------------------------------------------- simulation


@dataclass
class Pool:
    """Noise-free training samples at unit scale."""

    shape: torch.Tensor  # [S, P_out] network targets
    b1: torch.Tensor | None  # [S] known B1 (network input) or None
    signal: torch.Tensor  # [S, N] unit-M0 signal (complex for complex models)
    crb: torch.Tensor  # [S, P_out] CRB at M0 = 1, σ = 1
    ref: torch.Tensor  # [S] signal level defining SNR (σ = ref/SNR)


def make_pool(
    model: SignalModel,
    prior: ParameterPrior,
    n: int,
    seed: int,
    snr_reference: str = "max_signal",
    dtype: torch.dtype = torch.float32,
) -> Pool:
    """Draw ``n`` parameter sets from the prior and simulate signal + unit CRB (float64 math)."""
    gen = torch.Generator().manual_seed(int(seed))
    shape, b1 = prior.sample(n, gen, torch.float64)
    crb_u, sig = unit_crb(model, prior, shape, b1)
    if snr_reference == "max_signal":
        ref = sig.abs().amax(-1)
    elif snr_reference == "m0":
        ref = torch.ones(n, dtype=torch.float64)
    else:
        raise ValueError(f"snr_reference must be 'max_signal' or 'm0', got {snr_reference!r}")
    ok = torch.isfinite(crb_u).all(-1) & (ref > 0) & torch.isfinite(sig).all(-1)
    check_identifiable(model, prior, shape, crb_u, ref, ok)
    if int(ok.sum()) < n:
        log.info("pool: dropped %d of %d samples with an infinite CRB", n - int(ok.sum()), n)
    cdt = torch.complex64 if dtype == torch.float32 else torch.complex128
    return Pool(
        shape=shape[ok].to(dtype),
        b1=None if b1 is None else b1[ok].to(dtype),
        signal=sig[ok].to(cdt if sig.is_complex() else dtype),
        crb=crb_u[ok].to(dtype),
        ref=ref[ok].to(dtype),
    )


def check_identifiable(model: SignalModel, prior: ParameterPrior, shape: torch.Tensor,
                       crb_u: torch.Tensor, ref: torch.Tensor, ok: torch.Tensor) -> None:
    """BadDataError when the protocol cannot determine a parameter: a singular Fisher matrix
    (e.g. one VFA flip angle, or all equal), or a CRB at SNR 1000 still above 100 % of the value
    for most of the prior (the shape parameters are not identifiable from these data)."""
    from qmri_bids.errors import BadDataError

    sd_rel = torch.sqrt(crb_u) * (ref / 1000.0)[:, None] / shape.abs().clamp_min(1e-12)
    sd_rel = torch.where(ok[:, None], sd_rel, torch.full_like(sd_rel, float("inf")))
    med = sd_rel.median(0).values
    bad = [n for n, v in zip(prior.names, med.tolist(), strict=True) if not v < 1.0]
    if bad:
        raise BadDataError(
            f"the {model.name} protocol cannot determine {', '.join(bad)}: its Fisher "
            "information is singular or nearly so over the prior (too few distinct "
            f"acquisitions? protocol members: {model_length(model)})")


def model_length(model: SignalModel) -> int:
    n = getattr(model, "n_timepoints", None)
    if n:
        return int(n)
    for attr in ("flip_angle_deg", "inversion_time", "echo_time"):
        v = getattr(model, attr, None)
        if v is not None:
            return int(torch.as_tensor(v).numel())
    return -1


def add_noise(
    signal: torch.Tensor, sigma: torch.Tensor, magnitude: bool, gen: torch.Generator
) -> torch.Tensor:
    """``signal`` + complex Gaussian noise of σ per channel (``sigma[..., None]``); the magnitude
    (Rician data) when ``magnitude``, else complex data."""
    rdt = signal.real.dtype
    n_re = torch.randn(signal.shape, generator=gen, dtype=rdt)
    n_im = torch.randn(signal.shape, generator=gen, dtype=rdt)
    s = sigma[..., None]
    if magnitude:
        if signal.is_complex():
            return torch.sqrt((signal.real + s * n_re) ** 2 + (signal.imag + s * n_im) ** 2)
        return torch.sqrt((signal + s * n_re) ** 2 + (s * n_im) ** 2)
    return torch.complex(signal.real + s * n_re, signal.imag + s * n_im)


def draw_scale(n: int, complex_scale: bool, gen: torch.Generator, dtype: torch.dtype
               ) -> torch.Tensor:
    """Random M0: log-uniform magnitude 0.1-1000, uniform phase for complex models."""
    mag = torch.exp(math.log(0.1) + math.log(1e4) * torch.rand(n, generator=gen, dtype=dtype))
    if not complex_scale:
        return mag
    ph = 2 * math.pi * torch.rand(n, generator=gen, dtype=dtype)
    return torch.polar(mag, ph)


def _batch(pool: Pool, idx: torch.Tensor, snr: torch.Tensor, magnitude: bool,
           complex_scale: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None,
                                                              torch.Tensor, torch.Tensor]:
    sig, ref = pool.signal[idx], pool.ref[idx]
    m0 = draw_scale(idx.numel(), complex_scale, gen, ref.dtype)
    sigma_rel = ref / snr  # noise relative to unit M0
    y = add_noise(sig * m0[:, None], sigma_rel * m0.abs(), magnitude, gen)
    crb = pool.crb[idx] * (sigma_rel**2)[:, None]
    return y, (None if pool.b1 is None else pool.b1[idx]), pool.shape[idx], crb


def crb_loss(pred: torch.Tensor, target: torch.Tensor, crb: torch.Tensor) -> torch.Tensor:
    """mean over samples and parameters of (θ̂ − θ)²/CRB (1 for an unbiased efficient
    estimator); samples whose CRB is infinite do not contribute."""
    w = torch.where(torch.isfinite(crb) & (crb > 0), 1.0 / crb, torch.zeros_like(crb))
    return ((pred - target) ** 2 * w).mean()


def mse_loss(pred: torch.Tensor, target: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    return (((pred - target) / width) ** 2).mean()


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(ckdir: Path, net: CrbEstimator, opt: torch.optim.Optimizer,
                     gen: torch.Generator, step: int, history: list) -> None:
    from safetensors.torch import save_file

    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = ckdir / "weights.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, ckdir / "weights.safetensors")
    torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state()},
               ckdir / "optimizer.pt.tmp")
    os.replace(ckdir / "optimizer.pt.tmp", ckdir / "optimizer.pt")
    (ckdir / "state.json.tmp").write_text(json.dumps({"step": step, "history": history}))
    os.replace(ckdir / "state.json.tmp", ckdir / "state.json")


def _load_checkpoint(ckdir: Path, net: CrbEstimator, opt: torch.optim.Optimizer,
                     gen: torch.Generator) -> tuple[int, list]:
    from safetensors.torch import load_file

    state = json.loads((ckdir / "state.json").read_text())
    net.load_state_dict(load_file(str(ckdir / "weights.safetensors")))
    extra = torch.load(ckdir / "optimizer.pt", weights_only=True)
    opt.load_state_dict(extra["optimizer"])
    gen.set_state(extra["generator"])
    return int(state["step"]), [tuple(h) for h in state["history"]]


# ----------------------------------------------------------------------------- training


def train_estimator(
    model: SignalModel,
    prior: ParameterPrior | None = None,
    snr_range: tuple[float, float] = DEFAULT_SNR_RANGE,
    loss: str = "crb",
    seed: int = 0,
    n_steps: int = 4000,
    time_budget_s: float | None = None,
    batch_size: int = 1024,
    learning_rate: float = 2e-3,
    pool_size: int = 200_000,
    device: str | torch.device = "cpu",
    config: EstimatorConfig | None = None,
    snr_reference: str = "max_signal",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    pool: Pool | None = None,
    num_threads: int | None = 1,
    stop_after: int | None = None,
    init_weights: str | Path | None = None,
) -> tuple[CrbEstimator, TrainingReport]:
    """Train an estimator for ``model`` (one protocol). Returns (network in eval mode, report).

    ``checkpoint_dir``: weights (safetensors) + ``state.json`` + ``optimizer.pt`` every
    ``checkpoint_every`` steps; an existing checkpoint there is resumed. ``pool``: a precomputed
    :func:`make_pool` (e.g. shared by a CRB- and an MSE-trained network). ``num_threads``: torch
    CPU threads during training (default 1: these small networks train ~10-20× *faster* on one
    thread than on two contended ones; None keeps the current setting). ``stop_after``: run at
    most this many steps in this call (time-sliced training with ``checkpoint_dir``; the run is
    then reported ``truncated`` and a later call resumes it). ``init_weights``: start from a
    finished network's safetensors (same config; its SVD basis and M0 table come with it) and
    run a fresh cosine schedule -- continued training after a schedule has decayed to zero.
    """
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        return _train(model, prior, snr_range, loss, seed, n_steps, time_budget_s, batch_size,
                      learning_rate, pool_size, device, config, snr_reference, checkpoint_dir,
                      checkpoint_every, pool, stop_after, init_weights)
    finally:
        torch.set_num_threads(old_threads)


def _train(model, prior, snr_range, loss, seed, n_steps, time_budget_s, batch_size,
           learning_rate, pool_size, device, config, snr_reference, checkpoint_dir,
           checkpoint_every, pool, stop_after, init_weights=None):
    if loss not in ("crb", "mse"):
        raise ValueError(f"loss must be 'crb' or 'mse', got {loss!r}")
    device = torch.device(device)
    prior = prior or model.default_prior()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if pool is None:
        pool = make_pool(model, prior, pool_size, seed + 1, snr_reference)
    pool_time = time.perf_counter() - t0
    log.info("%s: pool of %d samples simulated in %.1f s", model.name, pool.shape.shape[0],
             pool_time)
    config = config or default_config(model, prior, pool.signal.shape[-1])
    net = CrbEstimator(config, model)
    if config.n_svd:
        net.set_svd_basis(pool.signal[: min(20000, pool.signal.shape[0])])
        if net.has_m0_table:
            net.set_m0_table()
    if init_weights is not None:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(init_weights)))
        log.info("%s: initialised from %s", model.name, init_weights)
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed + 2)
    width = torch.tensor([(r.upper - r.lower) for r in prior.ranges], dtype=torch.float32,
                         device=device)
    start, history = 0, []
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckdir is not None and (ckdir / "state.json").is_file():
        start, history = _load_checkpoint(ckdir, net, opt, gen)
        log.info("%s: resumed from %s at step %d", model.name, ckdir, start)
    magnitude = not model.is_complex
    complex_scale = prior.scale == "complex"
    lo_snr, hi_snr = math.log(snr_range[0]), math.log(snr_range[1])
    n_pool = pool.shape.shape[0]
    net.train()
    t_train = time.perf_counter()
    step, running, truncated = start, float("nan"), False
    log_every = max(1, n_steps // 10)
    last = n_steps if stop_after is None else min(n_steps, start + int(stop_after))
    for step in progress(range(start, n_steps), desc=f"training the {model.name} network",
                         unit="steps"):
        if step >= last:
            truncated = True
            if ckdir is not None:
                _save_checkpoint(ckdir, net, opt, gen, step, history)
            break
        if time_budget_s is not None and time.perf_counter() - t_train > time_budget_s:
            truncated = True
            log.warning("%s: time budget %.0f s reached at step %d of %d", model.name,
                        time_budget_s, step, n_steps)
            break
        lr = learning_rate * 0.5 * (1 + math.cos(math.pi * step / n_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n_pool, (batch_size,), generator=gen)
        snr = torch.exp(lo_snr + (hi_snr - lo_snr) * torch.rand(batch_size, generator=gen))
        y, b1, target, crb = _batch(pool, idx, snr.to(pool.ref.dtype), magnitude, complex_scale,
                                    gen)
        y, target, crb = y.to(device), target.to(device), crb.to(device)
        b1 = None if b1 is None else b1.to(device)
        pred = net(y, b1)
        value = crb_loss(pred, target, crb) if loss == "crb" else mse_loss(pred, target, width)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        v = float(value.detach())
        running = v if math.isnan(running) else 0.98 * running + 0.02 * v
        if (step + 1) % log_every == 0 or step + 1 == n_steps:
            history.append((step + 1, running))
            log.info("%s [%s]: step %d/%d loss %.4g (%.1f s)", model.name, loss, step + 1,
                     n_steps, running, time.perf_counter() - t_train)
        if ckdir is not None and (step + 1) % checkpoint_every == 0:
            _save_checkpoint(ckdir, net, opt, gen, step + 1, history)
    else:
        step = n_steps
    steps_done = step if truncated else n_steps
    net.eval()
    report = TrainingReport(
        loss=loss, seed=seed, n_steps=n_steps, steps_done=steps_done, batch_size=batch_size,
        pool_size=n_pool, snr_range=(float(snr_range[0]), float(snr_range[1])),
        snr_reference=snr_reference, learning_rate=learning_rate,
        training_time_s=round(time.perf_counter() - t0, 2), pool_time_s=round(pool_time, 2),
        final_loss=running, truncated=truncated, hardware=hardware_string(device),
        torch_version=torch.__version__, history=history,
        initialised_from=None if init_weights is None else Path(init_weights).name,
    )
    return net.cpu(), report


# ----------------------------------------------------------------------------- validation


def validation_grid(prior: ParameterPrior, n_grid: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Regular grid inside the prior (10 % away from its edges); with a known-B1 input, B1 is a
    grid dimension too (0.8, 1.0, 1.2)."""
    p = len(prior.ranges)
    if n_grid is None:
        n_grid = {1: 15, 2: 8}.get(p, 5)
    axes = [r.grid(n_grid) for r in prior.ranges]
    if prior.b1 is not None:
        axes.append(torch.tensor([0.8, 1.0, 1.2], dtype=torch.float64))
    mesh = torch.stack([m.reshape(-1) for m in torch.meshgrid(*axes, indexing="ij")], -1)
    mesh = mesh[prior.admissible(mesh[:, : len(prior.ranges)])]
    if prior.b1 is not None:
        return mesh[:, :-1].contiguous(), mesh[:, -1].contiguous()
    return mesh, None


Estimator = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def shape_estimator(net: CrbEstimator) -> Estimator:
    """The network's own outputs (no scale fit) as an estimator of the shape parameters."""

    def f(y: torch.Tensor, b1: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return net(y.to(torch.complex64 if y.is_complex() else torch.float32),
                       None if b1 is None else b1.float()).double()

    return f


def full_to_shape(model: SignalModel, prior: ParameterPrior,
                  full_estimator: Estimator) -> Estimator:
    """Wrap an estimator of all model parameters (NLLS, dictionary) into a shape estimator."""

    def f(y: torch.Tensor, b1: torch.Tensor | None) -> torch.Tensor:
        return split_params(model, prior, full_estimator(y, b1))[0].real.double()

    return f


def validate(
    estimator: CrbEstimator | Estimator,
    model: SignalModel,
    prior: ParameterPrior | None = None,
    snrs: tuple[float, ...] = (20.0, 50.0, 100.0),
    n_grid: int | None = None,
    n_rep: int = 200,
    seed: int = 12345,
    snr_reference: str = "max_signal",
) -> dict[str, Any]:
    """Efficiency CRB/MSE, bias and CRB-normalised loss on a held-out grid of the prior.

    For each SNR and grid point, ``n_rep`` noisy realisations are estimated; per parameter the
    *median over the grid* of CRB/MSE (MSE including bias) is reported, with the median |bias|
    relative to the true value and to √CRB, and the mean CRB-normalised loss over everything.
    ``estimator`` is a network or a callable ``(data, b1) -> shape parameters``
    (see :func:`full_to_shape`).
    """
    prior = prior or (estimator.prior if isinstance(estimator, CrbEstimator)
                      else model.default_prior())
    f = shape_estimator(estimator) if isinstance(estimator, CrbEstimator) else estimator
    shape, b1 = validation_grid(prior, n_grid)
    crb_u, sig = unit_crb(model, prior, shape, b1)
    ref = sig.abs().amax(-1) if snr_reference == "max_signal" else torch.ones(shape.shape[0],
                                                                            dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    g = shape.shape[0]
    out: dict[str, Any] = {"grid_points": g, "n_rep": n_rep, "snr_reference": snr_reference,
                           "parameters": list(prior.names), "snr": {}}
    for snr in snrs:
        sigma = (ref / snr)[:, None].expand(g, n_rep)
        y = add_noise(sig[:, None, :].expand(g, n_rep, sig.shape[-1]), sigma,
                      not model.is_complex, gen)
        kb = None if b1 is None else b1[:, None].expand(g, n_rep).reshape(-1)
        t0 = time.perf_counter()
        est = f(y.reshape(g * n_rep, -1), kb).reshape(g, n_rep, -1)
        dt = time.perf_counter() - t0
        crb = crb_u * (ref / snr)[:, None] ** 2
        finite = torch.isfinite(est)
        est_f = torch.where(finite, est, shape[:, None, :].expand_as(est) * 10)  # failure: big
        err = est_f - shape[:, None, :]
        mse = (err**2).mean(1)
        bias = err.mean(1)
        eff = crb / mse
        loss = ((err**2) / crb[:, None, :]).mean()
        per = {}
        for i, name in enumerate(prior.names):
            per[name] = {
                "efficiency_median": float(eff[:, i].median()),
                "efficiency_p10": float(torch.quantile(eff[:, i], 0.1)),
                "bias_rel_median": float((bias[:, i].abs() / shape[:, i].abs()).median()),
                "bias_over_sd_crb_median": float((bias[:, i].abs() / crb[:, i].sqrt()).median()),
                "rmse_rel_median": float((mse[:, i].sqrt() / shape[:, i].abs()).median()),
                "failed_fraction": float((~finite[..., i]).float().mean()),
            }
        out["snr"][str(int(snr)) if float(snr).is_integer() else str(snr)] = {
            "parameters": per, "crb_loss": float(loss), "voxels_per_s": g * n_rep / dt,
        }
    return out


def efficiency_summary(val: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{snr: {param: median efficiency}} from :func:`validate`'s output (for model cards)."""
    return {s: {p: round(v["efficiency_median"], 4) for p, v in d["parameters"].items()}
            for s, d in val["snr"].items()}


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
