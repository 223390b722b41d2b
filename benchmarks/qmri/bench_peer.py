"""This project's network and NLLS against a peer tool, ukat (per-voxel curve fitting), in one run.

    benchmarks/qmri/scratch/venv/bin/python benchmarks/qmri/bench_peer.py [--quick]

ukat (UKRIN Kidney Analysis Toolbox, https://github.com/UKRIN-MAPS/ukat, GPL-3.0) is what Python
users of renal/brain relaxometry pick for T1/T2 maps: ``ukat.mapping.t1.T1`` and
``ukat.mapping.t2.T2`` fit every voxel with ``scipy.optimize.curve_fit``. It is never a
dependency of qmri-bids: it lives in a benchmark-only virtual environment (git-ignored),

    python -m venv --system-site-packages benchmarks/qmri/scratch/venv
    benchmarks/qmri/scratch/venv/bin/pip install --no-deps ukat==0.7.3
    benchmarks/qmri/scratch/venv/bin/pip install pathos tqdm scikit-learn

(``--system-site-packages`` gives it this project and its torch; ``--no-deps`` keeps ukat's pins
(scipy < 1.12, tensorflow-based segmentation...) out; the three packages are what its T1/T2
fitting imports). ukat's package ``__init__`` imports every submodule (segmentation needs
``renalsegmentor``, diffusion ``dipy``), so only ``ukat.mapping.t1``/``t2`` and their fitting
module are loaded here, under a bare parent package. No ukat code is copied.

Data (ds-real; the same preprocessed voxels for every method, from this project's loader:
Philips scaling undone, the phantom's inv-19 excluded for its other EchoTime):

* sub-phantom01 IR (NIST T1 array, 18 TIs, TR 6 s): median T1 per measurable sphere against the
  version-2 reference (``derivatives/reference``); ukat with 2 parameters
  (|M0 (1 - 2 e^(-TI/T1))|) and 3 (|M0 (1 - eff e^(-TI/T1))|); this project's TR-aware IR model.
* sub-kidney01 MESE (10 echoes, TE 12.9-129 ms): the pipeline fits its CPMG train with the EPG
  model (B1 estimated); ukat and a mono-exponential NLLS fit S0 e^(-TE/T2). No reference exists,
  so (a) median T2 of a fixed random 10 000 of the object's 41 506 voxels and agreement with the
  mono-exponential NLLS, and (b) accuracy on
  signals simulated with the kidney's protocol and measured SNR (T2 log-uniform 30-200 ms,
  Rician noise).
* the same simulation for the phantom's IR protocol (T1 log-uniform 0.1-2.5 s) at its SNR.

Speed: voxels/s (wall clock) on the object's voxels; torch on 2 threads; ukat single-process
(``multithread=False``) and on all cores (``multithread=True``, pathos, 2 processes here). The
network is timed alone (inference) and as this pipeline's primary step (inference, validation at
the data's noise level, NLLS refit of the voxels it flags, NLLS for all voxels when the network
fails the validation, as ``qmri_bids.qmri.mapping`` does).

Writes ``benchmarks/qmri/results/peer.json`` and ``peer.md``.
"""

from __future__ import annotations

import os

# ukat's progress bars off: tqdm reads TQDM_DISABLE when it is first imported
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import csv
import importlib
import importlib.util
import json
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parents[1]
DS = Path(os.environ.get("QMRI_SHARED_DATA", REPO.parent / "shared" / "data")) / "ds-real"
UKAT_VERSION = "0.7.3"
KIDNEY_VOXELS = 10000
VENV_HELP = ("ukat is not importable: run this script with the benchmark venv's Python "
             "(see the module docstring for its three setup commands)")


