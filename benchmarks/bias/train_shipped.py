"""Train and export the shipped bias-field CNN: ``qmri_bids/models/bias_cnn_v2.safetensors``.

The recipe is :class:`qmri_bids.bias.train.TrainConfig`'s defaults (MR-like synthetic content,
implicit + explicit terms, 64-px slices), on 1 CPU thread by default. Training runs in the
background for hours and is resumable: checkpoints go to ``--ckpt`` (default
``benchmarks/bias/scratch/bias_cnn_v2_ckpt``, git-ignored) every 250 steps, and a run started
again with the same arguments continues where the last one stopped and reaches the same weights
as an uninterrupted run. ``--budget-min`` stops a session early (after a checkpoint); the export
then records the steps actually done. Run from the repository root::

    python benchmarks/bias/train_shipped.py [--steps 30000] [--budget-min 600] [--threads 1]
    python benchmarks/bias/train_shipped.py --export-only   # card + weights from the checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from qmri_bids.bias.cnn import BiasNet, FusionConfig
from qmri_bids.bias.train import TrainConfig, export_model, train, validate, validation_set

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CKPT = REPO / "benchmarks" / "bias" / "scratch" / "bias_cnn_v2_ckpt"
DEFAULT_OUT = REPO / "qmri_bids" / "models" / "bias_cnn_v2.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--budget-min", type=float, default=None,
                    help="stop this session after this many minutes of training (resumable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=json.loads, default={},
                    help="JSON overrides of TrainConfig fields (e.g. for an ablation)")
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--export-only", action="store_true",
                    help="export the checkpoint as it is (no training)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{"steps": args.steps, "seed": args.seed, **args.config})
    vset = validation_set(cfg.net.in_size)
    if args.export_only:
        state = json.loads((args.ckpt / "state.json").read_text())
        cfg = TrainConfig.from_dict(state["config"])
        from safetensors.torch import load_file

        net = BiasNet(cfg.net)
        net.load_state_dict(load_file(str(args.ckpt / "weights.safetensors")))
        net.eval()
        summary = {"steps_done": state["step"], "steps_planned": cfg.steps,
                   "history": state["history"], "wall_s": state["wall_s"]}
    else:
        net, summary = train(cfg, args.ckpt, resume=True,
                             max_wall_s=None if args.budget_min is None else args.budget_min * 60,
                             vset=vset, validate_every=1000, device=args.device)
    metrics = validate(net.cpu(), vset)
    logging.getLogger("qmri_bids.bias").info("validation: %s", metrics)
    export_model(net, args.out, cfg, summary, metrics, FusionConfig(),
                 notes=f"trained by benchmarks/bias/train_shipped.py with {args.threads} "
                       f"thread(s) on {args.device}")


if __name__ == "__main__":
    main()
