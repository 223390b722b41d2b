"""Dictionary matching (MRF, EPG multi-echo spin echo, any model linear in M0).

A dictionary is the model's forward evaluated with unit M0 on a grid of the other parameters
(:class:`DictionaryGrid`). Matching picks, per voxel, the atom with the largest normalised
|inner product| with the voxel signal and takes M0 (complex for complex models) from the
projection onto that atom (Ma et al., Nature 2013; SVD compression: McGivney et al., IEEE TMI 2014).

Procedure of :class:`DictionaryMatcher`:

1. atoms = ``model.forward`` on the grid, evaluated ``atom_chunk`` atoms at a time; atoms whose
   parameters violate the grid constraint (default ``T2 <= T1``) are left out;
2. each atom ``f_i`` is normalised, ``d_i = f_i / s_i`` with ``s_i = ||f_i||``;
3. SVD compression: the eigenvectors ``V`` of the Gram matrix ``sum_i d_i d_i^H`` (= right singular
   vectors of the dictionary) are accumulated chunk-wise in float64; ``K`` = the fewest
   components whose eigenvalues hold a fraction ``energy`` (default 0.99999) of the dictionary's
   energy, or ``n_components`` if given. Atoms are stored compressed (``c_i = V^H d_i``) and
   re-normalised, so a noise-free atom matches itself exactly (Cauchy-Schwarz);
4. voxels are projected (``x_c = V^H x``) and matched ``voxel_chunk`` at a time, where
   ``voxel_chunk * n_atoms <= max_elements`` bounds the score matrix (default 2^23 entries, a
   complex entry counting once). A real dictionary (real model, or FISP with 0 RF phase) matched
   against complex data uses real GEMMs on the stacked real/imaginary parts.

Memory: the uncompressed dictionary (``n_atoms x N``) is kept only while it has at most
``max_elements * 8`` entries; above that the atoms are simulated twice (once for the Gram matrix,
once for compression) so peak memory stays ``O(atom_chunk * N + N^2 + n_atoms * K)``.

Accuracy: a noise-free off-grid signal usually matches a bracketing atom (error <= one step; the
median error is ~ a quarter step). Where T1 and T2 trade off along a ridge (long T2 with long T1,
or short schedules) the best atom can lie 2-3 T2 steps away: on the default MRF schedule the NIST
sphere T1 = 3.2 s / T2 = 1.6 s is matched 11 % low in T2 on the 5 % grid and 1 % on the 2 % grid
(``benchmarks/qmri/bench_mrf.py``). Use a finer T1 axis where long T2 matters.

Grid parameters named ``B1`` that the model does not estimate are passed as its known ``b1``
argument, so a B1 axis works with both ``estimate_b1`` settings; at match time a known B1 map
restricts each voxel to the atoms of the nearest grid B1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qmri_bids.progress import progress
from qmri_bids.qmri.base import SignalModel

__all__ = [
    "DictionaryFit",
    "DictionaryGrid",
    "DictionaryMatcher",
    "default_mese_epg_grid",
    "default_mrf_grid",
    "geometric_axis",
]

#: parameter names that scale the signal linearly (estimated by projection, not on the grid)
SCALE_REAL = ("M0", "S0")
SCALE_COMPLEX = ("M0_re", "M0_im")


def geometric_axis(lower: float, upper: float, rel_step: float) -> np.ndarray:
    """Geometric grid from ``lower`` to ``upper`` (both included) with ratio ``<= 1 + rel_step``.

    Relaxation times are matched on a log scale because their CRB/estimation error is roughly
    proportional to the value, so a constant *relative* spacing gives uniform relative precision.
    """
    if not (0 < lower < upper) or rel_step <= 0:
        raise ValueError("need 0 < lower < upper and rel_step > 0")
    n = math.ceil(math.log(upper / lower) / math.log1p(rel_step)) + 1
    return np.geomspace(lower, upper, n)


def _t2_le_t1(points: Mapping[str, np.ndarray]) -> np.ndarray:
    if "T1" in points and "T2" in points:
        return points["T2"] <= points["T1"]
    return np.ones(len(next(iter(points.values()))), dtype=bool)


@dataclass
class DictionaryGrid:
    """Cartesian grid of parameter values (1-D axes) with an optional constraint on the points.

    Attributes:
        axes: parameter name -> 1-D array of values (a single value fixes the parameter).
        constraint: function of the flattened points returning a boolean keep-mask; the default
            keeps ``T2 <= T1`` (physically T2 never exceeds T1).
    """

    axes: dict[str, np.ndarray]
    constraint: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = _t2_le_t1

    def __post_init__(self) -> None:
        self.axes = {
            k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in self.axes.items()
        }
        if not self.axes:
            raise ValueError("empty grid")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.axes)

    def points(self) -> dict[str, np.ndarray]:
        """Flattened grid points (after the constraint), name -> ``[n_atoms]``."""
        mesh = np.meshgrid(*self.axes.values(), indexing="ij")
        pts = {k: m.reshape(-1) for k, m in zip(self.axes, mesh, strict=True)}
        if self.constraint is not None:
            keep = np.asarray(self.constraint(pts), dtype=bool)
            pts = {k: v[keep] for k, v in pts.items()}
        return pts

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per axis: number of values, range, and spacing (relative step if geometric)."""
        out: dict[str, dict[str, Any]] = {}
        for k, v in self.axes.items():
            d: dict[str, Any] = {"n": int(v.size), "min": float(v.min()), "max": float(v.max())}
            if v.size > 1:
                ratios = v[1:] / v[:-1]
                diffs = np.diff(v)
                if np.all(v > 0) and np.allclose(ratios, ratios[0], rtol=1e-6):
                    d["relative_step"] = float(ratios[0] - 1)
                else:
                    d["step_min"] = float(diffs.min())
                    d["step_max"] = float(diffs.max())
            out[k] = d
        return out


