"""MTsat B1 correction (Helms 2008 + Weiskopf 2013) on simulated MTS data with varying B1.

    python benchmarks/qmri/bench_mtsat_b1.py [--quick]

Protocol: ds-real sub-brain01's (PDw 6 deg TR 28 ms, MTw 6 deg TR 28 ms, T1w 20 deg TR 18 ms),
so the shipped network of its mt-off pair applies. Tissue: WM-like (T1 0.85 s, MTsat 3 p.u.) and
GM-like (T1 1.4 s, MTsat 1.5 p.u.); relative B1+ 0.8-1.2; Rician noise at SNR 100 (PDw WM).

The MT saturation follows the empirical model of Weiskopf et al. 2013: the MTsat computed with
nominal flip angles is MTsat0 (1 - 0.4 B1) / 0.6, i.e. the per-TR saturation of the signal is
delta = B1^2 MTsat0 (1 - 0.4 B1) / 0.6 (Helms' small-angle relation). Signals are exact SPGR:
mt-off S = M0 sin(a)(1 - E1)/(1 - E1 cos(a)), MTw the same with the longitudinal magnetisation
saturated by delta before each excitation, S = M0 sin(a)(1 - E1)/(1 - (1 - delta) E1 cos(a)).

MTsat is mapped (NLLS and the network, via ``qmri_bids.qmri.mapping``) three ways: without the
B1 map; with it but only the flip angles corrected (delta_B1, the MT pulse's dependence left);
with it and the Weiskopf correction (the pipeline's MTsat). B1 dependence: the slope of MTsat
against B1 (linear fit over all voxels of a tissue, % of the tissue's true MTsat per unit B1)
and the spread of the per-B1 medians over 0.8-1.2 (max - min, % of the true MTsat).

Writes ``benchmarks/qmri/results/mtsat_b1.json`` and ``mtsat_b1.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from qmri_bids.bids.discovery import Collection, Member
from qmri_bids.qmri.mapping import map_collection
from qmri_bids.qmri.models.mts import WEISKOPF_LAMBDA, MTSModel
from qmri_bids.qmri.plan import plan_collection

RESULTS = Path(__file__).resolve().parent / "results"
FLIPS, TRS, MT_ON = (6.0, 6.0, 20.0), (0.028, 0.028, 0.018), (False, True, False)
TISSUES = {"WM": (0.85, 0.03), "GM": (1.4, 0.015)}  # T1 s, MTsat0 (fraction)
SNR = 100.0


def simulate(n_b1: int, n_rep: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Data [B1, tissue x rep, 1, 3], B1 map, tissue labels (0 WM, 1 GM), noise sigma."""
    kappa = np.linspace(0.8, 1.2, n_b1)[:, None].repeat(2 * n_rep, 1)
    tissue = np.repeat([0, 1], n_rep)[None].repeat(n_b1, 0)
    t1 = np.array([TISSUES["WM"][0], TISSUES["GM"][0]])[tissue]
    mtsat0 = np.array([TISSUES["WM"][1], TISSUES["GM"][1]])[tissue]
    lam = WEISKOPF_LAMBDA
    delta = kappa**2 * mtsat0 * (1 - lam * kappa) / (1 - lam)
    m0 = 3000.0
    signals = []
    for fa, tr, on in zip(FLIPS, TRS, MT_ON, strict=True):
        alpha = np.deg2rad(fa) * kappa
        e1 = np.exp(-tr / t1)
        keep = (1 - delta) if on else 1.0
        signals.append(m0 * np.sin(alpha) * (1 - e1) / (1 - keep * e1 * np.cos(alpha)))
    clean = np.stack(signals, -1)[:, :, None, :]
    sigma = float(np.median(clean[..., 0][tissue[..., None] == 0])) / SNR
    noisy = np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))
    return noisy, kappa[:, :, None], tissue[:, :, None], sigma


