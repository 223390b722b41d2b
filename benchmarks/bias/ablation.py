"""Ablation of the bias CNN's training recipe: content (MR-like synthetic / legacy dead leaves +
photos / a mix) and loss terms (implicit only / explicit only / both).

Every variant trains the same network (``TrainConfig`` defaults except what the variant changes)
for the same number of steps from the same seed, then is scored on generated data only:

* the demo dataset's known fields (``qmri-bids demo``: both subjects, T1w and T2w), correlation
  of the log-fields and mean absolute error inside the head, via the full inference path;
* the held-out validation slices of :func:`qmri_bids.bias.train.validation_set`.

Checkpoints live in ``benchmarks/bias/scratch/ablation/<variant>`` (git-ignored), so an
interrupted run resumes. Results: ``benchmarks/bias/results/ablation.json`` and a markdown
table on stdout. Run from the repository root::

    python benchmarks/bias/ablation.py [--steps 4000] [--volumes 400] [--only both,implicit]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from qmri_bids.bias.cnn import FusionConfig, apply_to_volume
from qmri_bids.bias.metrics import field_agreement
from qmri_bids.bias.train import TrainConfig, train, validate, validation_set

REPO = Path(__file__).resolve().parents[2]
LOG = logging.getLogger("qmri_bids.bias.ablation")
SCRATCH = REPO / "benchmarks" / "bias" / "scratch"
OUT = REPO / "benchmarks" / "bias" / "results" / "ablation.json"

VARIANTS: dict[str, dict] = {
    "synth, implicit + explicit": {"content": "synth", "w_implicit": 1.0, "w_explicit": 1.0},
    "synth, implicit only": {"content": "synth", "w_implicit": 1.0, "w_explicit": 0.0},
    "synth, explicit only": {"content": "synth", "w_implicit": 0.0, "w_explicit": 1.0},
    "mix, implicit + explicit": {"content": "mix", "w_implicit": 1.0, "w_explicit": 1.0},
    "legacy, implicit only": {"content": "legacy", "w_implicit": 1.0, "w_explicit": 0.0},
}


def ensure_demo(folder: Path) -> Path:
    """The project's own demo dataset (anatomical images with known fields)."""
    if not (folder / "dataset_description.json").is_file():
        from qmri_bids.demo.cli import demo_main

        demo_main([str(folder), "--no-qmri"])
    return folder


def demo_cases(demo: Path) -> list[tuple[str, np.ndarray, tuple, np.ndarray, np.ndarray]]:
    cases = []
    for sub in ("01", "02"):
        gt = demo / "derivatives" / "groundtruth" / f"sub-{sub}" / "anat"
        head = nib.load(str(gt / f"sub-{sub}_desc-tissue_dseg.nii.gz")).get_fdata() > 0
        for suffix in ("T1w", "T2w"):
            im = nib.load(str(demo / f"sub-{sub}" / "anat" / f"sub-{sub}_{suffix}.nii.gz"))
            truth = nib.load(str(gt / f"sub-{sub}_desc-truefield_{suffix}.nii.gz")).get_fdata()
            cases.append((f"sub-{sub} {suffix}", im.get_fdata().astype(np.float32),
                          tuple(float(z) for z in im.header.get_zooms()[:3]), truth, head))
    return cases


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--volumes", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cases = demo_cases(ensure_demo(SCRATCH / "demo_anat"))
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results.setdefault("variants", {})
    results.update({"steps": args.steps, "volumes": args.volumes, "threads": args.threads})
    for name, override in VARIANTS.items():
        if args.only and not any(k.strip() in name for k in args.only.split(",")):
            continue
        cfg = TrainConfig(**{"steps": args.steps, "n_volumes": args.volumes,
                             "n_dead_leaves": 4 * args.volumes, "n_photo_crops": 4 * args.volumes,
                             "log_every": 250, **override})
        vset = validation_set(cfg.net.in_size)
        t0 = time.perf_counter()
        net, summary = train(cfg, SCRATCH / "ablation" / slug(name))
        rec = {"config": override, "train_wall_s": summary["wall_s"],
               "validation": validate(net, vset), "demo": {}}
        for label, img, spacing, truth, head in cases:
            field, _ = apply_to_volume(net, img, spacing, fcfg=FusionConfig())
            rec["demo"][label] = field_agreement(field, truth, head)
        rec["demo_mean_correlation"] = float(np.mean([d["correlation"]
                                                      for d in rec["demo"].values()]))
        rec["demo_mean_mae"] = float(np.mean([d["mae"] for d in rec["demo"].values()]))
        results["variants"][name] = rec
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        LOG.info("%s: %.0f s, demo corr %.3f mae %.4f", name, time.perf_counter() - t0,
                     rec["demo_mean_correlation"], rec["demo_mean_mae"])
    print(f"# Bias CNN ablation ({args.steps} steps, {args.volumes} synthetic volumes)\n")
    print("| variant | demo field corr (mean of 4) | demo field MAE | held-out synth field MAE |"
          " held-out photos consistency MAE |")
    print("|---|---|---|---|---|")
    for name, rec in results["variants"].items():
        v = rec["validation"]
        print(f"| {name} | {rec['demo_mean_correlation']:.3f} | {rec['demo_mean_mae']:.4f} | "
              f"{v.get('synth_field_mae', float('nan')):.4f} | "
              f"{v.get('photos_consistency_mae', float('nan')):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
