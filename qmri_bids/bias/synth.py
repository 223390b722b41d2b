"""Domain-randomised, MR-like training content for the bias-field CNN: bias-free by construction.

Why this content
----------------
The implicit loss of Simkó et al. only fixes the field *relative* to the training content: if the
training images contain smooth intensity ramps (shaded dead leaves, photographs with lighting),
the network learns that smooth ramps are content, which is exactly what a receive field looks like
in MRI. MR images of tissue are piecewise nearly constant: each tissue class has one intensity,
small texture, and partial-volume edges. So the content here is built that way, in the spirit of
SynthSeg/SynthStrip (Billot et al. 2023; Hoopes et al. 2022), without any medical image:

1. A 3-D label volume (:func:`random_label_volume`): a random object (an ellipsoid with a smooth
   random wobble, sometimes filling the field of view, sometimes cut by it) in air; nested shells
   that follow the object's outline with folded borders (scalp/skull/CSF/cortex-like layers); a
   partition of the inside into touching blobs (argmax of smooth random fields); and small
   ellipsoids (nuclei, ventricles, lesions). 3-12 classes in all.
2. Intensities (:func:`render_volume`): one log-uniform intensity per class, a small within-class
   texture that is white or nearly white (correlation length below 1.5 voxels) -- never a smooth
   ramp --, a partial-volume blur at a random resolution per axis (random anisotropy, sometimes a
   thick-slice block average), and Rician noise at a random SNR. Air is zero plus noise.
3. 2-D slices of each volume along all three axes (:func:`volume_slices`).

Every image is bias-free, so an explicit target (``F(v b) = b``, ``F(v) = 1``) exists and the
training can use it beside the implicit terms (see :mod:`qmri_bids.bias.train`).
Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from qmri_bids.bias.fields import gaussian_random_field


@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the domain randomisation (all drawn uniformly unless said otherwise)."""

    size: int = 64  # voxels per side of the cubic label volume
    n_classes: tuple[int, int] = (3, 12)  # tissue classes inside the object (air excluded)
    p_fill_fov: float = 0.15  # the object covers the whole field of view (no air)
    n_shells: tuple[int, int] = (0, 4)
    n_small: tuple[int, int] = (0, 6)  # small ellipsoids (nuclei, ventricles, lesions)
    intensity: tuple[float, float] = (0.03, 1.0)  # log-uniform per class
    texture_sd: tuple[float, float] = (0.0, 0.06)  # multiplicative, per class
    blur_sigma: tuple[float, float] = (0.0, 1.2)  # voxels, per axis (partial volume)
    p_thick_slices: float = 0.3  # one axis block-averaged over 2-4 voxels
    snr: tuple[float, float] = (8.0, 200.0)  # log-uniform, object median / noise sigma


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, length: float) -> np.ndarray:
    """A zero-mean, unit-variance smooth random field, drawn on a grid ``length / 4`` times coarser
    (cheap) and interpolated: the one Gaussian-random-field generator, used for shapes here."""
    factor = max(1, int(length // 4))
    coarse = tuple(max(2, math.ceil(n / factor)) for n in shape)
    g = gaussian_random_field(coarse, rng, length / factor)
    if factor == 1:
        return g
    zoom = [n / c for n, c in zip(shape, coarse)]
    out = ndimage.zoom(g, zoom, order=1, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, n) for n in shape)]


def _grid(size: int) -> np.ndarray:
    ax = (np.arange(size) + 0.5) / size - 0.5
    return np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))


