"""Physics-core benchmark: NLLS bias/efficiency vs the CRB, real-data accuracy, fitting speed.

    python benchmarks/qmri/bench_physics.py [--quick]

(a) Simulation: every model over a grid of realistic parameters; Gaussian noise with SNR 100
    relative to the brightest member of each signal (the noise model the CRB assumes; a Rician
    bias column shows what magnitude noise adds). Bias (%) = (mean − true)/true; efficiency =
    CRB / empirical variance (1 = the estimator reaches the bound).
(b) Real data (ds-real): phantom IR T1 per sphere vs reference, brain WM/GM T1 (IR, VFA+B1,
    two-angle MTS) from a 2-class k-means on T1 inside the object, MTsat, kidney T2.
(c) Speed: voxels/s of NLLS per model on 2 CPU threads.

Prints markdown tables and writes ``benchmarks/qmri/results/physics.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from qmri_bids.qmri.crb import crb
from qmri_bids.qmri.mapping import map_collection
from qmri_bids.qmri.models import (
    IRT1Model,
    IRT1TRModel,
    MEGREModel,
    MESEMonoModel,
    MP2RAGEModel,
    MTSModel,
    VFAModel,
)
from qmri_bids.qmri.nlls import fit_nlls
from qmri_bids.qmri.plan import plan_collection
from qmri_bids.qmri.protocols import collection_from_paths, load_collection_data

ROOT = Path(__file__).resolve().parents[2]
DS = Path(os.environ.get("QMRI_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ds-real"
OUT = ROOT / "benchmarks" / "qmri" / "results" / "physics.json"
F64 = torch.float64
TI = [0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 1.8, 2.7]


def simulation_cases() -> list[tuple[str, object, list[list[float]]]]:
    t1s = [0.6, 0.9, 1.3, 2.0, 3.0]
    return [
        ("vfa", VFAModel([3.0, 8.0, 15.0, 25.0], 0.015), [[1.0, t] for t in t1s]),
        ("irt1", IRT1Model(TI), [[1.0, -1.9, t] for t in [0.3, 0.6, 0.9, 1.3, 2.0]]),
        ("irt1-tr", IRT1TRModel(TI, 4.0), [[1.0, t] for t in [0.3, 0.6, 0.9, 1.3, 2.0]]),
        ("mese-mono", MESEMonoModel([0.01 * k for k in range(1, 11)]),
         [[1.0, t] for t in [0.03, 0.05, 0.08, 0.12, 0.2]]),
        ("megre", MEGREModel([0.004 * k for k in range(1, 9)]),
         [[1.0, r] for r in [10.0, 20.0, 40.0, 70.0]]),
        ("mts", MTSModel([6.0, 6.0, 20.0], [0.028, 0.028, 0.018], [0, 1, 0]),
         [[1.0, t, m] for t, m in [(0.8, 0.04), (1.3, 0.02), (2.0, 0.01)]]),
        ("mp2rage", MP2RAGEModel([0.7, 2.5], [4.0, 5.0], 0.007, 5.0, 88, 88),
         [[1.0, t] for t in [0.8, 1.2, 1.6, 2.5]]),
    ]


def bench_simulation(n_rep: int, seed: int = 0) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for name, model, grid in simulation_cases():
        truth = torch.tensor(grid, dtype=F64)
        clean = model(truth)
        sigma = clean.abs().amax(-1) / 100.0  # SNR 100 of the brightest member
        var_crb = crb(model, truth, sigma)
        y = clean[:, None] + sigma[:, None, None] * torch.randn(
            (len(grid), n_rep, clean.shape[-1]), generator=gen, dtype=F64)
        fit = fit_nlls(model, y)
        # Rician (magnitude of complex Gaussian) noise, for the bias column only
        n2 = sigma[:, None, None] * torch.randn(y.shape, generator=gen, dtype=F64)
        y_ric = torch.sqrt(y**2 + n2**2) if name != "mp2rage" else y  # MP2RAGE GREs are signed
        fit_ric = fit_nlls(model, y_ric)
        for g in range(len(grid)):
            ok = fit.converged[g]
            for i, spec in enumerate(model.parameters):
                est = fit.params[g, ok, i]
                true = truth[g, i].item()
                rows.append({
                    "model": name, "truth": grid[g], "parameter": spec.name,
                    "nuisance": spec.nuisance, "true": true,
                    "bias_pct": 100 * (est.mean().item() - true) / true,
                    "bias_rician_pct": 100 * (fit_ric.params[g, :, i].nanmean().item() - true)
                    / true,
                    "efficiency": var_crb[g, i].item() / est.var().item(),
                    "cv_pct": 100 * est.std().item() / true,
                    "converged_pct": 100 * ok.double().mean().item(),
                })
    return rows


def _files(sub: str, suffix: str) -> list[Path]:
    files = (DS / f"sub-{sub}" / "anat").glob(f"sub-{sub}_*_{suffix}.nii.gz")
    return sorted(files, key=lambda p: [int(n) for n in
                                        re.findall(r"(?:inv|echo|flip)-(\d+)", p.name)] + [p.name])


def _kmeans2(values: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """Medians of a 2-class 1-D k-means (low class = WM, high class = GM for T1)."""
    c = np.percentile(values, [25, 75]).astype(float)
    for _ in range(iters):
        lab = np.abs(values[:, None] - c[None]).argmin(1)
        c = np.array([values[lab == k].mean() for k in (0, 1)])
    lab = np.abs(values[:, None] - c[None]).argmin(1)
    return float(np.median(values[lab == 0])), float(np.median(values[lab == 1]))


# Literature ranges [s] spanning 1.5–3 T (e.g. Stikov MRM 2015; Wansapura JMRI 1999).
LIT_T1 = {"WM": (0.6, 1.1), "GM": (1.0, 1.8)}


def _nlls(collection):
    """The pipeline's NLLS maps of a collection: (values by estimate name, mask, MapSet)."""
    result = map_collection(collection, plan_collection(collection, estimators=("nlls",)))
    (mapset,) = result.mapsets
    return mapset.values, result.mask, mapset


