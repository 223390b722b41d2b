"""MRF dictionary-matching benchmark (CPU, 2 threads).

1. Accuracy vs grid spacing: random tissues (T1 log-uniform 0.1-3 s, T2 log-uniform 10-1000 ms,
   T2 <= 0.8 T1, complex M0 of random phase) simulated with the default FISP-MRF schedule, matched
   noise-free and at SNR 100, for geometric grids of relative step 2/5/10/20 %. Reports the median
   and 90th percentile of |relative error| of T1 and T2, dictionary size, SVD rank, build time.
2. Speed: voxels/s of matching (projection + search) on the 5 % grid, torch.set_num_threads(2);
   dictionaries are simulated with 1 thread (see :func:`build`), their build time is reported.
3. NIST phantom: the measured 3 T T1/T2 maps of the NIST MnCl2 array (two sites, seconds; see
   /work/shared/data/reference/README.md) are the ground truth of a simulated MRF acquisition
   (M0 = 1 with a linear phase ramp, SNR 100), matched on the 5 % and 2 % grids; per-sphere
   median of the
   matched maps vs the median of the truth maps, plus the CRB-predicted relative std at SNR 100.

SNR is defined as the RMS of the noise-free signal over time divided by the noise standard
deviation per real channel. Writes ``benchmarks/qmri/results/mrf.json``.

Run: ``python benchmarks/qmri/bench_mrf.py [--quick]`` (a few minutes on 2 cores; ``--quick``
uses fewer voxels and only the 5/10/20 % grids).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from qmri_bids.qmri.crb import model_jacobian
from qmri_bids.qmri.dictionary import DictionaryMatcher, default_mrf_grid
from qmri_bids.qmri.models.mrf import MRFModel

OUT = Path(__file__).resolve().parent / "results" / "mrf.json"
REF = Path(os.environ.get("QMRI_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared"
                          / "data")) / "reference"
SNR = 100.0
GRID_T1 = (0.05, 4.0)
GRID_T2 = (0.005, 2.0)
MATCH_THREADS = 2


def add_noise(signal: torch.Tensor, snr: float, gen: torch.Generator) -> torch.Tensor:
    """Complex Gaussian noise with sigma = RMS(signal over time) / snr per real channel."""
    rms = signal.abs().pow(2).mean(-1, keepdim=True).sqrt()
    noise = torch.randn(signal.shape, dtype=signal.dtype, generator=gen)  # unit variance complex
    return signal + (rms / snr) * noise * np.sqrt(2.0)  # randn complex: var 1/2 per channel


def random_tissues(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t1 = np.exp(rng.uniform(np.log(0.1), np.log(3.0), n))
    t2 = np.minimum(np.exp(rng.uniform(np.log(0.01), np.log(1.0), n)), 0.8 * t1)
    m0 = np.exp(1j * rng.uniform(-np.pi, np.pi, n)) * rng.uniform(0.5, 1.5, n)
    return torch.as_tensor(np.stack([m0.real, m0.imag, t1, t2, np.ones(n)], -1))


def rel_err_stats(est: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    e = ((est.double() - true) / true).abs().numpy()
    return {"median": float(np.median(e)), "p90": float(np.percentile(e, 90)),
            "max": float(e.max())}


def crb_relative_std(model: MRFModel, params: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(CRB)/value for T1, T2: forward-mode Jacobian (5 tangents, cheaper than reverse for
    1000 real outputs), Fisher = J^T J / sigma^2."""
    _, jac = model_jacobian(model, params, mode="fwd")
    fim = jac.transpose(-1, -2) @ jac / sigma[..., None, None] ** 2
    var = torch.linalg.inv(fim).diagonal(dim1=-2, dim2=-1)
    return var[..., 2:4].sqrt() / params[..., 2:4]


def build(model: MRFModel, step: float) -> DictionaryMatcher:
    """Dictionary on the ``step`` grid, simulated with ONE intra-op thread: the EPG loop issues
    many small ops, and on a shared, loaded 2-core machine OpenMP synchronisation made 2 threads
    ~30x slower than 1 (measured). Matching (large matmuls) then runs with 2 threads."""
    torch.set_num_threads(1)
    try:
        grid = default_mrf_grid(rel_step=step, t1_range=GRID_T1, t2_range=GRID_T2)
        return DictionaryMatcher(model, grid, atom_chunk=4096)
    finally:
        torch.set_num_threads(MATCH_THREADS)