def random_label_volume(rng: np.random.Generator, cfg: SynthConfig = SynthConfig()
                        ) -> tuple[np.ndarray, int]:
    """``(labels, n_classes)``: int16 labels on ``size**3`` voxels, 0 = air, 1..n = tissue."""
    s = cfg.size
    shape = (s, s, s)
    xyz = _grid(s)
    n_classes = int(rng.integers(cfg.n_classes[0], cfg.n_classes[1] + 1))
    # Object: a rotated ellipsoid with a smooth wobble of its radius.
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    if rng.uniform() < cfg.p_fill_fov:
        semi = rng.uniform(0.7, 1.0, 3)
    else:
        semi = rng.uniform(0.25, 0.55, 3)
    centre = rng.uniform(-0.15, 0.15, 3)
    u = np.einsum("ij,jxyz->ixyz", q, xyz - centre[:, None, None, None])
    rho = np.sqrt(((u / semi[:, None, None, None]) ** 2).sum(0))
    rho = rho + rng.uniform(0.03, 0.15) * _smooth_field(shape, rng, rng.uniform(0.15, 0.4) * s)
    labels = np.zeros(shape, np.int16)
    obj = rho < 1.0
    labels[obj] = 1
    # Nested shells that follow the outline, with folded (perturbed) borders.
    next_class = 2
    n_shells = int(rng.integers(cfg.n_shells[0], cfg.n_shells[1] + 1))
    depth = 1.0
    for _ in range(n_shells):
        if next_class > n_classes:
            break
        depth -= rng.uniform(0.04, 0.2)
        if depth < 0.3:
            break
        fold = rng.uniform(0.0, 0.06) * _smooth_field(shape, rng, rng.uniform(0.05, 0.2) * s)
        labels[obj & (rho + fold < depth)] = next_class
        next_class += 1
    # Touching blobs inside the innermost region: argmax of smooth random fields.
    inner = labels == labels[obj].max() if obj.any() else obj
    n_blobs = max(0, n_classes - next_class + 1 - int(rng.integers(0, 3)))
    if n_blobs >= 2 and inner.any():
        length = rng.uniform(0.08, 0.3) * s
        fields = np.stack([_smooth_field(shape, rng, length) for _ in range(n_blobs)])
        pick = np.argmax(fields, axis=0)
        labels[inner] = (next_class + pick[inner]).astype(np.int16)
        next_class += n_blobs
    # Small ellipsoids of any class (existing or new).
    for _ in range(int(rng.integers(cfg.n_small[0], cfg.n_small[1] + 1))):
        c = centre + rng.uniform(-0.3, 0.3, 3) * semi
        r = rng.uniform(0.03, 0.12, 3)
        q2, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        v = np.einsum("ij,jxyz->ixyz", q2, xyz - c[:, None, None, None])
        ball = (((v / r[:, None, None, None]) ** 2).sum(0) < 1.0) & obj
        labels[ball] = int(rng.integers(1, n_classes + 1))
    labels[labels > n_classes] = ((labels[labels > n_classes] - 1) % n_classes) + 1
    return labels, n_classes