def bench_real() -> dict:
    out: dict = {}
    ref_dir = DS / "derivatives" / "reference" / "sub-phantom01" / "anat"
    seg = np.asarray(nib.load(str(ref_dir / "sub-phantom01_desc-spheres_dseg.nii.gz")).dataobj)
    rows = list(csv.DictReader((ref_dir / "sub-phantom01_desc-spheres_dseg.tsv").open(),
                               delimiter="\t"))
    coll = collection_from_paths(_files("phantom01", "IRT1"), "IRT1")
    loaded = load_collection_data(coll)
    spheres = []
    tr_aware = loaded.model  # the phantom's sidecars give RepetitionTime: the TR-aware model
    barral = IRT1Model(tr_aware.inversion_time)
    for label, model in (("irt1-tr (default with TR)", tr_aware), ("irt1 (Barral)", barral)):
        fit = fit_nlls(model, torch.as_tensor(loaded.data), mask=torch.as_tensor(seg > 0))
        t1 = fit.params[..., -1].numpy()
        for r in rows:
            if r["measurable"] != "true":
                continue
            med = float(np.median(t1[seg == int(r["label"])]) * 1000)
            ref = float(r["matched_reference_T1_v2_ms"])
            spheres.append({"model": label, "sphere": int(r["nist_sphere"]),
                            "T1_ms": med, "ref_v2_ms": ref, "err_pct": 100 * (med / ref - 1),
                            "within_10pct": abs(med / ref - 1) < 0.10})
    out["phantom_spheres"] = spheres

    brain = []

    def tissue(name: str, t1_map: np.ndarray, mask: np.ndarray, extra: dict | None = None):
        v = t1_map[mask & np.isfinite(t1_map)]
        v = v[(v > 0.3) & (v < 2.5)]  # tissue range: drops CSF and fit failures before k-means
        wm, gm = _kmeans2(v)
        row = {"data": name, "WM_T1_s": wm, "GM_T1_s": gm,
               "WM_in_range": LIT_T1["WM"][0] <= wm <= LIT_T1["WM"][1],
               "GM_in_range": LIT_T1["GM"][0] <= gm <= LIT_T1["GM"][1]}
        row.update(extra or {})
        brain.append(row)
        return v, wm, gm

    values, mask, _ = _nlls(collection_from_paths(_files("brain03", "IRT1"), "IRT1"))
    tissue("sub-brain03 IR (Barral, polarity restored)", values["T1"], mask)
    b1 = DS / "sub-brain02" / "fmap" / "sub-brain02_TB1map.nii.gz"
    values, mask, _ = _nlls(collection_from_paths(_files("brain02", "VFA"), "VFA", b1map=b1))
    tissue("sub-brain02 VFA 3/20° + B1", values["T1"], mask)
    values, mask, _ = _nlls(collection_from_paths(_files("brain02", "VFA"), "VFA"))
    tissue("sub-brain02 VFA 3/20° without B1", values["T1"], mask)
    mts_coll = collection_from_paths(_files("brain01", "MTS"), "MTS")
    values, mask, _ = _nlls(mts_coll)
    tissue("sub-brain01 two-angle SPGR (TR 28/18 ms, exact)", values["T1"], mask)
    loaded = load_collection_data(mts_coll)
    helms = {k: np.where(mask, v.numpy(), np.nan)
             for k, v in loaded.model.maps(torch.as_tensor(loaded.data)).items()}
    t1h = helms["T1"]
    _, wm, gm = tissue("sub-brain01 two-angle (Helms small-angle)", t1h, mask)
    # MTsat in the WM/GM classes of the Helms T1 map
    thr = (wm + gm) / 2
    inside = mask & np.isfinite(t1h) & (t1h > 0.3) & (t1h < 2.5)
    mts = helms["MTsat"]
    out["mtsat_pu"] = {"WM": float(100 * np.median(mts[inside & (t1h < thr)])),
                       "GM": float(100 * np.median(mts[inside & (t1h >= thr)]))}
    out["brain_t1"] = brain

    values, mask, mapset = _nlls(collection_from_paths(_files("kidney01", "MESE"), "MESE"))
    t2 = values["T2"][mask]
    out["kidney_t2"] = {"median_T2_ms": float(1000 * np.nanmedian(t2)),
                        "iqr_ms": [float(1000 * q) for q in np.nanpercentile(t2, [25, 75])],
                        "n_voxels": int(mask.sum()),
                        "converged_pct": float(100 * mapset.diagnostics["converged"][mask].mean())}
    return out


