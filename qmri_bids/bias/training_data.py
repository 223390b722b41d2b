"""Non-medical training images that need no download: dead leaves + scikit-image's photographs.

Why this is a fair stand-in for ImageNet
----------------------------------------
The implicit training of Simkó et al. never needs a ground-truth field: it only asks the network
to separate "image content" from "a smooth multiplicative field it was not told about". What the
images must provide is therefore the *statistics* of natural content -- edges at all scales,
occlusions, flat regions next to textured ones, slowly shaded surfaces -- not ImageNet's semantic
classes. ImageNet was chosen in the paper precisely because it is not medical.

* The dead-leaves model (Matheron 1968; Lee, Mumford & Huang, IJCV 2001) -- opaque shapes with a
  power-law size distribution ``p(r) ~ r**-3`` painted over each other -- is the classic generative
  model that reproduces the scale invariance of natural images (1/f**2 power spectrum, the
  distribution of edge contrasts, occlusion boundaries). Each leaf here also gets a texture
  (grating or fine noise) and a shading ramp, so smooth intensity changes are sometimes content:
  the net must learn that only the *consistent* multiplicative part is the field, as with photos.
* The photographs bundled with scikit-image (camera, astronaut, chelsea, rocket, ...) add real
  optics, lighting and textures. Only files present in the installed package are used: nothing is
  fetched. ``coffee`` and ``coins`` are held out for validation.
* Background (exactly zero) regions -- a random smooth blob as "object", zero outside -- teach the
  network that air carries no information about the field; the foreground mask is also an input.

The training pipeline works on ``size x size`` patches (default 64, the network's input size).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qmri_bids.bias.fields import gaussian_random_field

log = logging.getLogger("qmri_bids.bias")

#: scikit-image example photographs used for training / held out for validation.
TRAIN_PHOTOS = ("camera", "astronaut", "chelsea", "rocket", "moon", "brick", "grass", "gravel",
                "page", "hubble_deep_field", "immunohistochemistry", "retina", "clock")
VALIDATION_PHOTOS = ("coffee", "coins")


# --------------------------------------------------------------------------- dead leaves
def _power_law_radius(rng: np.random.Generator, rmin: float, rmax: float, alpha: float = 3.0
                      ) -> float:
    """Inverse-CDF draw from p(r) ~ r**-alpha on [rmin, rmax] (scale-invariant for alpha=3)."""
    u = rng.uniform()
    a = 1.0 - alpha
    return float((rmin ** a + u * (rmax ** a - rmin ** a)) ** (1.0 / a))


def dead_leaves(size: int, rng: np.random.Generator, rmin: float | None = None,
                rmax: float | None = None, max_shapes: int = 3000, oversample: int = 2
                ) -> np.ndarray:
    """One textured, shaded dead-leaves image in [0.02, 1] of shape ``(size, size)``, float32.

    Leaves are painted front to back (each only where nothing is yet), which is equivalent to
    back-to-front occlusion and lets us stop once the canvas is covered. Rendering at
    ``oversample`` x resolution then area-averaging gives anti-aliased (partial-volume) edges.
    """
    n = size * oversample
    rmin = (1.0 if rmin is None else rmin) * oversample
    rmax = (size / 2.0 if rmax is None else rmax) * oversample
    img = np.zeros((n, n), np.float64)
    covered = np.zeros((n, n), bool)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    for _ in range(max_shapes):
        r = _power_law_radius(rng, rmin, rmax)
        cy, cx = rng.uniform(-r, n + r, size=2)
        y0, y1 = max(int(cy - 1.5 * r), 0), min(int(cy + 1.5 * r) + 1, n)
        x0, x1 = max(int(cx - 1.5 * r), 0), min(int(cx + 1.5 * r) + 1, n)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        theta = rng.uniform(0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        u, v = c * dx + s * dy, -s * dx + c * dy
        kind = rng.integers(3)
        aspect = rng.uniform(0.4, 1.0)
        if kind == 0:  # disk
            inside = dx ** 2 + dy ** 2 <= r ** 2
        elif kind == 1:  # ellipse
            inside = (u / r) ** 2 + (v / (aspect * r)) ** 2 <= 1.0
        else:  # rectangle
            inside = (np.abs(u) <= r) & (np.abs(v) <= aspect * r)
        new = inside & ~covered[y0:y1, x0:x1]
        if not new.any():
            continue
        base = math.exp(rng.uniform(math.log(0.05), 0.0))  # log-uniform: many dark and bright
        val = np.full(new.shape, base)
        tex = rng.integers(3)
        if tex == 1:  # grating
            period = rng.uniform(3, 20) * oversample
            val *= 1.0 + rng.uniform(0.05, 0.3) * np.sin(2 * math.pi * u / period
                                                         + rng.uniform(0, 2 * math.pi))
        elif tex == 2:  # fine noise
            val *= 1.0 + rng.uniform(0.02, 0.15) * rng.standard_normal(new.shape)
        # linear shading ramp across the leaf: smooth changes can be content too
        val *= 1.0 + rng.uniform(-0.3, 0.3) * (u / max(r, 1.0)) * 0.5
        sub = img[y0:y1, x0:x1]
        sub[new] = val[new]
        covered[y0:y1, x0:x1] |= new
        if covered.all():
            break
    img = img.reshape(size, oversample, size, oversample).mean(axis=(1, 3))
    return np.clip(img, 0.02, None).astype(np.float32)


# --------------------------------------------------------------------------- photographs
def load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """Grayscale float32 [0, 1] versions of the bundled scikit-image photos that load offline."""
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb

    out: list[np.ndarray] = []
    for name in names:
        fn = getattr(skimage.data, name, None)
        if fn is None:
            continue
        try:
            # The bundled files load from the installed package; anything that would need the
            # network (pooch cache miss) raises and is skipped -- never downloaded.
            im = np.asarray(fn())
        except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
            log.debug("skimage photo %s unavailable offline: %s", name, exc)
            continue
        if im.ndim == 3 and im.shape[-1] == 4:
            im = rgba2rgb(im)
        if im.ndim == 3:
            im = rgb2gray(im)
        im = im.astype(np.float32)
        if im.max() > 1.5:
            im = im / 255.0
        out.append(np.clip(im, 0.0, 1.0))
    return out


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crop of random scale, resized to ``size`` with anti-aliasing."""
    from skimage.transform import resize

    h, w = photo.shape
    side = int(rng.integers(min(size, h, w), min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[y:y + side, x:x + side]
    crop = resize(crop, (size, size), anti_aliasing=side > size, preserve_range=True)
    return np.clip(crop, 0.02, None).astype(np.float32)  # >0: zero is reserved for "air"


# --------------------------------------------------------------------------- backgrounds
def object_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random blob (the "object"); zero outside is air. Covers roughly 30-95 %."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    cy, cx = rng.uniform(-0.15, 0.15, size=2)
    ay, ax = rng.uniform(0.25, 0.6, size=2)
    theta = rng.uniform(0, math.pi)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    rho = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    wobble = gaussian_random_field((size, size), rng, length_scale=size / 5.0)
    return (rho + 0.12 * wobble) < 1.0


# --------------------------------------------------------------------------- the pool
@dataclass
class TrainingPool:
    """Pre-rendered images and object masks; :meth:`batch` samples augmented training batches."""

    images: torch.Tensor  # (N, 1, S, S) float32 > 0
    masks: torch.Tensor  # (M, 1, S, S) bool
    p_background: float = 0.7

    @classmethod
    def build(cls, size: int = 64, n_dead_leaves: int = 1500, n_photo_crops: int = 1500,
              n_masks: int = 500, seed: int = 0, photos: tuple[str, ...] = TRAIN_PHOTOS,
              p_background: float = 0.7) -> TrainingPool:
        rng = np.random.default_rng(seed)
        imgs = [dead_leaves(size, rng) for _ in range(n_dead_leaves)]
        pics = load_photos(photos)
        if pics and n_photo_crops:
            for i in range(n_photo_crops):
                imgs.append(random_crop(pics[i % len(pics)], size, rng))
        log.info("training pool: %d dead-leaves images, %d crops of %d photos, %d masks",
                 n_dead_leaves, len(imgs) - n_dead_leaves, len(pics), n_masks)
        masks = np.stack([object_mask(size, rng) for _ in range(n_masks)])
        return cls(torch.from_numpy(np.stack(imgs)).unsqueeze(1),
                   torch.from_numpy(masks).unsqueeze(1), p_background)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, masks)`` each ``(n, 1, S, S)``; images are zero outside their mask.

        Augmentation: random flips / 90-degree rotations, a log-uniform intensity scale over four
        decades (the network must not care), and air around a random object in ``p_background``
        of the samples.
        """
        idx = torch.randint(len(self.images), (n,), generator=generator)
        x = self.images[idx].clone()
        if torch.rand(1, generator=generator).item() < 0.5:
            x = x.flip(-1)
        if torch.rand(1, generator=generator).item() < 0.5:
            x = x.flip(-2)
        k = int(torch.randint(4, (1,), generator=generator))
        x = torch.rot90(x, k, dims=(-2, -1))
        midx = torch.randint(len(self.masks), (n,), generator=generator)
        use_bg = torch.rand(n, generator=generator) < self.p_background
        m = torch.where(use_bg.view(n, 1, 1, 1), self.masks[midx], torch.ones_like(self.masks[midx]))
        scale = torch.exp(torch.empty(n, 1, 1, 1).uniform_(math.log(1e-2), math.log(1e2),
                                                             generator=generator))
        return x * scale * m, m


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resize a ``(n, c, h, w)`` batch (helper for validation images of other sizes)."""
    return F.interpolate(x, size=(size, size), mode="area")
