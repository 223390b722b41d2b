"""Bias-field correction benchmark: the shipped CNN against N4 on real images and a phantom.

Run from the repository root::

    python benchmarks/bias/bench_bias.py [--threads 1] [--repeats 3]

Per image (ds-real, read-only, plus a synthetic phantom with a known field):

* uniformity: coefficient of variation (CV) inside each ball (sub-balls01), inside white matter
  for the brain (WM = one class of a 3-class k-means of the N4-corrected image inside the eroded
  head mask: brightest class for T1w, darkest for PDw) and the coefficient of joint variation
  CJV = (sd_WM + sd_GM) / |mean_WM - mean_GM|; lower is better, "raw" is the uncorrected image.
  For the phantom: the error of the estimated field against the known one.
* implicit consistency (no ground truth needed): multiply the image by a known smooth field
  ``b`` (``qmri_bids.bias.fields.random_bias_field``, 80 mm length scale, peak 1.25, fixed seed);
  a correct method's field must change by exactly ``b``: CNN ``F(v b)/F(v)``, N4
  ``field(v b)/field(v)``, compared with ``b`` (all at geometric mean 1 in the object), reported as
  mean absolute error inside the object; "none" is the error of doing nothing (|1 - b|).
* time per volume, CNN and N4 in the same run with the same thread count, and their ratio.

Markdown goes to stdout, JSON to ``benchmarks/bias/results/bias.json``. The machine is shared:
timings are medians of ``--repeats`` runs and the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from qmri_bids.bias.cnn import foreground_mask
from qmri_bids.bias.fields import random_bias_field
from qmri_bids.bias.inference import correct_bias_cnn
from qmri_bids.bias.train import hardware_string
from qmri_bids.bias.weights import load_model

REPO = Path(__file__).resolve().parents[2]
DS_REAL = Path(os.environ.get("QMRI_SHARED_DATA", REPO.parent / "shared" / "data")) / "ds-real"
OUT = REPO / "benchmarks" / "bias" / "results" / "bias.json"

CASES = [
    ("sub-brain01 T1w", "sub-brain01/anat/sub-brain01_T1w.nii.gz", "brain_t1"),
    ("sub-brain01 PDw (MTS flip-1 mt-off)", "sub-brain01/anat/sub-brain01_flip-1_mt-off_MTS.nii.gz",
     "brain_pd"),
    ("sub-neck01 T1w", "sub-neck01/anat/sub-neck01_T1w.nii.gz", None),
    ("sub-neck01 T2w", "sub-neck01/anat/sub-neck01_T2w.nii.gz", None),
    ("sub-neck01 T2starw", "sub-neck01/anat/sub-neck01_T2starw.nii.gz", None),
    ("sub-balls01 T1w", "sub-balls01/anat/sub-balls01_T1w.nii.gz", "balls"),
    ("sub-balls01 T2w", "sub-balls01/anat/sub-balls01_T2w.nii.gz", "balls"),
    ("sub-kidney01 MESE echo-1", "sub-kidney01/anat/sub-kidney01_echo-1_MESE.nii.gz", None),
]


def _cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def _geo(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    return x / np.exp(np.log(x[m]).mean())


def _timed(fn, repeats: int):
    """(result, median wall s, median CPU s of this process). CPU time is what the method costs;
    wall time on a shared machine also counts waiting for a core."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, statistics.median(walls), statistics.median(cpus)


def ball_masks(img: np.ndarray) -> list[np.ndarray]:
    """The two (touching) balls of sub-balls01: object = voxels above 2 % of the 99th percentile
    (the phantom's shading is so strong that Otsu misses its dark parts), holes filled per slice,
    largest component, split into two balls by 2-means on voxel coordinates, eroded in-plane
    (edges, partial volume)."""
    thr = 0.02 * np.percentile(img, 99)
    fg = ndimage.binary_opening(img > thr, structure=np.ones((3, 3, 1), bool))
    for k in range(fg.shape[2]):
        fg[:, :, k] = ndimage.binary_fill_holes(fg[:, :, k])
    lab, n = ndimage.label(fg)
    obj = lab == (np.argmax(ndimage.sum(fg, lab, range(1, n + 1))) + 1)
    xyz = np.argwhere(obj).astype(float)
    c = xyz[[xyz[:, 0].argmin(), xyz[:, 0].argmax()]]  # far ends of the object along x
    for _ in range(50):
        lab2 = np.argmin(((xyz[:, None, :2] - c[None, :, :2]) ** 2).sum(-1), axis=1)
        c = np.stack([xyz[lab2 == k].mean(0) for k in range(2)])
    out = []
    for k in range(2):
        m = np.zeros_like(obj)
        m[tuple(xyz[lab2 == k].astype(int).T)] = True
        m = ndimage.binary_erosion(m, structure=np.ones((5, 5, 1), bool))
        if m.sum() > 50:
            out.append(m)
    return out