def grid_study(
    model: MRFModel, steps: list[float], n_vox: int
) -> tuple[list[dict], dict[float, DictionaryMatcher]]:
    params = random_tissues(n_vox, seed=1)
    clean = model(params)
    noisy = add_noise(clean, SNR, torch.Generator().manual_seed(2))
    rows = []
    matchers = {}
    for step in steps:
        matcher = matchers[step] = build(model, step)
        row = {"rel_step": step, **{k: matcher.info[k] for k in
                                     ("n_atoms", "n_components", "energy_retained",
                                      "build_seconds")}}
        for label, data in (("noise_free", clean), ("snr100", noisy)):
            t0 = time.perf_counter()
            fit = matcher.match(data)
            dt = time.perf_counter() - t0
            row[label] = {"T1_rel_err": rel_err_stats(fit["T1"], params[:, 2]),
                          "T2_rel_err": rel_err_stats(fit["T2"], params[:, 3]),
                          "match_voxels_per_s": n_vox / dt}
        rows.append(row)
        print(f"grid {step:.0%}: {row['n_atoms']} atoms, K={row['n_components']}, "
              f"build {row['build_seconds']:.1f}s, SNR100 T1 med "
              f"{row['snr100']['T1_rel_err']['median']:.4f}, T2 med "
              f"{row['snr100']['T2_rel_err']['median']:.4f}", flush=True)
    return rows, matchers