def render_volume(labels: np.ndarray, n_classes: int, rng: np.random.Generator,
                  cfg: SynthConfig = SynthConfig()) -> np.ndarray:
    """A bias-free MR-like magnitude image of ``labels`` (float32, >= 0); see module docstring."""
    lo, hi = cfg.intensity
    means = np.concatenate([[0.0], np.exp(rng.uniform(math.log(lo), math.log(hi), n_classes))])
    img = means[labels]
    # Within-class texture: white or nearly white, never a ramp.
    tex_len = rng.uniform(0.0, 1.5)
    noise = rng.standard_normal(labels.shape)
    if tex_len > 0.3:
        noise = ndimage.gaussian_filter(noise, tex_len)
        noise /= max(float(noise.std()), 1e-6)
    sd = np.concatenate([[0.0], rng.uniform(*cfg.texture_sd, n_classes)])
    img = img * (1.0 + sd[labels] * noise)
    # Partial volume: a blur at a random (anisotropic) resolution, sometimes thick slices.
    sigma = rng.uniform(*cfg.blur_sigma, 3)
    img = ndimage.gaussian_filter(img, sigma)
    if rng.uniform() < cfg.p_thick_slices:
        axis, k = int(rng.integers(3)), int(rng.integers(2, 5))
        n = img.shape[axis] // k * k
        moved = np.moveaxis(img, axis, 0)[:n]
        blocks = moved.reshape(n // k, k, *moved.shape[1:]).mean(1)
        moved = np.repeat(blocks, k, axis=0)
        pad = img.shape[axis] - n
        if pad:
            moved = np.concatenate([moved, moved[-1:].repeat(pad, 0)])
        img = np.moveaxis(moved, 0, axis)
    img = np.clip(img, 0.0, None)
    # Rician noise at a random SNR (relative to the median of the object).
    obj = labels > 0
    ref = float(np.median(img[obj])) if obj.any() else 1.0
    snr = math.exp(rng.uniform(math.log(cfg.snr[0]), math.log(cfg.snr[1])))
    sig = ref / snr
    img = np.hypot(img + sig * rng.standard_normal(img.shape), sig * rng.standard_normal(img.shape))
    return img.astype(np.float32)


def volume_slices(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, per_axis: int,
                  min_foreground: float = 0.15) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Up to ``per_axis`` random slices along each of the three axes with enough object in them;
    returns (images, object masks)."""
    ims, ms = [], []
    obj = labels > 0
    for axis in range(3):
        frac = obj.mean(axis=tuple(a for a in range(3) if a != axis))
        ok = np.flatnonzero(frac >= min_foreground)
        if ok.size == 0:
            continue
        for i in rng.choice(ok, size=min(per_axis, ok.size), replace=False):
            ims.append(np.take(img, i, axis=axis))
            ms.append(np.take(obj, i, axis=axis))
    return ims, ms


def synth_slices(n_volumes: int, seed: int, cfg: SynthConfig = SynthConfig(),
                 per_axis: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(images, masks)`` stacked as ``(N, S, S)``: slices of ``n_volumes`` random volumes."""
    rng = np.random.default_rng(seed)
    ims: list[np.ndarray] = []
    ms: list[np.ndarray] = []
    for _ in range(n_volumes):
        labels, k = random_label_volume(rng, cfg)
        img = render_volume(labels, k, rng, cfg)
        a, b = volume_slices(img, labels, rng, per_axis)
        ims += a
        ms += b
    return np.stack(ims).astype(np.float32), np.stack(ms)


@dataclass
class SynthPool:
    """Pre-rendered bias-free MR-like slices and their object masks; :meth:`batch` augments them.

    Augmentation: flips, 90-degree rotations, a log-uniform intensity scale (the net must not care)
    and, in ``p_crop`` of the samples, a random rectangular field of view (zero outside, as the
    inference pads non-square slices), so that the border of the input is not always the border
    of the volume.
    """

    images: torch.Tensor  # (N, 1, S, S) float32 >= 0
    masks: torch.Tensor  # (N, 1, S, S) bool, the object
    p_crop: float = 0.3

    @classmethod
    def build(cls, n_volumes: int, seed: int, cfg: SynthConfig = SynthConfig(),
              per_axis: int = 4) -> SynthPool:
        ims, ms = synth_slices(n_volumes, seed, cfg, per_axis)
        return cls(torch.from_numpy(ims).unsqueeze(1), torch.from_numpy(ms).unsqueeze(1))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, masks)`` each ``(n, 1, S, S)``; the mask is the object inside the view."""
        idx = torch.randint(len(self), (n,), generator=generator)
        x, m = self.images[idx].clone(), self.masks[idx].clone()
        if torch.rand(1, generator=generator).item() < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        if torch.rand(1, generator=generator).item() < 0.5:
            x, m = x.flip(-2), m.flip(-2)
        k = int(torch.randint(4, (1,), generator=generator))
        x, m = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(m, k, dims=(-2, -1))
        s = x.shape[-1]
        view = torch.ones_like(m)
        for i in range(n):
            if torch.rand(1, generator=generator).item() < self.p_crop:
                h, w = (int(v) for v in torch.randint(s // 2, s + 1, (2,), generator=generator))
                y0 = int(torch.randint(0, s - h + 1, (1,), generator=generator))
                x0 = int(torch.randint(0, s - w + 1, (1,), generator=generator))
                view[i] = False
                view[i, :, y0:y0 + h, x0:x0 + w] = True
        scale = torch.exp(torch.empty(n, 1, 1, 1).uniform_(math.log(1e-2), math.log(1e2),
                                                             generator=generator))
        return x * view * scale, m & view
