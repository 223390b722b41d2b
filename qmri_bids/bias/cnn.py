"""The bias-field network and its application to images of any geometry.

Network (:class:`BiasNet`)
--------------------------
A 2-D U-Net on ``64 x 64`` slices whose decoder stops at a quarter of the input resolution: it
predicts a *log*-field on a ``16 x 16`` grid. Why these choices:

* 64-px input: the network must see tissue boundaries sharply enough to tell a step in intensity
  (content) from a smooth change (field); 64 samples across a 20 cm head are 3 mm.
* Coarse output: coil fields vary over centimetres and the 3-D fusion below keeps no cosine finer
  than 30 mm, so a 16 x 16 output (12 mm cells on a head) loses nothing; skipping the two finest
  decoder levels halves the cost of a forward pass.
* 2-D slices of any orientation: the same net serves 3-D volumes, thin stacks and single slices.
* Log domain: a multiplicative field is additive in log space, so the input is ``log(v / m)`` and
  the output a log-field; the ratio losses become well-conditioned differences.
* Intensity-scale invariance by construction: ``m`` is the median of ``v`` inside the foreground
  mask, so ``F(c v) == F(v)`` exactly for any ``c > 0``.
* Foreground-aware: the input is zeroed outside the mask and the mask is a second input channel,
  so air (noise or zeros) cannot drive the field; the output is centred to geometric mean 1 inside
  the mask (the global scale of a field is not identifiable from one image).
* Bounded: ``log F = log(2) * tanh(raw / log 2)``, a smooth version of the paper's clamp to
  [0.5, 2] that keeps gradients alive during training.
* No batch normalisation: its statistics would couple the slices of a batch and differ between
  training and inference.

Volumes (:func:`estimate_log_field`)
------------------------------------
1. Resample the image to a working grid with isotropic voxels whose largest side has ``in_size``
   samples (anisotropic voxels and any orientation are handled physically; a 2-D image is
   ``n x m x 1``). The foreground mask is found on a grid twice as fine and area-resampled.
2. Run the net on up to ``max_slices`` slices along every axis whose two in-plane axes have at
   least ``min_inplane`` *acquired* voxels, averaged over ``n_transforms`` of the 8
   rotations/reflections of a slice (8 makes the result exactly independent of axis order and
   direction; fewer are cheaper).
3. Each 2-D prediction knows the field only up to a per-slice constant. All predictions are fused
   by weighted least squares, in log space, onto a low-order 3-D cosine (DCT-II) basis with one
   free offset per slice (eliminated by per-slice weighted centring) and a ridge penalty growing
   with frequency. Orientations constrain each other, giving a 3-D consistent field; the basis
   makes it smooth by construction. Along an axis that is in-plane for no usable orientation (the
   stacking axis of a thin stack) only ``stack_order`` cosines are kept.
4. Evaluate the basis at full resolution (separable, cheap), centre to geometric mean 1 inside the
   foreground and clamp to [0.5, 2] as in the paper.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("qmri_bids.bias")

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class BiasNetConfig:
    """Everything needed to rebuild the network (stored in the model card)."""

    in_size: int = 64
    base_channels: int = 8
    depth: int = 4  # number of 2x poolings
    out_level: int = 2  # the decoder stops at in_size / 2**out_level (the field is smooth)
    log_floor: float = 0.05  # v / median is floored here before the log (dark voxels, noise)

    @property
    def out_stride(self) -> int:
        return 2 ** self.out_level

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BiasNetConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.setdefault("out_level", 0)  # cards written before out_level existed: full res
        return cls(**known)


@dataclass(frozen=True)
class FusionConfig:
    """How 2-D predictions become one smooth 3-D field (see module docstring)."""

    order: int = 6  # cosine basis functions per axis (0..order-1)
    stack_order: int = 2  # along an axis that is never in-plane (thin stacks)
    min_half_wavelength_mm: float = 30.0  # no cosine finer than this (physical smoothness prior)
    ridge: float = 1e-2  # ridge weight, times (1 + |k|^2)
    min_inplane: int = 16  # acquired voxels needed along both in-plane axes to use an orientation
    # Slices per orientation and in-plane transforms: 8 slices x 2 transforms is as accurate on
    # the demo's known fields as 12 x 8 (corr 0.94 vs 0.92) at a quarter of the time (measured
    # for bias_cnn_v2, see the README); the field is smooth across slices.
    max_slices: int = 8  # per orientation (evenly spaced)
    min_foreground: float = 0.02  # fraction of the slice that must be foreground
    n_transforms: int = 2  # rotations/reflections averaged per slice (1, 2, 4 or 8)
    mask_factor: int = 1  # the foreground mask is found on a grid this much finer than the net's

    @classmethod
    def from_dict(cls, d: dict) -> FusionConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.1))


class UNet2D(nn.Module):
    """U-Net with ``depth`` poolings (channels doubling up to 8x ``base``) whose decoder stops
    ``out_level`` levels above the input resolution."""

    def __init__(self, in_ch: int = 2, base: int = 8, depth: int = 4, out_level: int = 0) -> None:
        super().__init__()
        if not 0 <= out_level <= depth:
            raise ValueError(f"out_level {out_level} must be within 0..depth ({depth})")
        chans = [min(base * 2 ** i, base * 8) for i in range(depth + 1)]
        self.out_level = out_level
        self.down = nn.ModuleList()
        c = in_ch
        for ch in chans:
            self.down.append(_block(c, ch))
            c = ch
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for ch in reversed(chans[out_level:-1]):
            self.up.append(nn.ConvTranspose2d(c, ch, 2, stride=2))
            self.dec.append(_block(2 * ch, ch))
            c = ch
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


def masked_median(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample median of ``v`` inside ``mask`` (``(n,1,H,W)`` -> ``(n,1,1,1)``); 1 if empty."""
    n = v.shape[0]
    vals = torch.where(mask > 0, v, torch.full_like(v, torch.nan)).reshape(n, -1)
    med = torch.nanmedian(vals, dim=1).values
    med = torch.where(torch.isfinite(med) & (med > 0), med, torch.ones_like(med))
    return med.view(n, 1, 1, 1)


def masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``x`` weighted by ``weight`` (>= 0) over the last two axes."""
    w = weight.to(x.dtype)
    return (x * w).sum(dim=(-2, -1), keepdim=True) / w.sum(dim=(-2, -1), keepdim=True).clamp_min(
        1e-6)


class BiasNet(nn.Module):
    """``F``: image ``(n,1,S,S)`` + foreground mask -> log-field, geometric mean 1 in the mask."""

    def __init__(self, config: BiasNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or BiasNetConfig()
        c = self.config
        self.unet = UNet2D(2, c.base_channels, c.depth, c.out_level)

    def coarse_log_field(self, v: torch.Tensor, mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-field, weight)`` on the output grid (``S / out_stride``); ``weight`` is the
        fraction of each output cell that is foreground. The log-field has weighted mean 0."""
        m = (mask > 0).to(v.dtype)
        # Robust, mask-weighted normalisation: F(c v) = F(v) exactly and air is ignored.
        x = torch.log(torch.clamp(v / masked_median(v, m), min=self.config.log_floor)) * m
        raw = self.unet(torch.cat([x, m], dim=1))
        st = self.config.out_stride
        weight = F.avg_pool2d(m, st) if st > 1 else m
        raw = raw - masked_mean(raw, weight)  # global scale is not identifiable
        return LOG2 * torch.tanh(raw / LOG2), weight

    def log_field(self, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The log-field at the input resolution (bilinear from the output grid), mean 0 in the
        mask."""
        lf, _ = self.coarse_log_field(v, mask)
        if self.config.out_stride > 1:
            lf = F.interpolate(lf, size=v.shape[-2:], mode="bilinear", align_corners=False)
        return lf - masked_mean(lf, mask > 0)

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_field(v, mask))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- foreground
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (maximum between-class variance over a histogram).

    A few lines of numpy instead of scikit-image: importing ``skimage.filters`` costs about a
    second, more than the whole correction of a volume.
    """
    v = np.asarray(values, np.float64).ravel()
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1e-12)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def foreground_mask(image: np.ndarray, smooth: float = 0.7) -> np.ndarray:
    """Robust object mask: Otsu on a lightly smoothed image, half the threshold, holes filled.

    Half of Otsu's threshold keeps dark tissue (CSF, muscle) next to bright tissue while air
    stays out; Otsu is scale-equivariant, so the mask -- and the field -- ignores intensity scale.
    This is the one foreground rule of the bias CNN (inference, benchmarks and tests use it);
    ``smooth`` (voxels) is 0 on the working grid, whose area averaging already removed the noise.
    """
    from scipy import ndimage

    sm = ndimage.gaussian_filter(image.astype(np.float32), smooth) if smooth > 0 else \
        np.asarray(image, np.float32)
    pos = sm[sm > 0]
    if pos.size < 2 or float(pos.max()) == float(pos.min()):
        return image > 0
    mask = sm > 0.5 * otsu_threshold(pos)
    for k in range(mask.shape[-1]):  # in-plane hole filling (closed ventricles, dark lesions)
        mask[..., k] = ndimage.binary_fill_holes(mask[..., k])
    return mask