def _collection(folder: Path, data: np.ndarray, b1: np.ndarray | None) -> Collection:
    members = []
    for i, (fa, tr, on) in enumerate(zip(FLIPS, TRS, MT_ON, strict=True)):
        flip, mt = (1 if fa == 6.0 else 2), ("on" if on else "off")
        path = folder / f"sub-sim_flip-{flip}_mt-{mt}_MTS.nii.gz"
        nib.save(nib.Nifti1Image(data[..., i].astype(np.float32), np.eye(4)), path)
        members.append(Member(path, {"flip": str(flip), "mt": mt},
                              {"FlipAngle": fa, "MTState": on, "RepetitionTimeExcitation": tr}))
    b1map = None
    if b1 is not None:
        b1map = folder / "sub-sim_TB1map.nii.gz"
        nib.save(nib.Nifti1Image(b1.astype(np.float32), np.eye(4)), b1map)
    return Collection("MTS", "sim", None, {}, members, b1map)


def dependence(mtsat_pu: np.ndarray, kappa: np.ndarray, tissue: np.ndarray) -> dict:
    out = {}
    for label, name in enumerate(TISSUES):
        sel = (tissue == label) & np.isfinite(mtsat_pu)
        truth = 100 * TISSUES[name][1]
        slope = np.polyfit(kappa[sel], mtsat_pu[sel], 1)[0]
        medians = [np.median(mtsat_pu[sel & (kappa == k)]) for k in np.unique(kappa[sel])]
        out[name] = {"slope_pct_per_B1": float(100 * slope / truth),
                     "spread_pct": float(100 * np.ptp(medians) / truth),
                     "median_err_pct": float(100 * (np.median(mtsat_pu[sel]) / truth - 1))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    n_b1, n_rep = (9, 200) if args.quick else (17, 1000)
    data, kappa, tissue, sigma = simulate(n_b1, n_rep, np.random.default_rng(0))
    model = MTSModel(FLIPS, TRS, MT_ON)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for estimator in ("nlls", "nn"):
            for with_b1 in (False, True):
                folder = Path(tmp) / f"{estimator}{int(with_b1)}"
                folder.mkdir()
                collection = _collection(folder, data, kappa if with_b1 else None)
                plan = plan_collection(collection, estimators=(estimator,))
                result = map_collection(collection, plan, receive_method="none",
                                        mask=np.ones(kappa.shape, dtype=bool))
                values = result.mapsets[0].values
                variants = {"pipeline": values["MTsat"]}
                if with_b1:
                    # the flip angles corrected, the MT pulse's B1 dependence left in
                    variants["flip angles only"] = 100 * model.mtsat(
                        torch.as_tensor(data[..., 1]), torch.as_tensor(values["M0"]),
                        torch.as_tensor(values["T1"]), torch.as_tensor(kappa)).numpy()
                for variant, mtsat in variants.items():
                    label = ("no B1 map" if not with_b1 else
                             "B1: flip angles + Weiskopf" if variant == "pipeline" else
                             "B1: flip angles only")
                    row = {"estimator": result.mapsets[0].estimator, "correction": label,
                           **dependence(mtsat, kappa, tissue)}
                    rows.append(row)
                    print(f"{row['estimator']:4s} {label:28s} WM slope "
                          f"{row['WM']['slope_pct_per_B1']:+7.1f} %/B1, spread "
                          f"{row['WM']['spread_pct']:5.1f} % | GM slope "
                          f"{row['GM']['slope_pct_per_B1']:+7.1f} %/B1, spread "
                          f"{row['GM']['spread_pct']:5.1f} %", flush=True)
    out = {"protocol": {"FlipAngle": FLIPS, "RepetitionTimeExcitation": TRS, "MTState": MT_ON},
           "tissues": TISSUES, "lambda": WEISKOPF_LAMBDA, "snr": SNR, "sigma": sigma,
           "b1": [float(k) for k in np.unique(kappa)], "voxels_per_b1_and_tissue": n_rep,
           "seconds": time.perf_counter() - t0, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mtsat_b1.json").write_text(json.dumps(out, indent=1))
    header = ("| estimator | MTsat | WM slope (%/unit B1) | WM spread 0.8-1.2 | GM slope | "
              "GM spread | WM / GM median error |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['correction']} | "
                     f"{r['WM']['slope_pct_per_B1']:+.1f} | {r['WM']['spread_pct']:.1f} % | "
                     f"{r['GM']['slope_pct_per_B1']:+.1f} | {r['GM']['spread_pct']:.1f} % | "
                     f"{r['WM']['median_err_pct']:+.1f} / {r['GM']['median_err_pct']:+.1f} % |")
    (RESULTS / "mtsat_b1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
