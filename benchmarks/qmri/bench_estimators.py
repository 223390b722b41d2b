"""Benchmark: CRB-trained network vs MSE-trained network vs NLLS (vs dictionary for MRF).

For each demo protocol (VFA, IRT1, MESE of ds-real; MRF with ``--mrf``):

* efficiency CRB/MSE per parameter (median over a held-out grid of the prior, ``n_rep`` noise
  realisations per grid point, MSE including bias), relative bias and the mean CRB-normalised
  loss, at SNR 20, 50, 100 (SNR = brightest noise-free image / σ), for
  - the CRB-loss network (the shipped model when present for this protocol, else trained here),
  - an MSE-loss network trained here with the same pool, steps, seed and architecture,
  - bounded Levenberg-Marquardt NLLS (``qmri_bids.qmri.nlls.fit_nlls``, float64);
* speed in voxels/s of the network (``estimate_maps``: all maps incl. the M0 least squares) and
  of NLLS, measured in the same run with ``torch.set_num_threads(2)``.

Writes markdown to stdout and JSON to ``benchmarks/qmri/results/estimators.json``
(``throughput.json`` with ``--speed-only``). Timings are only as good as the machine is idle.

    python benchmarks/qmri/bench_estimators.py [--models vfa irt1 mese-mono] [--n-rep 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from qmri_bids.qmri.estimator import assemble_params
from qmri_bids.qmri.model_store import (
    SHIPPED_DIR,
    estimator_stem,
    load_estimator,
)
from qmri_bids.qmri.nlls import fit_nlls
from qmri_bids.qmri.predict import estimate_maps
from qmri_bids.qmri.training import (
    full_to_shape,
    make_pool,
    train_estimator,
    validate,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = str(HERE / "results" / "estimators.json")
LOG = logging.getLogger("qmri_bids.bench_estimators")


def _demo_models():
    import sys

    sys.path.insert(0, str(HERE))
    from train_shipped import DEMO_MODELS, SHIPPED_SETTINGS

    return DEMO_MODELS, SHIPPED_SETTINGS


def nlls_estimator(model):
    def f(y, b1):
        y64 = y.to(torch.complex128 if y.is_complex() else torch.float64)
        kb = None if b1 is None else b1.to(torch.float64)
        return fit_nlls(model, y64, b1=kb).params

    return full_to_shape(model, model.default_prior(), f)


def _best_of(fn, repeats: int) -> float:
    """Shortest wall time of ``repeats`` runs (the machine is shared: the minimum is the
    least-disturbed measurement)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed(model, net, n_net: int, n_nlls: int, seed: int = 0, repeats: int = 3
          ) -> dict[str, float]:
    """Voxels/s of ``estimate_maps`` (all maps) and of ``fit_nlls`` on the same noisy data,
    best of ``repeats`` alternating runs."""
    prior = net.prior
    gen = torch.Generator().manual_seed(seed)
    shape, b1 = prior.sample(n_net, gen)
    full = assemble_params(model, prior, shape, torch.full((n_net,), 1000.0, dtype=torch.float64))
    y = model(full, b1)
    y = y + 10.0 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y = y.abs()
    y_np, b1_np = y.numpy(), None if b1 is None else b1.numpy()
    t_net, t_nlls = float("inf"), float("inf")
    for _ in range(repeats):
        t_net = min(t_net, _best_of(lambda: estimate_maps(net, y_np, b1=b1_np), 1))
        t_nlls = min(t_nlls, _best_of(
            lambda: fit_nlls(model, y[:n_nlls], b1=None if b1 is None else b1[:n_nlls]), 1))
    return {"network_voxels_per_s": n_net / t_net, "nlls_voxels_per_s": n_nlls / t_nlls,
            "speedup": (n_net / t_net) / (n_nlls / t_nlls), "n_network": n_net, "n_nlls": n_nlls,
            "timing": f"best of {repeats} alternating runs, torch.set_num_threads(2)"}


def dictionary_estimator(model, matcher):
    def f(y, b1):
        return matcher.match(y.to(torch.complex64)).params.to(torch.float64)

    return full_to_shape(model, model.default_prior(), f)