# --------------------------------------------------------------------------- volumes
def _resample(x: np.ndarray | torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Area-average along shrinking axes, then linear along growing ones."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(x, dtype=np.float32))
    t = t.float()[None, None]
    shrink = tuple(min(a, b) for a, b in zip(t.shape[2:], size))
    if shrink != tuple(t.shape[2:]):
        t = F.adaptive_avg_pool3d(t, shrink)
    if shrink != tuple(size):
        t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    return t[0, 0]


def working_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float], size: int
                 ) -> tuple[int, int, int]:
    """Isotropic grid covering the same extent, the largest side having ``size`` samples (never
    more samples than the image has along an axis)."""
    ext = [n * s for n, s in zip(shape, spacing)]
    step = max(ext) / size
    return tuple(1 if n == 1 else max(2, round(e / step)) for n, e in zip(shape, ext))


def _cos_basis(n: int, order: int) -> torch.Tensor:
    """DCT-II basis ``cos(pi k (i + 0.5) / n)`` as an ``(n, order)`` matrix."""
    return _basis_at(torch.arange(n, dtype=torch.float64), n, order)


def _basis_at(coord: torch.Tensor, n: int, order: int) -> torch.Tensor:
    """The DCT-II basis of an n-voxel axis evaluated at fractional voxel coordinates."""
    t = (coord + 0.5) / n
    return torch.cos(math.pi * t[:, None] * torch.arange(order, dtype=torch.float64)[None])


@dataclass
class FieldEstimate:
    """Coefficients of the smooth log-field, and what went into them (for logs and provenance)."""

    coef: torch.Tensor  # (o0, o1, o2)
    orders: tuple[int, int, int]
    orientations: list[int] = field(default_factory=list)
    n_slices: int = 0


# The 8 elements of the square's symmetry group D4 as (transpose, quarter turns), ordered so that
# any prefix of length 2 or 4 is a subgroup-like spread (identity, half turn, the two mirrors...).
_D4 = ((False, 0), (False, 2), (True, 0), (True, 2), (False, 1), (False, 3), (True, 1), (True, 3))


