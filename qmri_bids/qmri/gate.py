"""No unvalidated network maps data: the validation gate and the per-voxel safety net.

**The gate** (:func:`validate_network`). Before a network maps a collection it is validated on
its own protocol at the noise level measured in the data: noisy signals are simulated on a grid
of the prior (10 % inside its edges; B1 0.8/1.0/1.2 for networks with a B1 input), estimated,
and per parameter the median over the grid of the efficiency CRB/MSE and of |bias| / √CRB are
compared with :data:`MIN_EFFICIENCY` and :data:`MAX_BIAS_SD`. Both numbers go into the map
sidecars (``EstimatorValidation``); a network that fails does not make the primary maps (the
mapping falls back to NLLS and says so, :mod:`qmri_bids.qmri.mapping`). Networks trained on
demand are validated right after training at the reference SNR and trained longer once if they
fail (:func:`qmri_bids.qmri.model_store.train_and_card`).

Why these thresholds: an efficiency of 0.7 means the network's error is at most ~20 % above the
best any unbiased estimator can do; a bias of one CRB standard deviation is where the bias starts
to dominate the error of a single voxel. Below either, NLLS (asymptotically efficient and
unbiased) is the better primary estimate.

**The safety net** (:func:`suspicious_voxels`). A network only knows its training prior: an
estimate at or beyond the prior's edges (the NIST phantom's 126 ms sphere against a T1 prior
starting at 200 ms), a known B1 outside the B1 range it was trained on, or a fit residual far
above the noise (a signal the model does not describe) marks a voxel whose estimate is an
extrapolation. Those voxels are refitted with NLLS and counted in the sidecar (``RefitVoxels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.estimator import CrbEstimator

MIN_EFFICIENCY = 0.7
MAX_BIAS_SD = 1.0
#: the SNR at which networks trained on demand are gated before they are cached
REFERENCE_SNR = 50.0
#: a voxel whose squared residual exceeds this many times its expected value (σ² per degree of
#: freedom) is not described by the model
RESIDUAL_FACTOR = 4.0
#: an estimate within this fraction of the prior's (log-)range from an edge is "at" the edge
EDGE_FRACTION = 0.01


@dataclass
class GateResult:
    """The gate's verdict on one network at one SNR."""

    snr: float
    efficiency: dict[str, float]
    bias_sd: dict[str, float]
    passed: bool
    reasons: list[str] = field(default_factory=list)
    n_grid: int = 0
    n_rep: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"SNR": round(self.snr, 2), "Passed": self.passed,
                "EfficiencyMedian": {k: round(v, 3) for k, v in self.efficiency.items()},
                "BiasOverCRBSDMedian": {k: round(v, 3) for k, v in self.bias_sd.items()},
                "Thresholds": {"MinEfficiency": MIN_EFFICIENCY, "MaxBiasOverCRBSD": MAX_BIAS_SD},
                "Reasons": list(self.reasons), "GridPoints": self.n_grid,
                "NoiseRealisations": self.n_rep}


def gate_from_validation(val: dict[str, Any], snr_key: str) -> GateResult:
    """A :class:`GateResult` from :func:`qmri_bids.qmri.training.validate`'s output."""
    per = val["snr"][snr_key]["parameters"]
    eff = {name: float(d["efficiency_median"]) for name, d in per.items()}
    bias = {name: float(d["bias_over_sd_crb_median"]) for name, d in per.items()}
    reasons = [f"{n}: median efficiency {e:.2f} < {MIN_EFFICIENCY}" for n, e in eff.items()
               if not e >= MIN_EFFICIENCY]
    reasons += [f"{n}: median |bias| {b:.2f} CRB-SD > {MAX_BIAS_SD}" for n, b in bias.items()
                if not b <= MAX_BIAS_SD]
    return GateResult(float(snr_key), eff, bias, not reasons, reasons, val["grid_points"],
                      val["n_rep"])


def validate_network(net: CrbEstimator, model: SignalModel, snr: float, n_rep: int = 64,
                     seed: int = 2024) -> GateResult:
    """Validate ``net`` on its protocol at ``snr`` (the brightest member over σ, the training
    convention); see the module docstring."""
    from qmri_bids.qmri.training import validate

    key = f"{snr:.6g}"
    val = validate(net, model, snrs=(float(key),), n_rep=n_rep, seed=seed)
    return gate_from_validation(val, next(iter(val["snr"])))


