"""Train the shipped MRF estimator (default FISP schedule, known-B1 input) and its ablation.

Variants (same seed, pool and SNR range 10-200; the CRB is that of the B1-conditioned model):

* ``v1-arch``: the architecture of the first shipped MRF network (width 192, 3 residual blocks,
  13 SVD coefficients) with the B1 input, its recipe of 10 000 steps x 256;
* ``v1-arch-long``: the same network trained 60 000 steps x 512;
* ``wide-long``: the current default (:func:`qmri_bids.qmri.estimator.default_config`: width
  256, 4 blocks, 20 SVD coefficients), 60 000 steps x 512;
* ``wide-xl``: ``wide-long``'s final network trained on with a second cosine schedule (peak
  learning rate 3e-4, batch 1024): its loss was still falling when the first schedule ended.

Each run checkpoints to ``benchmarks/qmri/scratch/mrf/<variant>`` (git-ignored) and resumes from
there; when it ends it is validated on the held-out grid (T1 x T2 x B1 0.8/1.0/1.2, SNR
20/50/100) and written with its card to ``benchmarks/qmri/scratch/mrf/<variant>.safetensors``;
``--ship VARIANT`` copies a finished one into ``qmri_bids/models/qmri`` under its protocol hash.
Results: ``benchmarks/qmri/results/mrf_ablation.json``. Run from the repository root::

    python benchmarks/qmri/train_mrf.py [--only wide-long] [--threads 1]
    python benchmarks/qmri/train_mrf.py --ship wide-long
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from qmri_bids.provenance import hardware_string
from qmri_bids.qmri.estimator import default_config
from qmri_bids.qmri.model_store import SHIPPED_DIR, estimator_stem, export_estimator, train_and_card
from qmri_bids.qmri.models.mrf import MRFModel
from qmri_bids.qmri.training import make_pool

REPO = Path(__file__).resolve().parents[2]
SCRATCH = REPO / "benchmarks" / "qmri" / "scratch" / "mrf"
OUT = REPO / "benchmarks" / "qmri" / "results" / "mrf_ablation.json"
LOG = logging.getLogger("qmri_bids.qmri.train_mrf")

COMMON = {"seed": 0, "loss": "crb", "snr_range": (10.0, 200.0), "learning_rate": 1e-3}
VARIANTS = {
    "wide-long": {"arch": {}, "n_steps": 60000, "batch_size": 512},
    "v1-arch": {"arch": {"width": 192, "depth": 3, "n_svd": 13}, "n_steps": 10000,
                "batch_size": 256},
    "v1-arch-long": {"arch": {"width": 192, "depth": 3, "n_svd": 13}, "n_steps": 60000,
                     "batch_size": 512},
    "wide-xl": {"arch": {}, "n_steps": 100000, "batch_size": 1024, "learning_rate": 3e-4,
                "init": "wide-long"},
}
POOL_SIZE = 60_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ship", choices=list(VARIANTS))
    ap.add_argument("--export-checkpoint", choices=list(VARIANTS),
                    help="validate and export a run's latest checkpoint as it is (an interim "
                         "model while the run goes on), then stop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    model = MRFModel(estimate_b1=False)
    proto = model.to_protocol()
    stem = estimator_stem(model.name, proto)
    if args.ship:
        src = SCRATCH / f"{args.ship}.safetensors"
        if not src.is_file() and (SCRATCH / f"{args.ship}-interim.safetensors").is_file():
            src = SCRATCH / f"{args.ship}-interim.safetensors"
        # The card names its weights file: rename both together under the protocol stem.
        card = json.loads(src.with_suffix(".json").read_text())
        card.update({"name": stem, "weights_file": f"{stem}.safetensors",
                     "notes": variant_notes(args.ship)})
        shutil.copyfile(src.with_suffix(".safetensors"), SHIPPED_DIR / f"{stem}.safetensors")
        (SHIPPED_DIR / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")
        LOG.info("shipped %s as %s", src, SHIPPED_DIR / stem)
        return 0
    if args.export_checkpoint:
        return export_checkpoint(model, args.export_checkpoint)
    prior = model.default_prior()
    pool = None
    for name in args.only or list(VARIANTS):
        done = SCRATCH / f"{name}.json"
        if done.is_file():
            LOG.info("%s already trained (%s)", name, done)
            continue
        if pool is None:
            t0 = time.perf_counter()
            pool = make_pool(model, prior, POOL_SIZE, COMMON["seed"] + 1)
            LOG.info("pool of %d samples in %.0f s", pool.shape.shape[0],
                     time.perf_counter() - t0)
        spec = VARIANTS[name]
        config = dataclasses.replace(default_config(model, prior, pool.signal.shape[-1]),
                                     **spec["arch"])
        init = spec.get("init")
        if init is not None and not (SCRATCH / f"{init}.safetensors").is_file():
            LOG.error("%s starts from %s, which has not finished", name, init)
            return 1
        kwargs = {**COMMON, "learning_rate": spec.get("learning_rate", COMMON["learning_rate"])}
        net, card = train_and_card(model, proto, **kwargs, n_steps=spec["n_steps"],
                                   batch_size=spec["batch_size"], pool=pool, config=config,
                                   checkpoint_dir=SCRATCH / name, validate_n_rep=200,
                                   init_weights=None if init is None
                                   else SCRATCH / f"{init}.safetensors")
        card["notes"] = variant_notes(name)
        export_estimator(net, SCRATCH / name, card)
        entry = {"arch": spec["arch"] or "default", "n_steps": spec["n_steps"],
                 "initialised_from": init, "learning_rate": kwargs["learning_rate"],
                 "steps_done": card.get("steps"),  # the gate may have extended it
                 "batch_size": spec["batch_size"], "pool_size": POOL_SIZE,
                 "training_time_s": card.get("training_time_s"),
                 "validation": card.get("validation")}
        # re-read: another variant may have finished meanwhile (runs in parallel processes)
        results = json.loads(OUT.read_text()) if OUT.is_file() else {}
        results[name] = entry
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        LOG.info("%s: %s", name, card.get("validation", {}).get("efficiency_median"))
    LOG.info("shipped stem for this protocol: %s", stem)
    return 0


def variant_notes(name: str) -> str:
    """The card's ``notes``: the variant, and for a continued one what it started from."""
    notes = f"benchmarks/qmri/train_mrf.py variant {name}"
    init = VARIANTS[name].get("init")
    if init is not None:
        done = SCRATCH / f"{init}.json"
        steps = json.loads(done.read_text()).get("steps") if done.is_file() else None
        notes += (f", initialised from the final network of variant {init} ({steps} steps); "
                  f"steps, time and history here are those of the continuation")
    return notes


