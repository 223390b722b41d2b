"""CRB-informed neural-network parameter estimators (Zhang et al., MRM 2022;88:436-448).

A :class:`CrbEstimator` maps the signal of one voxel (one protocol, one ``SignalModel``) to the
model parameters. It is trained (``qmri_bids.qmri.training``) with the loss

    L = mean_{n, p} (θ̂_pn − θ_pn)² / CRB_p(θ_n, σ_n)

so that an unbiased efficient estimator scores 1 for every parameter.

**Scale (M0) as a nuisance.** Every model here is linear in one scale parameter (M0, S0, the IR
``a``, or the complex M0 of MRF). The network only sees the signal divided by its L2 norm (after
an SVD compression and phase removal for complex/long signals), so it never has to learn the
scale; it outputs the *shape* parameters (T1, T2, R2*, B1, and scale-relative nuisances such as
the IR ratio ``b/a``) and the scale is recovered afterwards by linear least squares given them
(``M0 = <s₁, y> / <s₁, s₁>`` with ``s₁`` the unit-scale signal; complex for MRF), so every
parameter map of the model is complete.

**SNR convention.** ``SNR = max_n |s_n(θ)| / σ``: relative to the brightest noise-free member of
the protocol (what a user measures as tissue brightness over background noise), not to M0. With
VFA flip angles of 3° the signal is ~5 % of M0, so an M0-referenced SNR of 20 would be a signal
SNR of ~1, where no estimator is informative. ``snr_reference="m0"`` gives the paper's convention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qmri_bids.qmri.base import ParameterSpec, SignalModel
from qmri_bids.qmri.crb import inverse_diagonal, jacobian_mode, model_jacobian
from qmri_bids.qmri.prior import ParameterPrior

#: bumped whenever the network / normalisation / prior semantics change (enters the protocol hash)
ESTIMATOR_VERSION = "2"

# ----------------------------------------------------------------------------- parameter algebra


def assemble_params(
    model: SignalModel, prior: ParameterPrior, shape: torch.Tensor, m0: torch.Tensor
) -> torch.Tensor:
    """Full model parameters ``[..., P]`` from shape parameters ``[..., P_out]`` and the scale
    ``m0[...]`` (real, or complex when ``prior.scale == "complex"``)."""
    by_name = {n: shape[..., i] for i, n in enumerate(prior.names)}
    cols = []
    for spec in model.parameters:
        n = spec.name
        if prior.scale == "complex" and n == "M0_re":
            cols.append(m0.real)
        elif prior.scale == "complex" and n == "M0_im":
            cols.append(m0.imag)
        elif n == prior.scale:
            cols.append(m0)
        elif n in prior.relative:
            cols.append(by_name[n] * m0)
        elif n in by_name:
            cols.append(by_name[n])
        else:
            raise ValueError(f"parameter {n!r} of model {model.name!r} is not in the prior")
    return torch.stack(cols, dim=-1)


def split_params(
    model: SignalModel, prior: ParameterPrior, params: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`assemble_params`: (shape ``[..., P_out]``, m0 ``[...]``)."""
    names = model.parameter_names
    if prior.scale == "complex":
        m0 = torch.complex(params[..., names.index("M0_re")], params[..., names.index("M0_im")])
    else:
        m0 = params[..., names.index(prior.scale)]
    cols = []
    for n in prior.names:
        v = params[..., names.index(n)]
        cols.append(v / m0 if n in prior.relative else v)
    return torch.stack(cols, dim=-1), m0


def unit_signal(
    model: SignalModel, prior: ParameterPrior, shape: torch.Tensor, b1: torch.Tensor | None
) -> torch.Tensor:
    """Noise-free signal at unit scale (M0 = 1)."""
    one = torch.ones(shape.shape[:-1], dtype=shape.dtype, device=shape.device)
    m0 = torch.complex(one, torch.zeros_like(one)) if prior.scale == "complex" else one
    return model.forward(assemble_params(model, prior, shape, m0), b1)