def kmeans3(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """1-D k-means (3 classes) on intensities; labels sorted by class mean (0 darkest)."""
    rng = np.random.default_rng(seed)
    c = np.percentile(values, [20, 50, 80]) + rng.normal(0, 1e-6, 3)
    for _ in range(100):
        lab = np.argmin(np.abs(values[:, None] - c[None]), axis=1)
        new = np.array([values[lab == k].mean() if (lab == k).any() else c[k] for k in range(3)])
        if np.allclose(new, c):
            break
        c = new
    order = np.argsort(c)
    return np.argsort(order)[lab]


def brain_metrics(raw: np.ndarray, cnn: np.ndarray, n4: np.ndarray, t1: bool) -> dict:
    head = ndimage.binary_erosion(foreground_mask(raw), iterations=3)
    lab = kmeans3(n4[head])
    wm_k, gm_k = (2, 1) if t1 else (0, 1)
    wm = np.zeros_like(head)
    gm = np.zeros_like(head)
    wm[head] = lab == wm_k
    gm[head] = lab == gm_k
    out = {"wm_voxels": int(wm.sum()), "gm_voxels": int(gm.sum())}
    for name, im in (("raw", raw), ("cnn", cnn), ("n4", n4)):
        out[f"cv_wm_{name}"] = _cv(im[wm])
        out[f"cjv_{name}"] = float((im[wm].std() + im[gm].std())
                                   / abs(im[wm].mean() - im[gm].mean()))
    return out


def consistency(img: np.ndarray, spacing: tuple, model, f_cnn: np.ndarray, f_n4: np.ndarray | None,
                seed: int = 1) -> dict:
    from qmri_bids.bias.n4 import n4_correct

    m = foreground_mask(img)
    b = random_bias_field(img.shape, seed, length_scale=80.0, max_value=1.25, spacing=spacing,
                          mask=m)
    vb = img * b
    target = _geo(b, m)
    _, fg_cnn = correct_bias_cnn(vb, spacing, model, mask=m)
    out = {"none_mae": float(np.abs(1 - target)[m].mean()),
           "cnn_mae": float(np.abs(_geo(fg_cnn / f_cnn, m) - target)[m].mean())}
    if f_n4 is not None:
        _, fg_n4 = n4_correct(vb, spacing, mask=m)
        out["n4_mae"] = float(np.abs(_geo(fg_n4 / f_n4, m) - target)[m].mean())
    return out


def synthetic_phantom(seed: int = 7) -> tuple[np.ndarray, np.ndarray, tuple, list[np.ndarray]]:
    """Head-like ellipsoid (1.5 mm, 128x128x96) with compartments of uniform intensity, Rician-like
    noise, times a known field with 30 % peak. Returns (image, field, spacing, compartments)."""
    rng = np.random.default_rng(seed)
    shape, spacing = (128, 128, 96), (1.5, 1.5, 1.5)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    head = ((grid / np.array([0.8, 0.9, 0.85])[:, None, None, None]) ** 2).sum(0) < 1
    u = np.where(head, 100.0, 0.0)
    comps = [head.copy()]
    for _ in range(5):
        c = rng.uniform(-0.4, 0.4, 3)
        r = rng.uniform(0.12, 0.25)
        ball = ((grid - c[:, None, None, None]) ** 2).sum(0) < r * r
        u[ball] = rng.uniform(40, 160)
        comps[0] &= ~ball
        comps = [cm & ~ball for cm in comps] + [ball]
    b = random_bias_field(shape, rng, length_scale=100.0, max_value=1.3, spacing=spacing,
                          mask=head)
    noisy = np.abs(u * b + rng.normal(0, 2, shape) + 1j * rng.normal(0, 2, shape))
    comps = [ndimage.binary_erosion(cm, iterations=2) for cm in comps]
    return noisy.astype(np.float32), b, spacing, [cm for cm in comps if cm.sum() > 100]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import SimpleITK as sitk

    from qmri_bids.bias.n4 import n4_correct

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    model = load_model()
    results: dict = {"model": model.name, "model_sha256": model.sha256,
                     "hardware": hardware_string(), "threads": args.threads,
                     "load_average_start": os.getloadavg(), "cases": []}
    rows = []

    def run_case(label: str, img: np.ndarray, spacing: tuple, kind: str | None,
                 true_field: np.ndarray | None = None, comps: list | None = None) -> None:
        m = foreground_mask(img)
        correct_bias_cnn(img, spacing, model)  # warm-up (first-call allocations)
        (c_cnn, f_cnn), t_cnn, cpu_cnn = _timed(lambda: correct_bias_cnn(img, spacing, model),
                                                args.repeats)
        (c_n4, f_n4), t_n4, cpu_n4 = _timed(lambda: n4_correct(img, spacing), args.repeats)
        rec: dict = {"case": label, "shape": list(img.shape), "spacing": [float(s) for s in spacing],
                     "time_cnn_s": t_cnn, "time_n4_s": t_n4, "speedup": t_n4 / t_cnn,
                     "cpu_cnn_s": cpu_cnn, "cpu_n4_s": cpu_n4, "speedup_cpu": cpu_n4 / cpu_cnn,
                     "field_range_cnn": [float(f_cnn[m].min()), float(f_cnn[m].max())],
                     "field_range_n4": [float(f_n4[m].min()), float(f_n4[m].max())]}
        if kind == "balls":
            balls = ball_masks(img)
            for name, im in (("raw", img), ("cnn", c_cnn), ("n4", c_n4)):
                rec[f"cv_balls_{name}"] = [_cv(im[bm]) for bm in balls]
        elif kind in ("brain_t1", "brain_pd"):
            rec.update(brain_metrics(img, c_cnn, c_n4, kind == "brain_t1"))
        if true_field is not None:
            for name, f in (("cnn", f_cnn), ("n4", f_n4)):
                rec[f"field_mae_{name}"] = float(np.abs(_geo(f, m) - _geo(true_field, m))[m].mean())
            rec["field_mae_none"] = float(np.abs(1 - _geo(true_field, m))[m].mean())
            for name, im in (("raw", img), ("cnn", c_cnn), ("n4", c_n4)):
                rec[f"cv_compartments_{name}"] = float(np.mean([_cv(im[cm]) for cm in comps]))
        rec["consistency"] = consistency(img, spacing, model, f_cnn, f_n4)
        results["cases"].append(rec)
        rows.append(rec)

    if (DS_REAL / "dataset_description.json").is_file():
        for label, rel, kind in CASES:
            im = nib.load(str(DS_REAL / rel))
            data = np.asanyarray(im.dataobj).astype(np.float32)
            run_case(label, data, tuple(float(z) for z in im.header.get_zooms()[:3]), kind)
    else:
        results["note"] = f"ds-real not found at {DS_REAL}: real-image cases skipped"
    img, b, sp, comps = synthetic_phantom()
    run_case("synthetic phantom (known field, 30 % peak)", img, sp, None, b, comps)
    results["load_average_end"] = os.getloadavg()

    print(f"# Bias-field correction: CNN ({model.name}) vs N4\n")
    print(f"{results['hardware']}; {args.threads} thread(s) each; load average "
          f"{results['load_average_start'][0]:.1f} -> {results['load_average_end'][0]:.1f}\n")
    print("| image | shape | CNN wall s (CPU s) | N4 wall s (CPU s) | N4/CNN wall (CPU) | "
          "consistency MAE none / CNN / N4 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = r["consistency"]
        print(f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['time_cnn_s']:.3f} "
              f"({r['cpu_cnn_s']:.3f}) | {r['time_n4_s']:.2f} ({r['cpu_n4_s']:.2f}) | "
              f"{r['speedup']:.0f}x ({r['speedup_cpu']:.0f}x) | {c['none_mae']:.4f} / "
              f"{c['cnn_mae']:.4f} / {c.get('n4_mae', float('nan')):.4f} |")
    print("\n| image | uniformity metric | raw | CNN | N4 |\n|---|---|---|---|---|")
    for r in rows:
        if "cv_balls_raw" in r:
            for i in range(len(r["cv_balls_raw"])):
                print(f"| {r['case']} | CV ball {i + 1} | {r['cv_balls_raw'][i]:.4f} | "
                      f"{r['cv_balls_cnn'][i]:.4f} | {r['cv_balls_n4'][i]:.4f} |")
        if "cjv_raw" in r:
            print(f"| {r['case']} | CV WM | {r['cv_wm_raw']:.4f} | {r['cv_wm_cnn']:.4f} | "
                  f"{r['cv_wm_n4']:.4f} |")
            print(f"| {r['case']} | CJV WM/GM | {r['cjv_raw']:.4f} | {r['cjv_cnn']:.4f} | "
                  f"{r['cjv_n4']:.4f} |")
        if "field_mae_cnn" in r:
            print(f"| {r['case']} | field MAE vs truth | {r['field_mae_none']:.4f} | "
                  f"{r['field_mae_cnn']:.4f} | {r['field_mae_n4']:.4f} |")
            print(f"| {r['case']} | mean CV of compartments | {r['cv_compartments_raw']:.4f} | "
                  f"{r['cv_compartments_cnn']:.4f} | {r['cv_compartments_n4']:.4f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {OUT.relative_to(REPO)}; platform {platform.platform()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
