"""A digital head phantom built from geometric shapes, with literature tissue values at 3 T.

Nested ellipsoids make background, scalp/fat, skull, CSF (outer layer and two ventricles), grey
matter and white matter; a few smooth sinusoidal folds break the symmetry so that the images are
not trivially radial. Tissue values are typical 3 T figures from the literature:

* WM and GM T1/T2: Wansapura et al., JMRI 1999;9:531-538 (T1 832/1331 ms, T2 80/110 ms);
* T2*: Peters et al., MRI 2007;25:748-753 (WM 53 ms, GM 66 ms);
* CSF: T1 ~4.2 s, T2 ~2 s (Lin et al., MRM 2001; Spijkerman et al., MAGMA 2018);
* subcutaneous fat: T1 382 ms, T2 68 ms (Gold et al., AJR 2004;183:343-351);
* proton density (water fraction): WM 0.69, GM 0.80, CSF 1.0 (Tofts, qMRI of the brain, 2003).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS = {0: "background", 1: "fat", 2: "skull", 3: "CSF", 4: "GM", 5: "WM"}


@dataclass(frozen=True)
class Tissue:
    pd: float
    t1: float  # s
    t2: float  # s
    t2star: float  # s


TISSUES_3T: dict[int, Tissue] = {
    0: Tissue(0.0, 1.0, 0.05, 0.05),
    1: Tissue(0.90, 0.382, 0.068, 0.035),
    2: Tissue(0.05, 0.30, 0.005, 0.002),
    3: Tissue(1.00, 4.20, 2.00, 0.50),
    4: Tissue(0.80, 1.331, 0.110, 0.066),
    5: Tissue(0.69, 0.832, 0.080, 0.053),
}


@dataclass
class Phantom:
    labels: np.ndarray  # int8
    spacing: tuple[float, float, float]  # mm
    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    t2star: np.ndarray

    @property
    def head_mask(self) -> np.ndarray:
        return self.labels > 0

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = -0.5 * np.array(self.labels.shape) * np.array(self.spacing)
        return aff


def make_head_phantom(shape: tuple[int, int, int] = (80, 96, 72),
                      spacing: tuple[float, float, float] = (2.2, 2.2, 2.2),
                      rng: np.random.Generator | int = 0) -> Phantom:
    """A head phantom on ``shape`` voxels; ``rng`` jitters size, position and folding."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    # Head semi-axes in mm (left-right, anterior-posterior, inferior-superior), jittered ±5 %.
    semi = np.array([72.0, 90.0, 70.0]) * gen.uniform(0.95, 1.05, 3)
    centre = gen.uniform(-3, 3, 3)
    xs, ys, zs = x - centre[0], y - centre[1], z - centre[2]
    r = np.sqrt((xs / semi[0]) ** 2 + (ys / semi[1]) ** 2 + (zs / semi[2]) ** 2)
    # Cortical folding: a smooth angular modulation of the GM/WM border.
    theta = np.arctan2(ys, xs)
    phi = np.arctan2(zs, np.hypot(xs, ys))
    k1, k2 = gen.integers(5, 9), gen.integers(4, 7)
    fold = 0.035 * np.sin(k1 * theta + gen.uniform(0, np.pi)) * np.cos(k2 * phi)

    labels = np.zeros(shape, dtype=np.int8)
    labels[r <= 1.0] = 1  # scalp and fat
    labels[r <= 0.93] = 2  # skull
    labels[r <= 0.86] = 3  # CSF around the brain
    labels[r <= 0.82] = 4  # grey matter
    labels[r <= 0.68 + fold] = 5  # white matter
    # Two lateral ventricles (CSF) inside the white matter.
    for side in (-1, 1):
        vx = (xs - side * 0.16 * semi[0]) / (0.09 * semi[0])
        vy = (ys + 0.05 * semi[1]) / (0.28 * semi[1])
        vz = (zs - 0.05 * semi[2]) / (0.12 * semi[2])
        labels[(vx**2 + vy**2 + vz**2) <= 1.0] = 3
    # Deep grey matter nuclei.
    for side in (-1, 1):
        nx = (xs - side * 0.30 * semi[0]) / (0.10 * semi[0])
        ny = (ys - 0.02 * semi[1]) / (0.14 * semi[1])
        nz = (zs + 0.05 * semi[2]) / (0.12 * semi[2])
        labels[(nx**2 + ny**2 + nz**2) <= 1.0] = 4

    maps = {name: np.zeros(shape, dtype=np.float64) for name in ("pd", "t1", "t2", "t2star")}
    for label, tissue in TISSUES_3T.items():
        sel = labels == label
        for name, values in maps.items():
            values[sel] = getattr(tissue, name)
    return Phantom(labels=labels, spacing=spacing, **maps)