def speed(model: MRFModel, matcher: DictionaryMatcher, n_vox: int) -> dict:
    base = model(random_tissues(512, seed=3)).to(torch.complex64)
    data = base.repeat(n_vox // 512 + 1, 1)[:n_vox]
    out = {"grid_rel_step": matcher.grid.describe()["T1"]["relative_step"],
           "n_atoms": matcher.n_atoms, "n_components": matcher.n_components, "n_voxels": n_vox,
           "dictionary_build_seconds_1thread": matcher.build_seconds,
           "dictionary_atoms_per_s_1thread": matcher.n_atoms / matcher.build_seconds}
    # 2 threads as specified; 1 thread too, because on a shared, loaded machine OpenMP
    # synchronisation can make 2 threads slower than 1
    for threads in (MATCH_THREADS, 1):
        torch.set_num_threads(threads)
        matcher.match(data[:1024])  # warm-up
        t0 = time.perf_counter()
        matcher.match(data)
        dt = time.perf_counter() - t0
        out[f"threads_{threads}"] = {"seconds": dt, "voxels_per_s": n_vox / dt}
    torch.set_num_threads(MATCH_THREADS)
    out["voxels_per_s"] = out[f"threads_{MATCH_THREADS}"]["voxels_per_s"]
    return out


def nist(model: MRFModel, matcher: DictionaryMatcher) -> dict:
    out = {"grid": matcher.info["grid"], "n_atoms": matcher.n_atoms, "sites": {}}
    for site in ("freiburg", "wuerzburg"):
        stem = REF / f"nist_mncl2_3p0T_{site}"
        t1 = np.asarray(nib.load(f"{stem}_T1map.nii.gz").dataobj, dtype=np.float64)
        t2 = np.asarray(nib.load(f"{stem}_T2map.nii.gz").dataobj, dtype=np.float64)
        seg = np.asarray(nib.load(f"{stem}_dseg.nii.gz").dataobj).astype(int)
        sel = seg > 0
        # truth within the spheres, clipped to the dictionary's range (documented in the JSON)
        t1v = np.clip(t1[sel], *GRID_T1)
        t2v = np.clip(np.minimum(t2[sel], t1v), *GRID_T2)
        n_clipped = int(np.sum((t1v != t1[sel]) | (t2v != t2[sel])))
        ramp = np.linspace(-1.0, 1.0, sel.sum())  # smooth receiver phase (radians)
        params = torch.as_tensor(np.stack([np.cos(ramp), np.sin(ramp), t1v, t2v,
                                           np.ones_like(t1v)], -1))
        clean = model(params)
        noisy = add_noise(clean, SNR, torch.Generator().manual_seed(4))
        t0 = time.perf_counter()
        fit = matcher.match(noisy)
        dt = time.perf_counter() - t0
        labels = seg[sel]
        sphere_params = []
        spheres = []
        for s in range(1, 15):
            m = labels == s
            tr1, tr2 = np.median(t1v[m]), np.median(t2v[m])
            e1 = np.median(fit["T1"].numpy()[m])
            e2 = np.median(fit["T2"].numpy()[m])
            vox1 = np.abs(fit["T1"].numpy()[m] / t1v[m] - 1)
            vox2 = np.abs(fit["T2"].numpy()[m] / t2v[m] - 1)
            spheres.append({
                "sphere": s, "n_voxels": int(m.sum()),
                "T1_true_median_s": float(tr1), "T2_true_median_s": float(tr2),
                "T1_matched_median_s": float(e1), "T2_matched_median_s": float(e2),
                "T1_rel_err_of_median": float(e1 / tr1 - 1),
                "T2_rel_err_of_median": float(e2 / tr2 - 1),
                "T1_voxel_abs_rel_err_median": float(np.median(vox1)),
                "T2_voxel_abs_rel_err_median": float(np.median(vox2)),
            })
            sphere_params.append([1.0, 0.0, tr1, tr2, 1.0])
        sp = torch.as_tensor(sphere_params)
        sig = model(sp)
        sigma = sig.abs().pow(2).mean(-1).sqrt() / SNR
        crb_rel = crb_relative_std(model, sp, sigma)
        for row, c in zip(spheres, crb_rel, strict=True):
            row["T1_crb_rel_std"] = float(c[0])
            row["T2_crb_rel_std"] = float(c[1])
        out["sites"][site] = {"n_voxels": int(sel.sum()), "n_clipped_to_grid": n_clipped,
                              "match_seconds": dt, "spheres": spheres}
        worst1 = max(abs(r["T1_rel_err_of_median"]) for r in spheres)
        worst2 = max(abs(r["T2_rel_err_of_median"]) for r in spheres)
        step = matcher.info["grid"]["T1"]["relative_step"]
        print(f"NIST 3T {site} (grid {step:.2f}): worst sphere |rel err| of median "
              f"T1 {worst1:.4f}, "
              f"T2 {worst2:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(MATCH_THREADS)
    model = MRFModel()
    steps = [0.05, 0.1, 0.2] if args.quick else [0.02, 0.05, 0.1, 0.2]
    t0 = time.perf_counter()
    results = {
        "benchmark": "mrf_dictionary_matching",
        "schedule": {"n_timepoints": model.n_timepoints, "n_states": model.n_states,
                     "inversion_time_s": model.schedule.inversion_time,
                     "flip_angle_deg_range": [float(model.schedule.flip_angle_deg.min()),
                                              float(model.schedule.flip_angle_deg.max())],
                     "tr_s_range": [float(model.schedule.tr.min()),
                                    float(model.schedule.tr.max())]},
        "snr": SNR,
        "snr_definition": "RMS of the noise-free signal over time / noise std per real channel",
        "threads": torch.get_num_threads(),
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "load_avg_at_start": list(os.getloadavg())},
        "torch": torch.__version__,
    }
    results["grid_spacing"], matchers = grid_study(model, steps, 300 if args.quick else 1000)
    results["speed"] = speed(model, matchers[0.05], 5_000 if args.quick else 20_000)
    print(f"speed: {results['speed']['voxels_per_s']:.0f} voxels/s (2 threads), "
          f"{results['speed']['threads_1']['voxels_per_s']:.0f} (1 thread)", flush=True)
    if (REF / "nist_mncl2_3p0T_freiburg_T1map.nii.gz").is_file():
        results["nist_3T"] = {f"grid_{round(st * 100)}pct": nist(model, matchers[st])
                              for st in steps if st <= 0.05}
    else:
        results["nist_3T"] = {"skipped": f"reference maps not found in {REF}"}
    results["host"]["load_avg_at_end"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - t0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