def default_mrf_grid(
    rel_step: float = 0.05,
    t1_range: tuple[float, float] = (0.05, 4.0),
    t2_range: tuple[float, float] = (0.005, 2.0),
    b1: Sequence[float] | None = None,
) -> DictionaryGrid:
    """MRF grid: T1 50 ms-4 s and T2 5 ms-2 s geometric with ``rel_step`` (5 %: 91 x 124 values,
    8,358 atoms after T2 <= T1; 2 %: 50,214 atoms), B1 fixed at 1 unless ``b1`` values are given.
    """
    axes = {
        "T1": geometric_axis(*t1_range, rel_step),
        "T2": geometric_axis(*t2_range, rel_step),
        "B1": np.asarray([1.0] if b1 is None else b1, dtype=np.float64),
    }
    return DictionaryGrid(axes)


def default_mese_epg_grid(
    rel_step: float = 0.02,
    t2_range: tuple[float, float] = (0.005, 2.0),
    b1: Sequence[float] | np.ndarray | None = None,
) -> DictionaryGrid:
    """EPG-MESE grid: T2 5 ms-2 s geometric with ``rel_step`` (2 %: 304 values) x B1 0.5-1.0 in
    steps of 0.02 (26 values), ~7,900 atoms. B1 stops at 1 because a nominal-180 deg CPMG train
    is symmetric in B1 about 1 (see ``models/mese_epg.py``)."""
    b1v = np.round(np.arange(0.5, 1.0 + 1e-9, 0.02), 4) if b1 is None else np.asarray(b1)
    return DictionaryGrid({"T2": geometric_axis(*t2_range, rel_step), "B1": b1v}, constraint=None)


@dataclass
class DictionaryFit:
    """Result of :meth:`DictionaryMatcher.match` (leading shape ``[...]`` of the data).

    Attributes:
        params: ``[..., P]`` in the model's parameter order (M0 columns from the projection);
            usable directly as an NLLS initial guess or for the CRB.
        parameter_names: names of the columns of ``params``.
        maps: name -> ``[...]`` for every grid parameter and the model's parameters (a grid
            ``B1`` that the model takes as ``b1`` argument appears here only).
        m0: ``[...]`` proton density (complex for complex models).
        index: ``[...]`` atom index (-1 outside the mask).
        correlation: ``[...]`` |<atom, x>| / ||x|| in [0, 1] (1 = perfect match).
    """

    params: torch.Tensor
    parameter_names: tuple[str, ...]
    maps: dict[str, torch.Tensor]
    m0: torch.Tensor
    index: torch.Tensor
    correlation: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.maps[name]