def import_ukat() -> tuple[types.ModuleType, types.ModuleType, str]:
    """``ukat.mapping.t1`` and ``t2`` without ukat's package ``__init__`` (see the docstring)."""
    spec = importlib.util.find_spec("ukat")
    if spec is None or spec.origin is None:
        raise SystemExit(VENV_HELP)
    root = Path(spec.origin).parent
    for name, folder in (("ukat", root), ("ukat.mapping", root / "mapping")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(name, package)
    from importlib.metadata import version

    return (importlib.import_module("ukat.mapping.t1"), importlib.import_module("ukat.mapping.t2"),
            version("ukat"))


@contextlib.contextmanager
def quiet():
    """ukat's warnings (negative values in magnitude data...) off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


# --------------------------------------------------------------------------- methods
# Each method maps voxels [N, n] (the object's voxels) to the parameter of interest [N] in s.


def project_methods(collection_model, sigma: float | None, parameter: str) -> dict:
    """The pipeline's estimators of a collection: its network and NLLS on the model the
    pipeline fits (``estimation_model``: for a CPMG train the EPG model, B1 estimated), and, where
    that is not the collection's own model, NLLS of the collection's model too (the
    mono-exponential one ukat's 2p_exp also fits)."""
    from qmri_bids.qmri.estimators import FitContext, NetworkEstimator, NllsEstimator
    from qmri_bids.qmri.model_store import load_estimator, locate_estimator
    from qmri_bids.qmri.predict import estimate_maps

    model = collection_model.estimation_model()
    plan = locate_estimator(model)
    if plan.weights is None:
        raise SystemExit(f"no shipped network for the {model.name} protocol "
                         f"{model.to_protocol()}: this benchmark compares shipped estimators")
    net, _ = load_estimator(plan.weights, model)
    context = FitContext(weights=plan.weights)

    def grid(voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return voxels[:, None, None, :], np.ones((voxels.shape[0], 1, 1), dtype=bool)

    def network(voxels: np.ndarray) -> np.ndarray:
        data, mask = grid(voxels)
        return estimate_maps(net, data, mask=mask)[parameter].reshape(-1)

    def pipeline(voxels: np.ndarray) -> np.ndarray:
        """What mapping makes the primary maps: the network's, with its flagged voxels
        refitted, or NLLS's when the network fails its validation at the data's SNR."""
        data, mask = grid(voxels)
        fit = NetworkEstimator(context).fit(model, data, mask=mask, b1=None, noise=sigma)
        if fit.passed_validation is False:
            fit = NllsEstimator(context).fit(model, data, mask=mask, b1=None, noise=sigma)
        return fit.values[parameter].reshape(-1)

    def nlls_of(fitted):
        def nlls(voxels: np.ndarray) -> np.ndarray:
            data, mask = grid(voxels)
            fit = NllsEstimator(context).fit(fitted, data, mask=mask, b1=None, noise=sigma)
            return fit.values[parameter].reshape(-1)
        return nlls

    methods = {f"qmri-bids network ({plan.stem}, inference)": network,
               "qmri-bids primary (validated network, refits; NLLS if it fails)": pipeline,
               f"qmri-bids NLLS ({model.name})": nlls_of(model)}
    if model is not collection_model:
        methods[f"qmri-bids NLLS ({collection_model.name})"] = nlls_of(collection_model)
    return methods


def ukat_t1_methods(t1_module, inversion_times_s: np.ndarray) -> dict:
    ti_ms = 1000.0 * np.asarray(inversion_times_s, dtype=np.float64)  # ukat wants arrays, ms

    def make(parameters: int, multithread: bool):
        def run(voxels: np.ndarray) -> np.ndarray:
            with quiet():
                fit = t1_module.T1(voxels, ti_ms, np.eye(4), tss=0, tss_axis=None,
                                   parameters=parameters, multithread=multithread)
            t1 = fit.t1_map.reshape(-1) / 1000.0
            return np.where(t1 > 0, t1, np.nan)  # ukat writes 0 where a fit hit its bounds
        return run

    return {f"ukat T1 {p}-parameter ({'all cores' if mt else '1 process'})": make(p, mt)
            for p in (2, 3) for mt in (False, True)}


def ukat_t2_methods(t2_module, echo_times_s: np.ndarray) -> dict:
    te_ms = 1000.0 * np.asarray(echo_times_s, dtype=np.float64)

    def make(method: str, multithread: bool):
        def run(voxels: np.ndarray) -> np.ndarray:
            with quiet():
                fit = t2_module.T2(voxels, te_ms, np.eye(4), method=method,
                                   multithread=multithread)
            t2 = fit.t2_map.reshape(-1) / 1000.0
            return np.where(t2 > 0, t2, np.nan)
        return run

    # 3p_exp on one process only: its all-core run costs as much and adds no information
    return {f"ukat T2 {m} ({'all cores' if mt else '1 process'})": make(m, mt)
            for m, mt in (("2p_exp", False), ("2p_exp", True), ("3p_exp", False))}


# --------------------------------------------------------------------------- data


def load(sub: str, suffix: str):
    from qmri_bids.qmri.predict import noise_sigma_from_background
    from qmri_bids.qmri.protocols import (
        collection_from_paths,
        foreground_mask,
        load_collection_data,
    )

    paths = sorted((DS / f"sub-{sub}" / "anat").glob(f"sub-{sub}_*_{suffix}.nii.gz"))
    loaded = load_collection_data(collection_from_paths(paths, suffix))
    mask = foreground_mask(loaded.data)
    sigma = noise_sigma_from_background(loaded.data, mask)
    return loaded, mask, sigma


def simulate(model, parameter_values: np.ndarray, nuisance: float, sigma: float,
             rng: np.random.Generator) -> np.ndarray:
    """Rician-noise signals of ``model`` with the nuisance amplitude (M0) fixed."""
    params = np.stack([np.full_like(parameter_values, nuisance), parameter_values], -1)
    with torch.no_grad():
        clean = model(torch.as_tensor(params)).numpy()
    return np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))


def run_methods(methods: dict, voxels: np.ndarray, repeat: int) -> dict:
    out = {}
    for name, fn in methods.items():
        fn(voxels[: min(64, len(voxels))])  # warm-up: imports, pools, torch kernels
        values, seconds = _timed(lambda fn=fn: fn(voxels), repeat)
        out[name] = {"values": values, "seconds": seconds,
                     "voxels_per_s": voxels.shape[0] / seconds}
        print(f"  {name}: {voxels.shape[0] / seconds:,.0f} voxels/s ({seconds:.2f} s)",
              flush=True)
    return out


def accuracy(estimate: np.ndarray, truth: np.ndarray) -> dict:
    rel = estimate / truth - 1
    ok = np.isfinite(rel)
    return {"median_abs_err_pct": float(100 * np.median(np.abs(rel[ok]))),
            "median_err_pct": float(100 * np.median(rel[ok])),
            "failed_pct": float(100 * (1 - ok.mean()))}


def bench_phantom(t1_module, quick: bool) -> dict:
    loaded, mask, sigma = load("phantom01", "IRT1")
    model = loaded.model
    voxels = loaded.data[mask]
    print(f"sub-phantom01 IR: {voxels.shape[0]} voxels, sigma {sigma:.4g}", flush=True)
    methods = {**project_methods(model, sigma, "T1"),
               **ukat_t1_methods(t1_module, model.inversion_time.numpy())}
    runs = run_methods(methods, voxels, 1 if quick else 2)
    ref = DS / "derivatives" / "reference" / "sub-phantom01" / "anat"
    seg = np.asarray(nib.load(str(ref / "sub-phantom01_desc-spheres_dseg.nii.gz")).dataobj)
    seg = seg.reshape(mask.shape)[mask]
    spheres = [r for r in csv.DictReader((ref / "sub-phantom01_desc-spheres_dseg.tsv").open(),
                                         delimiter="\t") if r["measurable"] == "true"]
    for run in runs.values():
        per_sphere = []
        for r in spheres:
            inside = seg == int(r["label"])
            median = float(np.nanmedian(run["values"][inside])) * 1000
            reference = float(r["matched_reference_T1_v2_ms"])
            per_sphere.append({"sphere": int(r["nist_sphere"]), "T1_ms": median,
                               "ref_ms": reference, "err_pct": 100 * (median / reference - 1)})
        errors = np.abs([s["err_pct"] for s in per_sphere])
        run.update({"spheres": per_sphere, "median_abs_err_pct": float(np.median(errors)),
                    "worst_abs_err_pct": float(errors.max()),
                    "within_10pct": int((errors < 10).sum()), "n_spheres": len(per_sphere)})
        del run["values"]
    # the same protocol simulated at the phantom's SNR, T1 known
    m0 = float(np.median(np.abs(voxels).max(-1)))
    rng = np.random.default_rng(1)
    truth = np.exp(rng.uniform(np.log(0.1), np.log(2.5), 500 if quick else 4000))
    simulated = run_methods(methods, simulate(model, truth, m0, sigma, rng), 1)
    for run in simulated.values():
        run.update(accuracy(run.pop("values"), truth))
    return {"voxels": int(voxels.shape[0]), "sigma": sigma, "snr": m0 / sigma,
            "protocol": model.to_protocol(), "real": runs, "simulated": simulated}


def bench_kidney(t2_module, quick: bool) -> dict:
    loaded, mask, sigma = load("kidney01", "MESE")
    model = loaded.model
    voxels = loaded.data[mask]
    # a fixed random subset of the object, the same for every method (ukat fits ~100 voxels/s)
    voxels = voxels[np.random.default_rng(0).permutation(len(voxels))[:3000 if quick else
                                                                      KIDNEY_VOXELS]]
    print(f"sub-kidney01 MESE: {voxels.shape[0]} voxels, sigma {sigma:.4g}", flush=True)
    methods = {**project_methods(model, sigma, "T2"),
               **ukat_t2_methods(t2_module, model.echo_time.numpy())}
    runs = run_methods(methods, voxels, 1)
    reference = f"qmri-bids NLLS ({model.name})"  # mono-exponential, as ukat's 2p_exp
    nlls = runs[reference]["values"]
    for run in runs.values():
        values = run.pop("values")
        ratio = values / nlls
        ok = np.isfinite(ratio)
        run.update({"median_T2_ms": float(1000 * np.nanmedian(values)),
                    "iqr_T2_ms": [float(1000 * q) for q in np.nanpercentile(values, [25, 75])],
                    "median_abs_diff_vs_mono_nlls_pct": float(
                        100 * np.median(np.abs(ratio[ok] - 1))),
                    "failed_pct": float(100 * (1 - np.isfinite(values).mean()))})
    s0 = float(np.median(voxels[:, 0]))
    rng = np.random.default_rng(2)
    truth = np.exp(rng.uniform(np.log(0.03), np.log(0.2), 1000 if quick else 5000))
    simulated = run_methods(methods, simulate(model, truth, s0, sigma, rng), 1)
    for run in simulated.values():
        run.update(accuracy(run.pop("values"), truth))
    return {"voxels": int(voxels.shape[0]), "sigma": sigma, "snr": s0 / sigma,
            "protocol": model.to_protocol(), "real": runs, "simulated": simulated}


def markdown(result: dict) -> str:
    ph, kid = result["phantom"], result["kidney"]
    lines = [(f"ukat {result['ukat_version']}, torch {result['torch']} on "
             f"{result['torch_threads']} threads, {result['cpu']}"), "",
             (f"sub-phantom01 IR ({ph['voxels']} voxels, SNR {ph['snr']:.0f}): T1 per measurable "
             "NIST sphere vs the v2 reference, and on signals simulated with its protocol"),
             "", ("| method | voxels/s | spheres within 10 % | median / worst sphere error | "
                 "simulated: median abs error, bias, failed |"), "|---|---|---|---|---|"]
    for name, run in ph["real"].items():
        sim = ph["simulated"][name]
        lines.append(f"| {name} | {run['voxels_per_s']:,.0f} | {run['within_10pct']}/"
                     f"{run['n_spheres']} | {run['median_abs_err_pct']:.1f} / "
                     f"{run['worst_abs_err_pct']:.1f} % | {sim['median_abs_err_pct']:.2f} %, "
                     f"{sim['median_err_pct']:+.2f} %, {sim['failed_pct']:.1f} % |")
    lines += ["", (f"sub-kidney01 MESE ({kid['voxels']} voxels, SNR {kid['snr']:.0f} at echo 1): "
                  "no reference; agreement with mono-exponential NLLS, and signals simulated with "
                  "its protocol (mono-exponential, ideal refocusing)"),
              "", ("| method | voxels/s | median T2 (IQR) | median abs diff vs mono-exp NLLS | "
                  "simulated: median abs error, bias, failed |"), "|---|---|---|---|---|"]
    for name, run in kid["real"].items():
        sim = kid["simulated"][name]
        lines.append(f"| {name} | {run['voxels_per_s']:,.0f} | {run['median_T2_ms']:.1f} ms "
                     f"({run['iqr_T2_ms'][0]:.0f}-{run['iqr_T2_ms'][1]:.0f}) | "
                     f"{run['median_abs_diff_vs_mono_nlls_pct']:.2f} % | "
                     f"{sim['median_abs_err_pct']:.2f} %, {sim['median_err_pct']:+.2f} %, "
                     f"{sim['failed_pct']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer voxels, one repeat")
    args = parser.parse_args(argv)
    t1_module, t2_module, ukat_version = import_ukat()
    if ukat_version != UKAT_VERSION:
        print(f"note: ukat {ukat_version} (the tables were measured with {UKAT_VERSION})")
    if not DS.is_dir():
        raise SystemExit(f"ds-real not found at {DS} (set QMRI_SHARED_DATA)")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    result = {"ukat_version": ukat_version, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(),
              "phantom": bench_phantom(t1_module, args.quick),
              "kidney": bench_kidney(t2_module, args.quick)}
    result["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "peer_quick" if args.quick else "peer"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
