"""Neutral measures of bias-field correction, shared by the benchmark, the tests and the reports.

* :func:`field_agreement`: an estimated field against a known one (demo truth, or an applied
  field), both brought to geometric mean 1 in the object first (the global scale of a field is
  not identifiable): Pearson correlation of the log-fields and mean absolute difference.
* :func:`within_class_cv`: the mean coefficient of variation over tissue classes. The classes come
  from k-means (3 classes) on the log of the geometric mean of the two corrected images being
  compared, so that the segmentation favours neither method.
* :func:`coefficient_of_joint_variation`: CJV of two classes (Hou 2006; MRIQC's definition).
"""

from __future__ import annotations

import numpy as np


def geometric_normalise(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x`` divided by its geometric mean inside ``mask``."""
    return x / np.exp(np.log(np.maximum(x[mask], 1e-12)).mean())


def field_agreement(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """``{"correlation", "mae", "mae_none"}`` of ``estimate`` against ``truth`` inside ``mask``;
    ``mae_none`` is the error of doing nothing (a flat field)."""
    m = np.asarray(mask, bool)
    e = geometric_normalise(np.asarray(estimate, np.float64), m)[m]
    t = geometric_normalise(np.asarray(truth, np.float64), m)[m]
    le, lt = np.log(e), np.log(t)
    if le.std() < 1e-12 or lt.std() < 1e-12:
        corr = float("nan")
    else:
        corr = float(np.corrcoef(le, lt)[0, 1])
    return {"correlation": corr, "mae": float(np.abs(e - t).mean()),
            "mae_none": float(np.abs(1.0 - t).mean())}


def kmeans_1d(values: np.ndarray, k: int = 3, iterations: int = 100) -> np.ndarray:
    """Labels 0..k-1 (sorted by class mean, 0 darkest) of 1-D k-means started at percentiles."""
    v = np.asarray(values, np.float64)
    c = np.percentile(v, np.linspace(100 / (k + 1), 100 * k / (k + 1), k))
    lab = np.zeros(v.shape, int)
    for _ in range(iterations):
        lab = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        new = np.array([v[lab == j].mean() if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    order = np.argsort(c)
    return np.argsort(order)[lab]


def neutral_classes(corrected_a: np.ndarray, corrected_b: np.ndarray, mask: np.ndarray,
                    k: int = 3) -> np.ndarray:
    """k-means classes (``-1`` outside ``mask``) on ``log(sqrt(a * b))``: neither method's
    correction decides the segmentation on its own."""
    m = np.asarray(mask, bool) & (corrected_a > 0) & (corrected_b > 0)
    lab = np.full(m.shape, -1, int)
    geo = 0.5 * (np.log(corrected_a[m]) + np.log(corrected_b[m]))
    lab[m] = kmeans_1d(geo, k)
    return lab


def within_class_cv(image: np.ndarray, classes: np.ndarray, min_voxels: int = 50) -> float:
    """Mean over classes (labels >= 0 with at least ``min_voxels``) of std / mean of ``image``."""
    cvs = []
    for j in np.unique(classes[classes >= 0]):
        x = image[classes == j]
        if x.size >= min_voxels and x.mean() > 0:
            cvs.append(float(x.std() / x.mean()))
    return float(np.mean(cvs)) if cvs else float("nan")


def coefficient_of_joint_variation(image: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """``(sd_a + sd_b) / |mean_a - mean_b|`` for two class masks."""
    xa, xb = image[a], image[b]
    return float((xa.std() + xb.std()) / max(abs(xa.mean() - xb.mean()), 1e-12))
