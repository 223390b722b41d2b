"""Bias-field correction benchmark: the shipped CNN against N4, measured in the same run.

Run from the repository root (one command; about 10 min on 2 CPU threads)::

    python benchmarks/bias/bench_bias.py [--threads 2] [--repeats 3] [--device cpu] [--speed-only]

1. **Demo, known field** (the project's own ``qmri-bids demo``, generated here): correlation of
   the log-fields and mean absolute error of each method's field against the true field, both
   at geometric mean 1 inside the head; both subjects, T1w and T2w.
2. **ds-real, 8 anatomical images** (read-only, skipped with a note when absent):
   (a) *known-field recovery*: the image ``v`` is multiplied by a smooth field ``b`` of our own
   (:func:`qmri_bids.bias.fields.random_bias_field`, 80 mm correlation length, peak 1.25, one
   fixed seed per image); each method runs on ``v`` and ``v b`` and the ratio of its two fields
   (each at geometric mean 1 in the object) is compared with ``b``: MAE inside the object
   ("none" = doing nothing); (b) *within-class CV*: 3 classes from k-means on the log of the
   geometric mean of the CNN- and N4-corrected images inside the (eroded) object, so that the
   segmentation favours neither; mean over classes of std/mean, raw / CNN / N4.
3. **Speed** on a 181x217x181 volume (1 mm, the MNI grid size): correction compute (arrays in
   memory, no file I/O) and the whole Nipype interface (load, correct, write image + field as
   .nii.gz), CNN and N4 with the same thread count, medians of ``--repeats``; ratios N4/CNN.

All masks come from one rule (:func:`qmri_bids.bias.cnn.foreground_mask`, the CNN's own; N4
uses Otsu as in fMRIPrep). Markdown on stdout, JSON in ``benchmarks/bias/results/bias.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from qmri_bids.bias.cnn import foreground_mask
from qmri_bids.bias.fields import random_bias_field
from qmri_bids.bias.inference import correct_bias_cnn
from qmri_bids.bias.metrics import (
    field_agreement,
    geometric_normalise,
    neutral_classes,
    within_class_cv,
)
from qmri_bids.bias.n4 import n4_correct
from qmri_bids.bias.weights import load_model
from qmri_bids.provenance import hardware_string

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("QMRI_SHARED_DATA", REPO.parent / "shared" / "data"))
DS_REAL = SHARED / "ds-real"
SCRATCH = REPO / "benchmarks" / "bias" / "scratch"
OUT = REPO / "benchmarks" / "bias" / "results" / "bias.json"

CASES = [
    ("sub-brain01 T1w", "sub-brain01/anat/sub-brain01_T1w.nii.gz"),
    ("sub-brain01 PDw (MTS flip-1 mt-off)", "sub-brain01/anat/sub-brain01_flip-1_mt-off_MTS.nii.gz"),
    ("sub-neck01 T1w", "sub-neck01/anat/sub-neck01_T1w.nii.gz"),
    ("sub-neck01 T2w", "sub-neck01/anat/sub-neck01_T2w.nii.gz"),
    ("sub-neck01 T2starw", "sub-neck01/anat/sub-neck01_T2starw.nii.gz"),
    ("sub-balls01 T1w", "sub-balls01/anat/sub-balls01_T1w.nii.gz"),
    ("sub-balls01 T2w", "sub-balls01/anat/sub-balls01_T2w.nii.gz"),
    ("sub-kidney01 MESE echo-1", "sub-kidney01/anat/sub-kidney01_echo-1_MESE.nii.gz"),
]


def _median_time(fn, repeats: int) -> tuple[object, float]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _load(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    im = nib.load(str(path))
    data = np.asanyarray(im.dataobj).astype(np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, tuple(float(z) for z in im.header.get_zooms()[:3])


def eroded_object(img: np.ndarray) -> np.ndarray:
    """The object without its partial-volume rim (2 voxels in-plane, 1 through-plane if the
    image has enough slices)."""
    m = foreground_mask(img)
    st = np.ones((5, 5, 3 if img.shape[2] >= 8 else 1), bool)
    eroded = ndimage.binary_erosion(m, structure=st)
    return eroded if eroded.sum() > 200 else m


def known_field_recovery(img: np.ndarray, spacing: tuple, model, f_cnn: np.ndarray,
                         f_n4: np.ndarray, seed: int, device: str) -> dict:
    m = foreground_mask(img)
    b = random_bias_field(img.shape, seed, length_scale=80.0, max_value=1.25, spacing=spacing,
                          mask=m)
    vb = img * b
    _, g_cnn = correct_bias_cnn(vb, spacing, model, device=device, mask=m)
    _, g_n4 = n4_correct(vb, spacing, mask=m)
    cnn = field_agreement(geometric_normalise(g_cnn, m) / geometric_normalise(f_cnn, m), b, m)
    n4 = field_agreement(geometric_normalise(g_n4, m) / geometric_normalise(f_n4, m), b, m)
    return {"none_mae": cnn["mae_none"], "cnn_mae": cnn["mae"], "n4_mae": n4["mae"],
            "cnn_corr": cnn["correlation"], "n4_corr": n4["correlation"]}


def class_cv(img: np.ndarray, c_cnn: np.ndarray, c_n4: np.ndarray) -> dict:
    obj = eroded_object(img)
    classes = neutral_classes(c_cnn, c_n4, obj)
    return {"raw": within_class_cv(img, classes), "cnn": within_class_cv(c_cnn, classes),
            "n4": within_class_cv(c_n4, classes)}


def demo_section(model, device: str) -> list[dict]:
    demo = SCRATCH / "demo_anat"
    if not (demo / "dataset_description.json").is_file():
        from qmri_bids.demo.cli import demo_main

        demo_main([str(demo), "--no-qmri"])
    rows = []
    for sub in ("01", "02"):
        gt = demo / "derivatives" / "groundtruth" / f"sub-{sub}" / "anat"
        head = nib.load(str(gt / f"sub-{sub}_desc-tissue_dseg.nii.gz")).get_fdata() > 0
        for suffix in ("T1w", "T2w"):
            img, sp = _load(demo / f"sub-{sub}" / "anat" / f"sub-{sub}_{suffix}.nii.gz")
            truth = nib.load(str(gt / f"sub-{sub}_desc-truefield_{suffix}.nii.gz")).get_fdata()
            _, f_cnn = correct_bias_cnn(img, sp, model, device=device)
            _, f_n4 = n4_correct(img, sp)
            a, b = field_agreement(f_cnn, truth, head), field_agreement(f_n4, truth, head)
            rows.append({"case": f"demo sub-{sub} {suffix}", "none_mae": a["mae_none"],
                         "cnn_corr": a["correlation"], "cnn_mae": a["mae"],
                         "n4_corr": b["correlation"], "n4_mae": b["mae"]})
    return rows


def mni_sized_volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 181x217x181 head phantom at 1 mm with a known field and Rician-like noise."""
    from qmri_bids.demo.phantom import make_head_phantom

    ph = make_head_phantom((181, 217, 181), (1.0, 1.0, 1.0), 0)
    img = ph.pd * (1 - np.exp(-0.8 / np.maximum(ph.t1, 1e-3))) * 100
    b = random_bias_field(img.shape, 1, length_scale=100.0, max_value=1.2,
                          spacing=(1.0, 1.0, 1.0), mask=ph.head_mask)
    rng = np.random.default_rng(0)
    noisy = np.hypot(img * b + rng.normal(0, 1.5, img.shape), rng.normal(0, 1.5, img.shape))
    return noisy.astype(np.float32), (1.0, 1.0, 1.0)