def data_snr(data: np.ndarray, mask: np.ndarray, sigma: float) -> float | None:
    """Median over ``mask`` of the brightest member's magnitude over σ (the SNR convention of
    training); None when it cannot be measured."""
    if sigma is None or not sigma > 0 or not mask.any():
        return None
    peak = np.abs(data[mask]).max(-1)
    snr = float(np.median(peak)) / float(sigma)
    return snr if math.isfinite(snr) else None


def _unit_position(net: CrbEstimator, shape: torch.Tensor) -> torch.Tensor:
    """Position of each estimate inside the *prior* (not the widened output range): 0 and 1 are
    the prior's edges, in log space for log-uniform priors."""
    cols = []
    for i, r in enumerate(net.prior.ranges):
        x = shape[..., i]
        if r.log:
            cols.append((torch.log(x.clamp_min(1e-30)) - math.log(r.lower))
                        / (math.log(r.upper) - math.log(r.lower)))
        else:
            cols.append((x - r.lower) / (r.upper - r.lower))
    return torch.stack(cols, -1)


def suspicious_voxels(net: CrbEstimator, model: SignalModel, data: np.ndarray,
                      values: dict[str, np.ndarray], mask: np.ndarray, b1: np.ndarray | None,
                      sigma: float | None) -> dict[str, np.ndarray]:
    """Boolean maps of voxels whose network estimate is an extrapolation (module docstring):
    ``outside_prior`` (an estimate at or beyond the prior's edges), ``b1_outside_prior`` and
    ``residual`` (squared residual above :data:`RESIDUAL_FACTOR` x σ² per degree of freedom;
    only with a measured σ)."""
    shape_names = net.prior.names
    sel = mask & np.all([np.isfinite(values[n]) for n in shape_names], axis=0)
    out = {k: np.zeros(mask.shape, bool) for k in ("outside_prior", "b1_outside_prior",
                                                   "residual")}
    if not sel.any():
        return out
    est = torch.as_tensor(np.stack([values[n][sel] for n in shape_names], -1))
    u = _unit_position(net, est)
    at_edge = (u <= EDGE_FRACTION) | (u >= 1 - EDGE_FRACTION)
    # An estimated B1 is a nuisance whose prior edge is physical: B1 = 1 (perfect refocusing)
    # is the edge of a CPMG train's B1 <= 1 branch and the most common value, not an
    # extrapolation.
    keep = torch.tensor([n != "B1" for n in shape_names])
    edge = (at_edge & keep).any(-1).numpy()
    out["outside_prior"][sel] = edge
    if b1 is not None and net.use_b1:
        lo, hi = net.prior.b1
        kb = np.asarray(b1)[sel]
        out["b1_outside_prior"][sel] = (kb < lo) | (kb > hi)
    if sigma is not None and sigma > 0:
        r2 = _squared_residual(model, data[sel], values, sel, b1)
        n_real = data.shape[-1] * (2 if np.iscomplexobj(data) else 1)
        dof = max(n_real - model.n_parameters, 1)
        out["residual"][sel] = r2 > RESIDUAL_FACTOR * dof * float(sigma) ** 2
    return out


def _squared_residual(model: SignalModel, y: np.ndarray, values: dict[str, np.ndarray],
                      sel: np.ndarray, b1: np.ndarray | None, chunk: int = 65536) -> np.ndarray:
    """‖y − s(θ̂)‖² per voxel with the model's own forward (for long signals such as MRF this is
    an EPG run per voxel: only called on a chunked selection)."""
    from qmri_bids.qmri.crb import _real_view

    params = np.stack([values[n][sel] for n in model.parameter_names], -1)
    kb = None if b1 is None else np.asarray(b1)[sel]
    out = np.empty(params.shape[0])
    for s in range(0, params.shape[0], chunk):
        p = torch.as_tensor(params[s:s + chunk], dtype=torch.float64)
        k = None if kb is None else torch.as_tensor(kb[s:s + chunk], dtype=torch.float64)
        with torch.no_grad():
            sig = model.forward(p, k)
        yy = torch.as_tensor(y[s:s + chunk])
        yy = yy.to(torch.complex128 if yy.is_complex() else torch.float64)
        out[s:s + chunk] = ((_real_view(sig) - _real_view(yy)) ** 2).sum(-1).numpy()
    return out