def bench_speed(n_vox: int) -> list[dict]:
    torch.set_num_threads(2)
    rows = []
    gen = torch.Generator().manual_seed(1)
    for name, model, grid in simulation_cases():
        truth = torch.tensor(grid, dtype=F64)
        reps = math.ceil(n_vox / len(grid))
        clean = model(truth)[:, None].expand(-1, reps, -1).reshape(-1, model(truth).shape[-1])
        sigma = clean.abs().amax(-1, keepdim=True) / 100
        y = clean + sigma * torch.randn(clean.shape, generator=gen, dtype=F64)
        for dtype in (torch.float64, torch.float32):
            yy = y.to(dtype)
            fit_nlls(model, yy[:64])  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            fit = fit_nlls(model, yy)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            # Wall time suffers from other jobs on a shared machine; CPU time does less.
            rows.append({"model": name, "dtype": str(dtype).replace("torch.", ""),
                         "voxels": yy.shape[0], "seconds": dt, "voxels_per_s": yy.shape[0] / dt,
                         "cpu_seconds": dc, "voxels_per_cpu_s": yy.shape[0] / dc,
                         "mean_iterations": fit.n_iterations.double().mean().item()})
    return rows


def _md(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        body += "| " + " | ".join(format(r[c[0]], c[2]) if c[2] else str(r[c[0]])
                                  for c in cols) + " |\n"
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions/voxels (smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    sim = bench_simulation(200 if args.quick else 1000)
    real = bench_real() if (DS / "dataset_description.json").is_file() else None
    speed = bench_speed(2000 if args.quick else 20000)
    res = {"simulation": sim, "real": real, "speed": speed,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "seconds": time.time() - t0}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1, default=float))

    print("## (a) Simulation, SNR 100 (Gaussian noise), NLLS vs CRB\n")
    main_rows = [r for r in sim if not r["nuisance"]]
    for r in main_rows:
        r["truth_s"] = ", ".join(f"{v:g}" for v in r["truth"])
    print(_md(main_rows, [("model", "model", ""), ("truth_s", "truth", ""),
                          ("parameter", "param", ""), ("bias_pct", "bias %", "+.3f"),
                          ("efficiency", "CRB/var", ".3f"), ("cv_pct", "CV %", ".2f"),
                          ("bias_rician_pct", "bias % (Rician)", "+.3f"),
                          ("converged_pct", "conv %", ".1f")]))
    worst_b = max(abs(r["bias_pct"]) for r in main_rows)
    worst_e = min(r["efficiency"] for r in main_rows)
    print(f"worst |bias| {worst_b:.3f} % (target < 1 %), lowest efficiency {worst_e:.3f} "
          "(target ≥ 0.8)\n")
    if real:
        print("## (b) Real data\n\nsub-phantom01 IR T1 per sphere (18 TIs; inv-19 excluded) vs "
              "reference v2:\n")
        print(_md(real["phantom_spheres"], [("model", "model", ""), ("sphere", "NIST sphere", ""),
                                            ("T1_ms", "T1 ms", ".1f"),
                                            ("ref_v2_ms", "ref v2 ms", ".1f"),
                                            ("err_pct", "error %", "+.1f"),
                                            ("within_10pct", "within 10 %", "")]))
        print("Brain WM/GM T1 (2-class k-means on T1 in 0.3–2.5 s inside the object; literature "
              f"WM {LIT_T1['WM']} s, GM {LIT_T1['GM']} s):\n")
        print(_md(real["brain_t1"], [("data", "data", ""), ("WM_T1_s", "WM T1 s", ".3f"),
                                     ("GM_T1_s", "GM T1 s", ".3f"), ("WM_in_range", "WM ok", ""),
                                     ("GM_in_range", "GM ok", "")]))
        print(f"sub-brain01 MTsat (p.u.): WM {real['mtsat_pu']['WM']:.2f}, GM "
              f"{real['mtsat_pu']['GM']:.2f}\n")
        k = real["kidney_t2"]
        print(f"sub-kidney01 mono-exponential T2 inside the object: median {k['median_T2_ms']:.1f} "
              f"ms (IQR {k['iqr_ms'][0]:.1f}–{k['iqr_ms'][1]:.1f}), {k['n_voxels']} voxels, "
              f"{k['converged_pct']:.1f} % converged\n")
    print("## (c) NLLS speed (CPU, 2 threads)\n")
    print(_md(speed, [("model", "model", ""), ("dtype", "dtype", ""), ("voxels", "voxels", "d"),
                      ("voxels_per_s", "voxels/s (wall)", ".0f"),
                      ("voxels_per_cpu_s", "voxels/CPU-s", ".0f"),
                      ("mean_iterations", "mean iter", ".1f")]))
    print(f"total {res['seconds']:.0f} s; JSON: {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