def speed_mrf(model, net, matcher, n: int, seed: int = 0) -> dict[str, float]:
    prior = net.prior
    gen = torch.Generator().manual_seed(seed)
    shape, _ = prior.sample(n, gen)
    m0 = torch.polar(torch.full((n,), 1000.0, dtype=torch.float64),
                     torch.rand(n, generator=gen, dtype=torch.float64) * 6.28)
    full = assemble_params(model, prior, shape, m0)
    with torch.no_grad():
        y = model(full.float()).to(torch.complex64)
    y = y + 5.0 * torch.complex(torch.randn(y.shape, generator=gen), torch.randn(y.shape,
                                                                                generator=gen))
    t_net, t_d = float("inf"), float("inf")
    for _ in range(3):
        t_net = min(t_net, _best_of(lambda: estimate_maps(net, y), 1))
        t_d = min(t_d, _best_of(lambda: matcher.match(y), 1))
    return {"network_voxels_per_s": n / t_net, "dictionary_voxels_per_s": n / t_d,
            "speedup": t_d / t_net, "n": n, "dictionary_atoms": matcher.n_atoms,
            "dictionary_build_s": matcher.build_seconds}


def bench_mrf(args, results) -> None:
    from qmri_bids.qmri.dictionary import DictionaryMatcher, default_mrf_grid
    from qmri_bids.qmri.models.mrf import MRFModel

    _demo_models()  # puts benchmarks/qmri on sys.path
    from train_shipped import MRF_SETTINGS

    mrf_settings = dict(MRF_SETTINGS)
    model = MRFModel(estimate_b1=False)
    prior = model.default_prior()
    t0 = time.perf_counter()
    kw = dict(mrf_settings)
    kw["n_steps"] = args.mrf_steps
    pool = make_pool(model, prior, kw.pop("pool_size"), kw["seed"] + 1)
    mse_net, rep = train_estimator(model, pool=pool, **{**kw, "loss": "mse"})
    stem = SHIPPED_DIR / estimator_stem(model.name, model.to_protocol())
    # the shipped CRB network, once it has the same number of steps (train_shipped.py may be
    # running concurrently), else one trained here
    deadline = time.time() + args.wait_shipped_s
    while time.time() < deadline:
        if stem.with_suffix(".json").is_file() and json.loads(
                stem.with_suffix(".json").read_text()).get("steps") == args.mrf_steps:
            break
        time.sleep(10)
    card = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(
        ".json").is_file() else {}
    if card.get("steps") == args.mrf_steps:
        crb_net, card = load_estimator(stem, model)
        crb_src = f"shipped {stem.name} ({card['steps']} steps)"
    else:
        crb_net, _ = train_estimator(model, pool=pool, **{**kw, "loss": "crb"})
        crb_src = f"trained here ({args.mrf_steps} steps)"
    torch.set_num_threads(2)
    matcher = DictionaryMatcher(model, default_mrf_grid())
    entry = {"crb_network": crb_src, "mse_training_time_s": rep.training_time_s}
    n_rep = max(10, args.n_rep // 2)
    entry["crb"] = validate(crb_net, model, prior, n_rep=n_rep)
    entry["mse"] = validate(mse_net, model, prior, n_rep=n_rep)
    entry["nlls"] = validate(dictionary_estimator(model, matcher), model, prior, n_rep=n_rep)
    entry["nlls_is"] = "dictionary matching (default_mrf_grid, 5 % steps)"
    entry["speed"] = speed_mrf(model, crb_net, matcher, 20_000)
    entry["wall_s"] = time.perf_counter() - t0
    results["models"]["mrf"] = entry


def main(argv: list[str] | None = None) -> None:
    demo, settings = _demo_models()
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(demo))
    ap.add_argument("--n-rep", type=int, default=100)
    ap.add_argument("--steps", type=int, default=settings["n_steps"],
                    help="training steps of the MSE (and, if not shipped, CRB) networks")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="JSON results (default results/estimators.json; with --speed-only "
                         "results/throughput.json)")
    ap.add_argument("--mrf", action="store_true", help="also MRF: networks vs dictionary")
    ap.add_argument("--mrf-steps", type=int, default=10000)
    ap.add_argument("--wait-shipped-s", type=float, default=0.0,
                    help="MRF: wait this long for a shipped CRB network with --mrf-steps steps")
    ap.add_argument("--speed-only", action="store_true",
                    help="only measure the speeds of the shipped networks of --models (and of "
                         "the MRF network against the dictionary with --mrf); no training")
    ap.add_argument("--n-voxels", type=int, default=1_000_000,
                    help="voxels of the network throughput measurement")
    ap.add_argument("--merge", action="store_true",
                    help="add to the models already in --out instead of replacing the file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    results = {"hardware": f"{platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} CPU cores, torch threads 2",
               "torch_version": torch.__version__, "n_rep": args.n_rep, "models": {}}
    if args.speed_only and args.out == DEFAULT_OUT:
        args.out = str(HERE / "results" / "throughput.json")
    if args.merge and Path(args.out).is_file():
        results["models"] = json.loads(Path(args.out).read_text())["models"]
    if args.speed_only:
        for name in args.models:
            model = demo[name]()
            stem = SHIPPED_DIR / estimator_stem(model.name, model.to_protocol())
            if not stem.with_suffix(".json").is_file():
                LOG.warning("%s: no shipped network for this protocol, skipped", name)
                continue
            net, card = load_estimator(stem, model)
            entry = results["models"].setdefault(name, {})
            entry["crb_network"] = f"shipped {stem.name} ({card['steps']} steps)"
            entry["speed"] = speed(model, net, args.n_voxels, 4000)
        if args.mrf:
            from qmri_bids.qmri.dictionary import DictionaryMatcher, default_mrf_grid
            from qmri_bids.qmri.models.mrf import MRFModel

            model = MRFModel(estimate_b1=False)
            stem = SHIPPED_DIR / estimator_stem(model.name, model.to_protocol())
            net, card = load_estimator(stem, model)
            entry = results["models"].setdefault("mrf", {})
            entry["crb_network"] = f"shipped {stem.name} ({card['steps']} steps)"
            entry["speed"] = speed_mrf(model, net, DictionaryMatcher(model, default_mrf_grid()),
                                       20_000)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(markdown(results))
        return
    for name in args.models:
        model = demo[name]()
        prior = model.default_prior()
        kw = dict(settings)
        kw["n_steps"] = args.steps
        kw.pop("pool_size")
        t0 = time.perf_counter()
        pool = make_pool(model, prior, settings["pool_size"], kw["seed"] + 1)
        stem = SHIPPED_DIR / estimator_stem(model.name, model.to_protocol())
        if stem.with_suffix(".json").is_file():
            crb_net, card = load_estimator(stem, model)
            crb_src = f"shipped {stem.name} ({card['steps']} steps)"
        else:
            crb_net, _ = train_estimator(model, pool=pool, **{**kw, "loss": "crb"})
            crb_src = f"trained here ({args.steps} steps)"
        mse_net, rep = train_estimator(model, pool=pool, **{**kw, "loss": "mse"})
        torch.set_num_threads(2)
        entry = {"crb_network": crb_src, "mse_training_time_s": rep.training_time_s}
        entry["crb"] = validate(crb_net, model, prior, n_rep=args.n_rep)
        entry["mse"] = validate(mse_net, model, prior, n_rep=args.n_rep)
        entry["nlls"] = validate(nlls_estimator(model), model, prior, n_rep=args.n_rep)
        entry["speed"] = speed(model, crb_net, args.n_voxels, 4000)
        entry["wall_s"] = time.perf_counter() - t0
        results["models"][name] = entry
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.mrf:
        bench_mrf(args, results)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [(f"# Estimator benchmark\n\n{results['hardware']}, torch {results['torch_version']}, "
             f"{results['n_rep']} noise realisations per grid point.\n")]
    for name, e in results["models"].items():
        third = "dictionary" if name == "mrf" else "NLLS"
        lines.append(f"## {name}\n\nCRB network: {e['crb_network']}.\n")
        if "crb" in e:
            lines += _accuracy_table(e, third)
        s = e["speed"]
        other = s.get("nlls_voxels_per_s", s.get("dictionary_voxels_per_s"))
        n = s.get("n_network", s.get("n"))
        lines.append(f"\nSpeed ({n} voxels): network {s['network_voxels_per_s']:.3g} voxels/s, "
                     f"{third} {other:.3g} voxels/s → **{s['speedup']:.0f}×**.\n")
    return "\n".join(lines)


def _accuracy_table(e: dict, third: str) -> list[str]:
    lines = [f"Third column: {third}.\n",
             ("| SNR | parameter | eff. CRB-net | eff. MSE-net | eff. NLLS | rel. bias CRB-net | "
              "rel. bias MSE-net | rel. bias NLLS | CRB-loss CRB-net / MSE-net / NLLS |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for snr, d in e["crb"]["snr"].items():
        for p, v in d["parameters"].items():
            m = e["mse"]["snr"][snr]["parameters"][p]
            n = e["nlls"]["snr"][snr]["parameters"][p]
            losses = " / ".join(f"{e[k]['snr'][snr]['crb_loss']:.3g}"
                                for k in ("crb", "mse", "nlls"))
            lines.append(f"| {snr} | {p} | {v['efficiency_median']:.3f} | "
                         f"{m['efficiency_median']:.3f} | {n['efficiency_median']:.3f} | "
                         f"{v['bias_rel_median']:.4f} | {m['bias_rel_median']:.4f} | "
                         f"{n['bias_rel_median']:.4f} | {losses} |")
    return lines


if __name__ == "__main__":
    main()