def speed_section(model, repeats: int, device: str, threads: int) -> dict:
    from qmri_bids.interfaces.bias import CNNBiasCorrection, N4BiasCorrection

    img, sp = mni_sized_volume()
    correct_bias_cnn(img, sp, model, device=device)  # warm-up (allocations, lazy imports)
    _, t_cnn = _median_time(lambda: correct_bias_cnn(img, sp, model, device=device), repeats)
    _, t_n4 = _median_time(lambda: n4_correct(img, sp), max(1, repeats // 2))
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        src = Path(tmp) / "sub-01_T1w.nii.gz"
        nib.save(nib.Nifti1Image(img, np.diag([*sp, 1.0])), str(src))

        def node(iface_cls, **kw):
            def run():
                wd = Path(tempfile.mkdtemp(dir=tmp))
                cwd = os.getcwd()
                os.chdir(wd)
                try:
                    iface_cls(in_file=str(src), **kw).run()
                finally:
                    os.chdir(cwd)
            return run

        kw = {"device": device, "n_threads": threads, "model": str(model.path.resolve())}
        node(CNNBiasCorrection, **kw)()  # warm-up
        _, n_cnn = _median_time(node(CNNBiasCorrection, **kw), repeats)
        _, n_n4 = _median_time(node(N4BiasCorrection), max(1, repeats // 2))
    return {"shape": list(img.shape), "compute_cnn_s": t_cnn, "compute_n4_s": t_n4,
            "compute_ratio": t_n4 / t_cnn, "node_cnn_s": n_cnn, "node_n4_s": n_n4,
            "node_ratio": n_n4 / n_cnn}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true",
                    help="re-measure only the speed (e.g. on an idle machine) and update the "
                         "speed entry of the existing JSON")
    ap.add_argument("--model", default=None,
                    help="model name or .safetensors path (default: the shipped model)")
    args = ap.parse_args()
    import SimpleITK as sitk

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, device=args.device) if args.model else \
        load_model(device=args.device)
    if args.speed_only:
        res = json.loads(OUT.read_text()) if OUT.is_file() else {}
        res["speed"] = speed_section(model, args.repeats, args.device, args.threads)
        res["speed"]["load_average"] = os.getloadavg()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["speed"], indent=2))
        return 0
    res: dict = {"model": model.name, "model_sha256": model.sha256,
                 "hardware": hardware_string(args.device), "threads": args.threads,
                 "load_average_start": os.getloadavg()}
    res["demo"] = demo_section(model, args.device)
    res["real"] = []
    if (DS_REAL / "dataset_description.json").is_file():
        for i, (label, rel) in enumerate(CASES):
            img, sp = _load(DS_REAL / rel)
            c_cnn, f_cnn = correct_bias_cnn(img, sp, model, device=args.device)
            c_n4, f_n4 = n4_correct(img, sp)
            res["real"].append({"case": label, "shape": list(img.shape),
                                "recovery": known_field_recovery(img, sp, model, f_cnn, f_n4,
                                                                 seed=100 + i,
                                                                 device=args.device),
                                "class_cv": class_cv(img, c_cnn, c_n4)})
    else:
        res["note"] = f"ds-real not found at {DS_REAL}: real-image cases skipped"
    if not args.skip_speed:
        res["speed"] = speed_section(model, args.repeats, args.device, args.threads)
    res["load_average_end"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print_markdown(res)
    return 0


def print_markdown(res: dict) -> None:
    print(f"# Bias-field correction: CNN ({res['model']}) vs N4\n")
    print(f"{res['hardware']}; {res['threads']} thread(s) each; load average "
          f"{res['load_average_start'][0]:.1f} -> {res['load_average_end'][0]:.1f}\n")
    print("| demo image (known field) | none MAE | CNN corr | CNN MAE | N4 corr | N4 MAE |")
    print("|---|---|---|---|---|---|")
    for r in res["demo"]:
        print(f"| {r['case']} | {r['none_mae']:.4f} | {r['cnn_corr']:.3f} | {r['cnn_mae']:.4f} "
              f"| {r['n4_corr']:.3f} | {r['n4_mae']:.4f} |")
    if res["real"]:
        print("\n| ds-real image | recovery MAE none / CNN / N4 | CNN better | class CV raw / "
              "CNN / N4 | CNN/N4 CV |")
        print("|---|---|---|---|---|")
        for r in res["real"]:
            k, c = r["recovery"], r["class_cv"]
            print(f"| {r['case']} | {k['none_mae']:.4f} / {k['cnn_mae']:.4f} / "
                  f"{k['n4_mae']:.4f} | {'yes' if k['cnn_mae'] < k['n4_mae'] else 'no'} | "
                  f"{c['raw']:.4f} / {c['cnn']:.4f} / {c['n4']:.4f} | "
                  f"{c['cnn'] / c['n4']:.3f} |")
        better = sum(r["recovery"]["cnn_mae"] < r["recovery"]["n4_mae"] for r in res["real"])
        cv_ok = sum(r["class_cv"]["cnn"] <= r["class_cv"]["n4"] for r in res["real"])
        print(f"\nCNN recovers the applied field better than N4 on {better} of "
              f"{len(res['real'])}; CNN class CV <= N4's on {cv_ok} of {len(res['real'])}.")
    if "speed" in res:
        s = res["speed"]
        print(f"\nSpeed, {'x'.join(map(str, s['shape']))}: compute CNN {s['compute_cnn_s']:.3f} s"
              f", N4 {s['compute_n4_s']:.1f} s ({s['compute_ratio']:.0f}x); whole node CNN "
              f"{s['node_cnn_s']:.2f} s, N4 {s['node_n4_s']:.1f} s ({s['node_ratio']:.1f}x)")
    print(f"\nJSON: {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    raise SystemExit(main())