def scale_least_squares(signal_unit: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """M0 = <s₁, y>/<s₁, s₁> (complex inner product for complex data)."""
    if signal_unit.is_complex() or data.is_complex():
        s = signal_unit.to(torch.promote_types(signal_unit.dtype, torch.complex64))
        num = (s.conj() * data).sum(-1)
        den = (s.abs() ** 2).sum(-1)
        return num / den.clamp_min(torch.finfo(den.dtype).tiny)
    num = (signal_unit * data).sum(-1)
    den = (signal_unit**2).sum(-1)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class _ScaledModel(SignalModel):
    """``model`` reparameterised as (scale..., shape...) so that the CRB of the shape parameters
    (including ratios such as IR b/a) is a diagonal element of the inverse Fisher matrix."""

    def __init__(self, model: SignalModel, prior: ParameterPrior) -> None:
        self.model, self.prior = model, prior
        self.n_scale = 2 if prior.scale == "complex" else 1
        self.is_complex = model.is_complex
        self.n_timepoints = getattr(model, "n_timepoints", None)  # for jacobian_mode
        self.name = model.name + "-scaled"
        self.parameters = tuple(
            ParameterSpec(f"scale{i}", "", -math.inf, math.inf, True) for i in range(self.n_scale)
        ) + tuple(ParameterSpec(n, "", -math.inf, math.inf) for n in prior.names)

    def _full(self, params: torch.Tensor) -> torch.Tensor:
        k = self.n_scale
        m0 = torch.complex(params[..., 0], params[..., 1]) if k == 2 else params[..., 0]
        return assemble_params(self.model, self.prior, params[..., k:], m0)

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward(self._full(params), b1)

    @property
    def has_exact_jacobian(self) -> bool:
        # without relative parameters the reparameterisation only reorders the parameters
        return self.model.has_exact_jacobian and not self.prior.relative

    def jacobian(self, params: torch.Tensor, b1: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_exact_jacobian:
            return super().jacobian(params, b1)
        signal, jac = self.model.jacobian(self._full(params), b1)
        names = self.model.parameter_names
        scale = ("M0_re", "M0_im") if self.n_scale == 2 else (self.prior.scale,)
        order = [names.index(n) for n in (*scale, *self.prior.names)]
        return signal, jac[..., order]


def unit_crb(
    model: SignalModel,
    prior: ParameterPrior,
    shape: torch.Tensor,
    b1: torch.Tensor | None = None,
    chunk: int = 16384,
    jacobian: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """CRB of the shape parameters at unit scale and σ = 1, and the noise-free unit signal.

    Returns (``crb[..., P_out]``, ``signal[..., N]``). For a scale M0 and noise σ the CRB is
    ``crb · σ²/|M0|²``; all scale and nuisance parameters are unknowns of the Fisher matrix.
    ``jacobian``: ``"exact"`` (the model's own Jacobian where it has one, else torch.func),
    ``"fd"`` (float64 central differences) or ``"auto"``
    (:func:`qmri_bids.qmri.crb.jacobian_mode`).
    """
    sm = _ScaledModel(model, prior)
    batch = shape.shape[:-1]
    flat = shape.reshape(-1, shape.shape[-1])
    b1f = None if b1 is None else torch.broadcast_to(b1, batch).reshape(-1)
    one = torch.ones(flat.shape[0], 1, dtype=flat.dtype)
    scale = torch.cat([one, torch.zeros_like(one)], -1) if sm.n_scale == 2 else one
    full = torch.cat([scale, flat], dim=-1)
    out_c, out_s = [], []
    mode = {"exact": jacobian_mode(sm, full.shape[-1]).replace("fd", "fwd"),
            "fd": "fd"}.get(jacobian, jacobian_mode(sm, full.shape[-1]))
    if mode == "fd":
        chunk = min(chunk, 1024)
    elif mode == "model":
        chunk = min(chunk, 4096)
    for s in range(0, full.shape[0], chunk):
        kb = None if b1f is None else b1f[s: s + chunk]
        with torch.no_grad():
            sig_real, j = model_jacobian(sm, full[s: s + chunk], kb, mode=mode)
        fim = j.transpose(-1, -2) @ j
        out_c.append(inverse_diagonal(fim)[..., sm.n_scale:])
        if model.is_complex:
            n = sig_real.shape[-1] // 2
            out_s.append(torch.complex(sig_real[..., :n], sig_real[..., n:]))
        else:
            out_s.append(sig_real)
    c = torch.cat(out_c).reshape(*batch, -1)
    sig = torch.cat(out_s)
    return c, sig.reshape(*batch, sig.shape[-1])


# ----------------------------------------------------------------------------- the network


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn1, self.fc1 = nn.BatchNorm1d(width), nn.Linear(width, width)
        self.bn2, self.fc2 = nn.BatchNorm1d(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(torch.relu(self.bn1(x)))
        h = self.fc2(torch.relu(self.bn2(h)))
        return x + h


@dataclass
class EstimatorConfig:
    """Everything needed to rebuild a :class:`CrbEstimator` (stored in the model card)."""

    model_name: str
    prior: dict[str, Any]
    n_inputs: int  # signal length N
    is_complex: bool
    n_svd: int = 0  # 0: no compression
    width: int = 128
    depth: int = 3  # residual blocks
    output_margin: float = 0.1  # outputs may exceed the prior by this fraction of its (log-)range
    version: str = ESTIMATOR_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


def default_config(model: SignalModel, prior: ParameterPrior | None = None,
                   n_inputs: int | None = None) -> EstimatorConfig:
    """Sizes per problem. 2-64 point protocols: width 64, 3 residual blocks (~30k weights;
    ~50 kFLOP per voxel, so that inference runs at >= 1 M voxels/s on two CPU threads -- width
    96 measured 0.3 M voxels/s per thread, compute-bound). Long complex signals such as MRF:
    20 SVD coefficients (13 in Zhang et al.; 20 keep >= 99 % of the Fisher information over the
    prior of the default schedule, 13 lose up to 10 % for T2), width 256, 4 blocks."""
    prior = prior or model.default_prior()
    if n_inputs is None:
        probe, _ = prior.sample(1, torch.Generator().manual_seed(0))
        n_inputs = int(unit_signal(model, prior, probe, None if prior.b1 is None else
                                   torch.ones(1, dtype=torch.float64)).shape[-1])
    long = model.is_complex or n_inputs > 64
    extra: dict[str, Any] = {}
    if long:
        # The M0 table replaces a signal simulation per voxel (an EPG run for MRF); it spans the
        # shape parameters and, with a known-B1 input, B1 (grid_sample handles up to 3 axes).
        n_axes = len(prior.ranges) + int(prior.b1 is not None)
        if n_axes <= 3:
            extra = {"m0_grid": {1: 64, 2: 64, 3: 40}[n_axes] if prior.b1 is None else 48}
            if prior.b1 is not None:
                extra["m0_grid_b1"] = 13
    return EstimatorConfig(model.name, prior.to_dict(), n_inputs, bool(model.is_complex),
                           n_svd=20 if long else 0, width=256 if long else 64,
                           depth=4 if long else 3, extra=extra)


class CrbEstimator(nn.Module):
    """Residual MLP estimator of one ``SignalModel`` + protocol.

    ``forward(data, b1)`` returns the shape parameters (network outputs, physical units, bounded
    to the prior widened by ``output_margin``); :meth:`estimate` returns all model parameters,
    the scale solved by least squares. ``signal_model`` (the ``SignalModel`` instance of the
    protocol) is needed by :meth:`estimate` and is not part of the weights.
    """

    def __init__(self, config: EstimatorConfig, signal_model: SignalModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.prior = ParameterPrior.from_dict(config.prior)
        self.signal_model = signal_model
        k = config.n_svd
        if k:
            self.register_buffer("svd_basis", torch.zeros(config.n_inputs, k, 2))  # re, im
            d_in = 2 * k
        else:
            d_in = config.n_inputs
        self.use_b1 = self.prior.b1 is not None
        d_in += int(self.use_b1)
        self.inp = nn.Linear(d_in, config.width)
        self.blocks = nn.Sequential(*[_ResBlock(config.width) for _ in range(config.depth)])
        self.bn_out = nn.BatchNorm1d(config.width)
        self.out = nn.Linear(config.width, len(self.prior.ranges))
        lo, hi, log = [], [], []
        for r in self.prior.ranges:
            if r.log:
                a, b = math.log(r.lower), math.log(r.upper)
            else:
                a, b = r.lower, r.upper
            m = config.output_margin * (b - a)
            if not r.log and r.lower >= 0:  # keep non-negative quantities non-negative
                lo.append(max(a - m, 0.0))
            else:
                lo.append(a - m)
            hi.append(b + m)
            log.append(r.log)
        g = int(config.extra.get("m0_grid", 0))
        g_b1 = int(config.extra.get("m0_grid_b1", 0))
        if g and k and (g_b1 or not self.use_b1):
            p = len(self.prior.ranges)
            self.register_buffer("m0_table", torch.zeros(2 * k, *([g] * p),
                                                         *([g_b1] if self.use_b1 else [])))
        self.register_buffer("out_lo", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("out_hi", torch.tensor(hi, dtype=torch.float32))
        self.register_buffer("out_log", torch.tensor(log, dtype=torch.bool))

    # --------------------------------------------------------------- input normalisation
    def set_svd_basis(self, signals: torch.Tensor) -> None:
        """Compute the compression basis from simulated (noise-free) training signals ``[S, N]``:
        the leading right singular vectors of the L2-normalised signals."""
        k = self.config.n_svd
        x = signals.to(torch.complex128 if signals.is_complex() else torch.float64)
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-30)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh[:k].conj().T  # [N, k]; coefficients c = x @ v
        v = v.to(torch.complex128)
        self.svd_basis.copy_(torch.stack([v.real, v.imag], -1).to(self.svd_basis))

    def normalise(self, data: torch.Tensor) -> torch.Tensor:
        """Signal → network features (scale-free; phase-free for complex data)."""
        if self.config.n_svd:
            v = torch.complex(self.svd_basis[..., 0], self.svd_basis[..., 1])
            x = data.to(v.dtype) if data.is_complex() else data.to(v.real.dtype).to(v.dtype)
            c = x @ v  # [B, k]
            ph = c[..., :1] / c[..., :1].abs().clamp_min(1e-30)
            c = c * ph.conj()
            c = c / torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(1e-30)
            return torch.cat([c.real, c.imag], -1)  # (imag of c0 is 0 after the rotation)
        x = data.to(self.inp.weight.dtype)
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-30)

    def _features(self, data: torch.Tensor, b1: torch.Tensor | None) -> torch.Tensor:
        x = self.normalise(data)
        if self.use_b1:
            kb = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device) if b1 is None else \
                torch.broadcast_to(torch.as_tensor(b1, dtype=x.dtype, device=x.device),
                                   x.shape[:-1])
            x = torch.cat([x, (kb - 1.0).unsqueeze(-1) * 4.0], -1)
        return x

    def unit_outputs(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs in (0, 1) (position inside the output range of each parameter)."""
        x = self._features(data, b1)
        batch = x.shape[:-1]
        h = self.inp(x.reshape(-1, x.shape[-1]))
        h = self.blocks(h)
        z = self.out(torch.relu(self.bn_out(h)))
        return torch.sigmoid(z).reshape(*batch, -1)

    def to_physical(self, u: torch.Tensor) -> torch.Tensor:
        y = self.out_lo.to(u) + (self.out_hi - self.out_lo).to(u) * u
        return torch.where(self.out_log, torch.exp(y), y)

    def to_unit(self, phys: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_physical`."""
        y = torch.where(self.out_log, torch.log(phys), phys)
        return (y - self.out_lo.to(y)) / (self.out_hi - self.out_lo).to(y)

    def forward(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        return self.to_physical(self.unit_outputs(data, b1))

    # --------------------------------------------------------------- M0 table (long signals)
    @property
    def has_m0_table(self) -> bool:
        return hasattr(self, "m0_table")

    def _b1_unit(self, b1: torch.Tensor | None, batch: tuple[int, ...]) -> torch.Tensor:
        """Position of the known B1 inside the prior's B1 range, in [0, 1] (1 = nominal when
        no map is given)."""
        lo, hi = self.prior.b1
        kb = torch.ones(batch, dtype=torch.float64) if b1 is None else torch.broadcast_to(
            torch.as_tensor(b1, dtype=torch.float64), batch)
        return ((kb - lo) / (hi - lo)).clamp(0.0, 1.0)

    def set_m0_table(self) -> None:
        """Tabulate the SVD coefficients of the unit-M0 signal on a regular grid of the output
        range (``config.extra["m0_grid"]`` points per parameter, and ``m0_grid_b1`` points over
        the prior's B1 range when B1 is an input; at most 3 axes): M0 is then
        ``c₁ᴴ Vᴴy / ‖c₁‖²`` with ``c₁`` interpolated (multilinear) at the estimate, instead of a
        full signal simulation per voxel (an EPG run for MRF)."""
        g = int(self.config.extra["m0_grid"])
        p = len(self.prior.ranges)
        axes = [torch.linspace(0, 1, g, dtype=torch.float64)] * p
        if self.use_b1:
            axes = axes + [torch.linspace(0, 1, int(self.config.extra["m0_grid_b1"]),
                                          dtype=torch.float64)]
        u = torch.stack([m.reshape(-1) for m in torch.meshgrid(*axes, indexing="ij")], -1)
        phys = self.to_physical(u[:, :p].float()).to(torch.float64)
        kb = None
        if self.use_b1:
            lo, hi = self.prior.b1
            kb = lo + (hi - lo) * u[:, p]
        with torch.no_grad():
            sig = torch.cat([unit_signal(self.signal_model, self.prior, phys[i: i + 2048],
                                         None if kb is None else kb[i: i + 2048])
                             for i in range(0, phys.shape[0], 2048)])
        v = torch.complex(self.svd_basis[..., 0], self.svd_basis[..., 1]).to(torch.complex64)
        c = sig.to(torch.complex64) @ v  # [G^p (x G_b1), K]
        table = torch.cat([c.real, c.imag], -1).T.reshape(-1, *self.m0_table.shape[1:])
        self.m0_table.copy_(table.to(self.m0_table))

    def _interp_coefficients(self, u: torch.Tensor) -> torch.Tensor:
        """Coefficients of the unit-M0 signal at table coordinates ``u[B, axes]`` in [0, 1]."""
        p = u.shape[-1]
        k = self.config.n_svd
        t = self.m0_table.to(torch.float32)
        grid = (2 * u.to(torch.float32) - 1).flip(-1)  # grid_sample wants (x=last dim, ...)
        if p == 1:
            t = t.unsqueeze(-2)  # [2K, 1, G]
            grid = torch.cat([grid, torch.zeros_like(grid)], -1)
            p = 2
        if p == 2:
            out = torch.nn.functional.grid_sample(t[None], grid[None, :, None, :],
                                                  align_corners=True)[0, :, :, 0]
        else:
            out = torch.nn.functional.grid_sample(t[None], grid[None, :, None, None, :],
                                                  align_corners=True)[0, :, :, 0, 0]
        out = out.T  # [B, 2K]
        return torch.complex(out[:, :k], out[:, k:])

    def m0_from_table(self, data: torch.Tensor, u: torch.Tensor,
                      b1: torch.Tensor | None = None) -> torch.Tensor:
        v = torch.complex(self.svd_basis[..., 0], self.svd_basis[..., 1]).to(torch.complex128)
        cy = data.to(torch.complex128) @ v
        coords = u.reshape(-1, u.shape[-1]).double()
        if self.use_b1:
            coords = torch.cat([coords, self._b1_unit(b1, u.shape[:-1]).reshape(-1, 1)], -1)
        c1 = self._interp_coefficients(coords).to(torch.complex128)
        c1 = c1.reshape(*cy.shape)
        return (c1.conj() * cy).sum(-1) / (c1.abs() ** 2).sum(-1).clamp_min(1e-30)

    # --------------------------------------------------------------- full estimation
    @torch.no_grad()
    def estimate(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        """All model parameters ``[..., P]`` (float64), the scale by least squares (from the M0
        table when there is one, else from the simulated unit signal)."""
        if self.signal_model is None:
            raise RuntimeError("CrbEstimator.signal_model is not set")
        u = self.unit_outputs(data, b1)
        shape = self.to_physical(u.double())
        y = data.to(torch.complex128 if data.is_complex() else torch.float64)
        if self.has_m0_table:
            m0 = self.m0_from_table(y, u, b1 if self.use_b1 else None)
        else:
            kb = None
            if b1 is not None and self.use_b1:
                kb = torch.broadcast_to(torch.as_tensor(b1, dtype=torch.float64,
                                                        device=shape.device), shape.shape[:-1])
            s1 = unit_signal(self.signal_model, self.prior, shape, kb)
            m0 = scale_least_squares(s1, y)
        if self.prior.scale != "complex":
            m0 = m0.real if m0.is_complex() else m0
        return assemble_params(self.signal_model, self.prior, shape, m0)

    def n_weights(self) -> int:
        return sum(p.numel() for p in self.parameters())


def config_to_dict(cfg: EstimatorConfig) -> dict[str, Any]:
    return asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> EstimatorConfig:
    return EstimatorConfig(**d)


def numpy_or_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))