class DictionaryMatcher:
    """Build an SVD-compressed dictionary of ``model`` on ``grid`` and match voxel signals.

    Args:
        model: a :class:`SignalModel` linear in one real scale parameter (``M0``/``S0``) or in a
            complex one (``M0_re``, ``M0_im``); every other parameter must be a grid axis (a
            single-valued axis fixes it).
        grid: the :class:`DictionaryGrid` (see :func:`default_mrf_grid`,
            :func:`default_mese_epg_grid`).
        n_components: number of SVD components kept; None = fewest reaching ``energy``.
        energy: fraction of the dictionary energy kept when ``n_components`` is None.
        dtype: real dtype of the dictionary (float32 default: halves memory and time; the
            normalised inner products need no more precision).
        device: where the dictionary lives and matching runs.
        atom_chunk: atoms simulated per ``model.forward`` call.
        max_elements: bound on the score matrix (voxels x atoms) per matching chunk.
    """

    def __init__(
        self,
        model: SignalModel,
        grid: DictionaryGrid,
        n_components: int | None = None,
        energy: float = 0.99999,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        atom_chunk: int = 2048,
        max_elements: int = 2**23,
    ) -> None:
        if not 0 < energy <= 1:
            raise ValueError("energy must be in (0, 1]")
        self.model = model
        self.grid = grid
        self.dtype = dtype
        self.device = torch.device(device)
        self.atom_chunk = int(atom_chunk)
        self.max_elements = int(max_elements)
        self._plan_parameters()
        t0 = time.perf_counter()
        pts = grid.points()
        self.n_atoms = len(next(iter(pts.values())))
        if self.n_atoms == 0:
            raise ValueError("the grid has no admissible point")
        self.atom_values = {
            k: torch.as_tensor(v, dtype=torch.float64, device=self.device) for k, v in pts.items()
        }
        self._build(n_components, energy)
        self.build_seconds = time.perf_counter() - t0

    # ---------------------------------------------------------------------------------- build
    def _plan_parameters(self) -> None:
        names = self.model.parameter_names
        axes = self.grid.names
        self.complex_scale = all(n in names for n in SCALE_COMPLEX)
        scale = [n for n in names if n in SCALE_REAL + SCALE_COMPLEX]
        if not scale:
            raise ValueError(f"model {self.model.name!r} has no M0/S0 scale parameter")
        for n in names:
            if n not in scale and n not in axes:
                raise ValueError(f"model parameter {n!r} is neither a grid axis nor a scale")
        extra = [a for a in axes if a not in names and a != "B1"]
        if extra:
            raise ValueError(f"grid axes {extra} are not parameters of {self.model.name!r}")
        self.b1_as_argument = "B1" in axes and "B1" not in names

    def _unit_params(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        cols = []
        n = sl.stop - sl.start
        for name in self.model.parameter_names:
            if name in self.atom_values:
                cols.append(self.atom_values[name][sl])
            elif name in ("M0", "S0", "M0_re"):
                cols.append(torch.ones(n, dtype=torch.float64, device=self.device))
            else:  # M0_im
                cols.append(torch.zeros(n, dtype=torch.float64, device=self.device))
        params = torch.stack(cols, dim=-1).to(self.dtype)
        b1 = self.atom_values["B1"][sl].to(self.dtype) if self.b1_as_argument else None
        return params, b1

    def _atoms(self, sl: slice) -> torch.Tensor:
        params, b1 = self._unit_params(sl)
        with torch.no_grad():
            return self.model.forward(params, b1)

    def _chunks(self) -> list[slice]:
        return [slice(i, min(i + self.atom_chunk, self.n_atoms))
                for i in range(0, self.n_atoms, self.atom_chunk)]

    def _build(self, n_components: int | None, energy: float) -> None:
        chunks = self._chunks()
        first = self._atoms(chunks[0])
        self.n_timepoints = first.shape[-1]
        store = self.n_atoms * self.n_timepoints <= 8 * self.max_elements
        gram = None
        norms = []
        blocks = []
        # a complex model whose unit-M0 atoms are all real (FISP with 0 RF phase) gets a real
        # dictionary: 4x cheaper Gram/projections, half the memory. Decided chunk by chunk.
        self.real_atoms = True
        for k, sl in progress(list(enumerate(chunks)), desc=f"dictionary ({self.model.name})",
                              unit="atom blocks"):
            f = first if k == 0 else self._atoms(sl)
            if f.is_complex() and self.real_atoms and not torch.any(f.imag != 0):
                f = f.real
            s = torch.linalg.vector_norm(f, dim=-1)
            if not torch.all(torch.isfinite(s)) or torch.any(s == 0):
                raise ValueError("dictionary has zero or non-finite atoms; check the grid")
            d = (f / s.unsqueeze(-1)).to(torch.complex128 if f.is_complex() else torch.float64)
            if d.is_complex() and self.real_atoms:  # first complex chunk: promote what we have
                self.real_atoms = False
                gram = None if gram is None else gram.to(torch.complex128)
                blocks = [b.to(torch.complex128) for b in blocks]
            g = d.mT @ d.conj()  # sum_i d_i^T conj(d_i) = conj(D^H D): (N x N)
            gram = g if gram is None else gram + g
            norms.append(s.to(torch.float64))
            if store:
                blocks.append(d)
        self.atom_scale = torch.cat(norms)
        evals, evecs = torch.linalg.eigh(gram)
        evals = evals.flip(0).clamp_min(0)
        evecs = evecs.flip(-1)
        frac = torch.cumsum(evals, 0) / evals.sum()
        if n_components is None:
            k = int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype)).item()) + 1
        else:
            k = int(n_components)
        k = max(1, min(k, self.n_timepoints))
        self.n_components = k
        self.energy_retained = float(frac[k - 1])
        basis = evecs[:, :k]  # (N, K): columns span the dictionary
        comp = []
        for i, sl in enumerate(chunks):
            if store:
                d = blocks[i]
                blocks[i] = None  # free as we go
            else:
                f = self._atoms(sl)
                d = f / self.atom_scale[sl].to(f.real.dtype).unsqueeze(-1)
                if self.real_atoms and d.is_complex():
                    d = d.real
                d = d.to(torch.float64 if self.real_atoms else torch.complex128)
            comp.append(d @ basis.conj().to(d.dtype) if d.is_complex() else d @ basis.to(d.dtype))
        c = torch.cat(comp)
        cnorm = torch.linalg.vector_norm(c, dim=-1)
        cdt = torch.complex128 if self.dtype == torch.float64 else torch.complex64
        store_dt = self.dtype if not c.is_complex() else cdt
        self.atoms = (c / cnorm.unsqueeze(-1)).to(store_dt)  # (n_atoms, K), unit norm
        # M0 = <atom, x> / (||c_i|| s_i): combined per-atom divisor
        self.m0_divisor = (cnorm * self.atom_scale).to(self.dtype)
        self.basis = basis.to(store_dt if basis.is_complex() else self.dtype)

    # ---------------------------------------------------------------------------------- match
    @property
    def info(self) -> dict[str, Any]:
        """Grid, size and compression of the dictionary (for logs and reports)."""
        return {
            "model": self.model.name,
            "grid": self.grid.describe(),
            "n_atoms": self.n_atoms,
            "n_timepoints": self.n_timepoints,
            "n_components": self.n_components,
            "energy_retained": self.energy_retained,
            "real_atoms": self.real_atoms,
            "dtype": str(self.dtype).replace("torch.", ""),
            "build_seconds": self.build_seconds,
        }

    def voxel_chunk(self, n_atoms: int | None = None) -> int:
        """Voxels matched at once so that the score matrix has ``<= max_elements`` entries."""
        return max(1, self.max_elements // max(1, n_atoms or self.n_atoms))

    def _match_rows(
        self, x: torch.Tensor, atom_idx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best atom, its inner product and the signal norm for rows ``x`` (V, N)."""
        atoms = self.atoms if atom_idx is None else self.atoms[atom_idx]
        basis = self.basis
        out_i, out_ip, out_n = [], [], []
        step = self.voxel_chunk(atoms.shape[0])
        for v0 in progress(range(0, x.shape[0], step), desc="dictionary matching",
                           unit="voxel blocks"):
            xv = x[v0: v0 + step]
            n = xv.shape[0]
            if atoms.is_complex():
                xc = xv.to(basis.dtype) @ basis.conj()
                ip = xc @ atoms.conj().mT  # (v, n_atoms): <atom_i, x>
                score = ip.real.square() + ip.imag.square()  # |ip|^2: no sqrt needed for argmax
                best = score.argmax(dim=-1)
                ip_best = ip.gather(-1, best.unsqueeze(-1)).squeeze(-1)
            elif xv.is_complex():
                # real dictionary, complex data: real GEMMs on stacked (re; im) rows, ~4x cheaper
                # than promoting the dictionary to complex
                xc = torch.cat([xv.real, xv.imag]) @ basis
                r = xc @ atoms.mT  # (2v, n_atoms)
                score = r[:n].square() + r[n:].square()
                best = score.argmax(dim=-1)
                idx = best.unsqueeze(-1)
                ip_best = torch.complex(r[:n].gather(-1, idx), r[n:].gather(-1, idx)).squeeze(-1)
            else:
                ip = (xv @ basis) @ atoms.mT
                best = ip.abs().argmax(dim=-1)
                ip_best = ip.gather(-1, best.unsqueeze(-1)).squeeze(-1)
            out_i.append(best if atom_idx is None else atom_idx[best])
            out_ip.append(ip_best)
            out_n.append(torch.linalg.vector_norm(xv, dim=-1))
        return torch.cat(out_i), torch.cat(out_ip), torch.cat(out_n)

    def match(
        self,
        data: torch.Tensor,
        b1: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> DictionaryFit:
        """Match ``data[..., N]`` (real or complex); ``b1[...]`` (optional) restricts each voxel
        to the atoms of the nearest grid B1; ``mask[...]`` (optional) limits the voxels matched."""
        data = torch.as_tensor(data, device=self.device)
        if data.shape[-1] != self.n_timepoints:
            raise ValueError(
                f"data has {data.shape[-1]} time points, the dictionary {self.n_timepoints}"
            )
        shape = data.shape[:-1]
        cdt = torch.complex128 if self.dtype == torch.float64 else torch.complex64
        x = data.reshape(-1, self.n_timepoints)
        x = x.to(cdt) if x.is_complex() or self.atoms.is_complex() else x.to(self.dtype)
        sel = torch.arange(x.shape[0], device=self.device)
        if mask is not None:
            sel = sel[torch.as_tensor(mask, device=self.device).reshape(-1).bool()]
        n_vox = x.shape[0]
        index = torch.full((n_vox,), -1, dtype=torch.long, device=self.device)
        ip = torch.zeros(n_vox, dtype=x.dtype, device=self.device)
        xnorm = torch.zeros(n_vox, dtype=self.dtype, device=self.device)

        if b1 is not None and "B1" in self.grid.axes and self.grid.axes["B1"].size > 1:
            b1_axis = torch.as_tensor(self.grid.axes["B1"], device=self.device)
            b1v = torch.as_tensor(b1, device=self.device, dtype=torch.float64).reshape(-1)
            b1v = b1v.expand(n_vox) if b1v.numel() == 1 else b1v
            nearest = (b1v[sel].unsqueeze(-1) - b1_axis).abs().argmin(-1)
            atom_b1 = (self.atom_values["B1"].unsqueeze(-1) - b1_axis).abs().argmin(-1)
            for j in torch.unique(nearest).tolist():
                rows = sel[nearest == j]
                atom_idx = torch.nonzero(atom_b1 == j).squeeze(-1)
                i_, ip_, n_ = self._match_rows(x[rows], atom_idx)
                index[rows], ip[rows], xnorm[rows] = i_, ip_, n_.to(self.dtype)
        else:
            if b1 is not None and not (self.b1_as_argument or "B1" in self.grid.axes):
                raise ValueError("b1 given but the dictionary has no B1 axis")
            i_, ip_, n_ = self._match_rows(x[sel], None)
            index[sel], ip[sel], xnorm[sel] = i_, ip_, n_.to(self.dtype)
        return self._assemble(index, ip, xnorm, shape)

    def _assemble(
        self, index: torch.Tensor, ip: torch.Tensor, xnorm: torch.Tensor, shape: torch.Size
    ) -> DictionaryFit:
        valid = index >= 0
        safe = index.clamp_min(0)
        m0 = ip / self.m0_divisor[safe].to(ip.real.dtype)
        m0 = torch.where(valid, m0, torch.zeros_like(m0))
        corr = torch.where(
            valid & (xnorm > 0),
            ip.abs() / torch.where(xnorm > 0, xnorm, torch.ones_like(xnorm)),
            torch.zeros_like(xnorm),
        )
        nan = torch.tensor(float("nan"), dtype=self.dtype, device=self.device)
        maps: dict[str, torch.Tensor] = {}
        for name, vals in self.atom_values.items():
            maps[name] = torch.where(valid, vals[safe].to(self.dtype), nan).reshape(shape)
        cols = []
        for name in self.model.parameter_names:
            if name in ("M0", "S0", "M0_re"):
                col = m0.real if m0.is_complex() else m0
            elif name == "M0_im":
                col = m0.imag if m0.is_complex() else torch.zeros_like(m0)
            else:
                col = maps[name].reshape(-1)
            col = col.to(self.dtype).reshape(shape)
            maps.setdefault(name, col)
            cols.append(col)
        return DictionaryFit(
            params=torch.stack(cols, dim=-1),
            parameter_names=self.model.parameter_names,
            maps=maps,
            m0=m0.reshape(shape),
            index=index.reshape(shape),
            correlation=corr.reshape(shape),
            info=self.info,
        )