def symmetrised_coarse_log_field(net: BiasNet, v: torch.Tensor, m: torch.Tensor,
                                 n_transforms: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Average of the net's coarse log-field over ``n_transforms`` rotations/reflections.

    Why: a CNN is only approximately rotation/flip equivariant, so without this the field would
    depend on how the scanner stored the axes. With all 8, permuting or flipping the volume's axes
    permutes/flips the field exactly; fewer transforms trade that for speed.
    """
    if n_transforms not in (1, 2, 4, 8):
        raise ValueError(f"n_transforms must be 1, 2, 4 or 8, got {n_transforms}")
    n = v.shape[0]
    ops = _D4[:n_transforms]

    def fwd(x: torch.Tensor, t: bool, k: int) -> torch.Tensor:
        return torch.rot90(x.transpose(-2, -1) if t else x, k, dims=(-2, -1))

    def inv(x: torch.Tensor, t: bool, k: int) -> torch.Tensor:
        y = torch.rot90(x, -k, dims=(-2, -1))
        return y.transpose(-2, -1) if t else y

    vs = torch.cat([fwd(v, t, k) for t, k in ops])
    ms = torch.cat([fwd(m, t, k) for t, k in ops])
    out, weight = net.coarse_log_field(vs, ms)
    acc = sum(inv(out[i * n:(i + 1) * n], t, k) for i, (t, k) in enumerate(ops))
    return acc / len(ops), inv(weight[:n], *ops[0])


@torch.no_grad()
def _predict_slices(net: BiasNet, work: torch.Tensor, wmask: torch.Tensor, axis: int,
                    fcfg: FusionConfig, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """Net log-field on slices along ``axis``: ``(log-field, weight, slice index, cell centres
    along the two in-plane axes)`` on the net's output grid, in working-grid voxel coordinates."""
    size = net.config.in_size
    img = work.movedim(axis, 0)
    msk = wmask.movedim(axis, 0)
    h, w = img.shape[1:]
    area = msk.flatten(1).float().mean(1) * (h * w) / (size * size)
    keep = torch.nonzero((area >= fcfg.min_foreground) & (msk.flatten(1).sum(1) >= 32)).flatten()
    empty = torch.empty(0)
    if keep.numel() == 0:
        return empty, empty, torch.empty(0, dtype=torch.long), empty, empty
    if keep.numel() > fcfg.max_slices:
        pick = torch.linspace(0, keep.numel() - 1, fcfg.max_slices).round().long()
        keep = keep[pick]
    py, px = (size - h) // 2, (size - w) // 2
    pad = (px, size - w - px, py, size - h - py)
    v = F.pad(img[keep], pad).unsqueeze(1)
    m = F.pad(msk[keep].float(), pad).unsqueeze(1)
    lf, wt = symmetrised_coarse_log_field(net, v.to(device), m.to(device), fcfg.n_transforms)
    st = net.config.out_stride
    cells = torch.arange(size // st, dtype=torch.float64) * st + (st - 1) / 2.0
    return lf.float().cpu(), wt.float().cpu(), keep, cells - py, cells - px


def estimate_log_field(net: BiasNet, work: torch.Tensor, wmask: torch.Tensor,
                       shape: tuple[int, int, int], spacing: tuple[float, float, float],
                       fcfg: FusionConfig | None = None, device: torch.device | str = "cpu"
                       ) -> FieldEstimate:
    """Fuse slice-wise predictions on the working grid ``work`` (mask ``wmask``) of an image of
    ``shape``/``spacing`` into the coefficients of a smooth 3-D log-field."""
    fcfg = fcfg or FusionConfig()
    device = torch.device(device)
    grid = tuple(int(g) for g in work.shape)
    usable = [ax for ax in range(3)
              if min(shape[a] for a in range(3) if a != ax) >= fcfg.min_inplane]
    inplane_somewhere = [any(a != ax for ax in usable) for a in range(3)]
    # An axis that is never in-plane (the stacking axis of a thin stack: 5-12 slices) is seen
    # only through slice-to-slice changes of independent 2-D predictions: allow at most a gentle
    # change along it. Physical prior: a bias field does not vary on scales below a few
    # centimetres, so an axis of extent E keeps only cosines whose half-wavelength E / k is at
    # least min_half_wavelength_mm (a 6 cm phantom gets 3 per axis, a 19 cm head 6).
    extent = [n * s for n, s in zip(shape, spacing)]
    orders = tuple(min(fcfg.order if inplane_somewhere[a] else fcfg.stack_order, g,
                       1 + int(extent[a] // fcfg.min_half_wavelength_mm))
                   for a, g in enumerate(grid))
    kx, ky, kz = torch.meshgrid(*[torch.arange(o, dtype=torch.float64) for o in orders],
                                indexing="ij")
    n_coef = orders[0] * orders[1] * orders[2]
    ata = torch.zeros(n_coef, n_coef, dtype=torch.float64)
    atb = torch.zeros(n_coef, dtype=torch.float64)
    used: list[int] = []
    n_slices = 0
    for axis in usable:
        inplane = [a for a in range(3) if a != axis]
        y, wsum, idx, c0, c1 = _predict_slices(net, work, wmask, axis, fcfg, device)
        if idx.numel() == 0:
            continue
        used.append(axis)
        n_slices += idx.numel()
        b_in = [_basis_at(c, grid[a], orders[a]) for a, c in zip(inplane, (c0, c1))]
        b_ax = _cos_basis(grid[axis], orders[axis])[idx]  # (S, o_axis)
        per_axis = {axis: b_ax[:, None, None, :], inplane[0]: b_in[0][None, :, None, :],
                    inplane[1]: b_in[1][None, None, :, :]}
        s, hh, ww = idx.numel(), y.shape[2], y.shape[3]
        design = torch.einsum("sija,sijb,sijc->sijabc",
                              per_axis[0].expand(s, hh, ww, -1),
                              per_axis[1].expand(s, hh, ww, -1),
                              per_axis[2].expand(s, hh, ww, -1)).reshape(s, -1, n_coef)
        wv = wsum[:, 0].reshape(s, -1).double()
        yv = y[:, 0].reshape(s, -1).double()
        # Free offset per slice, eliminated by weighted centring of design and data per slice.
        wn = wv / wv.sum(1, keepdim=True).clamp_min(1e-12)
        design = design - (wn[:, :, None] * design).sum(1, keepdim=True)
        yv = yv - (wn * yv).sum(1, keepdim=True)
        a = design.reshape(-1, n_coef)
        wf = wv.reshape(-1)
        ata += a.T @ (a * wf[:, None])
        atb += a.T @ (wf * yv.reshape(-1))
    if not used:
        from qmri_bids.errors import BadDataError

        raise BadDataError(
            f"image {shape} has no slice orientation with at least {fcfg.min_inplane} voxels "
            "along both in-plane axes and enough foreground: too small for the bias-field CNN")
    scale = float(torch.diagonal(ata).mean().clamp_min(1e-12))
    reg = fcfg.ridge * scale * (1.0 + kx ** 2 + ky ** 2 + kz ** 2).reshape(-1)
    reg[0] = reg[0] + scale  # the constant term is unidentifiable; fixed later by centring
    coef = torch.linalg.solve(ata + torch.diag(reg), atb)
    return FieldEstimate(coef.reshape(orders).float(), orders, used, n_slices)


def evaluate_log_field(est: FieldEstimate, shape: tuple[int, int, int]) -> torch.Tensor:
    """The smooth log-field on an ``shape`` grid covering the image (separable evaluation)."""
    bx, by, bz = (_cos_basis(n, o).float() for n, o in zip(shape, est.orders))
    t = torch.einsum("abc,zc->abz", est.coef, bz)
    t = torch.einsum("abz,yb->ayz", t, by)
    return torch.einsum("ayz,xa->xyz", t, bx)


def working_images(image: np.ndarray, spacing: tuple[float, float, float], in_size: int,
                   mask: np.ndarray | None = None, mask_factor: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, mask)`` on the net's working grid (area-averaged).

    A user's mask is area-resampled and kept where more than half a working voxel is object.
    Otherwise the foreground rule runs on the working grid itself (``mask_factor`` 1: the
    averaging has removed the noise, and at full resolution the rule costs more than the whole
    network) or on a grid ``mask_factor`` times finer, area-resampled.
    """
    shape = tuple(int(s) for s in image.shape)
    grid = working_grid(shape, spacing, in_size)
    if mask is not None:
        work = _resample(image, grid)
        wmask = _resample(np.asarray(mask, np.float32), grid) > 0.5
        return work, wmask
    if mask_factor <= 1:
        work = _resample(image, grid)
        wmask = torch.from_numpy(foreground_mask(work.numpy(), smooth=0.0))
    else:
        fine_grid = tuple(min(n, g * mask_factor) for n, g in zip(shape, grid))
        fine = _resample(image, fine_grid)
        work = _resample(fine, grid)
        wmask = _resample(torch.from_numpy(foreground_mask(fine.numpy())).float(), grid) > 0.5
    if not bool(wmask.any()):
        wmask = work > 0
    return work, wmask


def apply_to_volume(net: BiasNet, image: np.ndarray, spacing: tuple[float, float, float],
                    mask: np.ndarray | None = None, fcfg: FusionConfig | None = None,
                    device: torch.device | str = "cpu") -> tuple[np.ndarray, FieldEstimate]:
    """The field of a 3-D array (geometric mean 1 in the foreground, clamped to [0.5, 2]) and the
    estimate it came from. No validation here (see :mod:`qmri_bids.bias.inference`)."""
    fcfg = fcfg or FusionConfig()
    img = np.asarray(image, dtype=np.float32)
    work, wmask = working_images(img, spacing, net.config.in_size, mask, fcfg.mask_factor)
    if not bool(wmask.any()):
        from qmri_bids.errors import BadDataError

        raise BadDataError("no foreground found in the image: cannot estimate a bias field")
    shape = tuple(int(s) for s in img.shape)
    est = estimate_log_field(net, work, wmask, shape, spacing, fcfg, device)
    # Geometric mean 1 inside the foreground, measured on the working grid (same field, same
    # object, a thousand times fewer voxels than the full resolution).
    offset = float(evaluate_log_field(est, tuple(work.shape))[wmask].mean())
    lf = evaluate_log_field(est, shape)
    lf -= offset
    log.debug("bias CNN: orientations %s, %d slices, basis orders %s", est.orientations,
              est.n_slices, est.orders)
    return torch.exp(lf).clamp_(0.5, 2.0).numpy(), est