def export_checkpoint(model: MRFModel, name: str) -> int:
    """An interim model from a running variant's checkpoint (weights include the SVD basis and
    the M0 table), validated and gated like a finished one; written as ``<name>-interim``."""
    from safetensors.torch import load_file

    from qmri_bids.qmri.estimator import CrbEstimator
    from qmri_bids.qmri.model_store import _validation_summary, protocol_hash

    ckpt = SCRATCH / name
    state = json.loads((ckpt / "state.json").read_text())
    prior = model.default_prior()
    config = dataclasses.replace(default_config(model, prior), **VARIANTS[name]["arch"])
    net = CrbEstimator(config, model)
    net.load_state_dict(load_file(str(ckpt / "weights.safetensors")))
    net.eval()
    proto = model.to_protocol()
    val = _validation_summary(net, model, 200, "max_signal")
    card = {"protocol": proto, "protocol_hash": protocol_hash(model.name, proto),
            "snr_range": list(COMMON["snr_range"]), "loss": COMMON["loss"],
            "seed": COMMON["seed"], "steps": state["step"],
            "training": {"n_steps": VARIANTS[name]["n_steps"], "steps_done": state["step"],
                         "batch_size": VARIANTS[name]["batch_size"], "pool_size": POOL_SIZE,
                         "history": state["history"], "truncated": True},
            "validation": val, "hardware": hardware_string(),
            "notes": f"interim export of benchmarks/qmri/train_mrf.py variant {name} at step "
                     f"{state['step']} of {VARIANTS[name]['n_steps']}"}
    export_estimator(net, SCRATCH / f"{name}-interim", card)
    LOG.info("%s at step %d: efficiency %s, gate %s", name, state["step"],
             val["efficiency_median"], val["gate"]["Passed"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
