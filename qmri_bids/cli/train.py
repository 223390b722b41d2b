"""``qmri-bids train``: the training sub-workflows, run on their own.

    qmri-bids train bias OUT.safetensors [--steps N] [--budget-min M] [--seed S] [-w WORK]
    qmri-bids train qmri --collection VFA --protocol BIDS_DIR|SIDECAR.json ... [--model-dir D]

Both run a Nipype workflow (make data → train → validate → export), print progress, resume
from their checkpoints / caches when run again with the same work dir, and write safetensors
weights with a model card JSON beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from qmri_bids.errors import MissingInputError, NothingSelectedError, UsageError

LOGGER = logging.getLogger("qmri_bids")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage()
        self.exit(64, f"{self.prog}: error: {message}\n")


def build_train_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qmri-bids train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True, parser_class=_Parser)

    bias = sub.add_parser("bias", help="train the implicitly trained bias-field CNN")
    bias.add_argument("out_file", type=Path, help="destination .safetensors (card beside it)")
    from qmri_bids.bias.cnn import BiasNetConfig
    from qmri_bids.bias.train import CONTENTS, TrainConfig

    # The defaults are the shipped model's recipe (benchmarks/bias/train_shipped.py runs it).
    bias.add_argument("--steps", type=int, default=TrainConfig.steps)
    bias.add_argument("--seed", type=int, default=0,
                      help="seed of the training content, fields and weights (default 0, the "
                           "shipped model's)")
    bias.add_argument("--budget-min", "--budget_min", type=float, dest="budget_min",
                      help="stop training after this many minutes (resumable)")
    bias.add_argument("--in-size", "--in_size", type=int, dest="in_size",
                      default=BiasNetConfig().in_size, help="slice size the network sees (pixels)")
    bias.add_argument("--content", choices=CONTENTS, default=TrainConfig.content,
                      help="training images: synth (MR-like label volumes, bias-free by "
                           "construction), legacy (dead leaves and photos), or mix")
    bias.add_argument("--n-volumes", "--n_volumes", type=int, dest="n_volumes",
                      default=TrainConfig.n_volumes,
                      help="synthetic 3-D volumes in the training pool (content synth or mix)")
    bias.add_argument("--n-images", "--n_images", type=int, dest="n_images",
                      default=TrainConfig.n_dead_leaves,
                      help="dead-leaves images and photo crops each (content legacy or mix)")
    bias.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads of the training process (default 1)")
    bias.add_argument("-w", "--work-dir", "--work_dir", type=Path, dest="work_dir",
                      default=Path("work_train_bias"))

    from qmri_bids.qmri.models import COLLECTION_MODELS

    qmri = sub.add_parser("qmri", help="train a CRB-loss estimator for one acquisition protocol")
    qmri.add_argument("--collection", required=True,
                      choices=[s for s, cls in COLLECTION_MODELS.items() if not cls.closed_form])
    qmri.add_argument("--protocol", required=True, nargs="+", type=Path,
                      help="a BIDS dataset (its first collection of that kind is used, or the "
                           "one of --participant-label), or the members' JSON sidecars")
    qmri.add_argument("--participant-label", "--participant_label", dest="participant_label")
    qmri.add_argument("--loss", choices=["crb", "mse"], default="crb",
                      help="crb: squared error of each parameter divided by its Cramér-Rao "
                           "bound (Zhang et al. 2022; a loss of 1 is an efficient estimator); "
                           "mse: plain squared error, for comparison (default crb)")
    qmri.add_argument("--seed", type=int, default=0,
                      help="seed of the simulated training signals, noise and weights "
                           "(default 0)")
    qmri.add_argument("--budget-s", "--budget_s", type=float, dest="budget_s",
                      help="training time budget in seconds")
    qmri.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads of the training process (default 1)")
    qmri.add_argument("--force", action="store_true",
                      help="train even if a shipped or cached estimator matches the protocol "
                           "(e.g. to compare --loss mse)")
    qmri.add_argument("--model-dir", "--model_dir", type=Path, dest="model_dir",
                      default=Path("models_qmri"), help="where the estimator is cached")
    qmri.add_argument("-w", "--work-dir", "--work_dir", type=Path, dest="work_dir",
                      default=Path("work_train_qmri"))
    return parser


def train_main(argv: list[str]) -> int:
    args = build_train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s | %(levelname)-7s | %(name)s | %(message)s")
    from nipype import config as ncfg

    ncfg.set("execution", "crashfile_format", "txt")
    ncfg.set("execution", "create_report", "false")
    ncfg.set("execution", "hash_method", "content")
    if args.what == "bias":
        return _train_bias(args)
    return _train_qmri(args)


def _run(workflow, work_dir: Path) -> None:
    from qmri_bids.errors import NodeFailedError

    workflow.base_dir = str(work_dir.resolve())
    workflow.config["execution"]["crashdump_dir"] = str(work_dir.resolve() / "crashes")
    try:
        workflow.run(plugin="Linear")
    except RuntimeError as exc:
        raise NodeFailedError(f"training failed: {exc}; crash files in {work_dir}/crashes")\
            from exc


def _train_bias(args) -> int:
    from qmri_bids.bias.train import TrainConfig
    from qmri_bids.workflows.training import init_bias_training_wf

    if args.out_file.suffix != ".safetensors":
        raise UsageError(f"{args.out_file}: the model file must end in .safetensors")
    import dataclasses

    from qmri_bids.bias.cnn import BiasNetConfig

    cfg = TrainConfig(net=dataclasses.replace(BiasNetConfig(), in_size=args.in_size),
                      steps=args.steps, seed=args.seed, content=args.content,
                      w_explicit=0.0 if args.content == "legacy" else TrainConfig.w_explicit,
                      n_volumes=args.n_volumes, n_dead_leaves=args.n_images,
                      n_photo_crops=args.n_images)
    workflow = init_bias_training_wf(
        config=cfg.to_dict(), out_file=args.out_file.resolve(),
        checkpoint_dir=args.work_dir.resolve() / "checkpoints",
        max_wall_s=None if args.budget_min is None else 60 * args.budget_min,
        n_threads=args.threads)
    _run(workflow, args.work_dir)
    card = json.loads(args.out_file.with_suffix(".json").read_text())
    print(f"wrote {args.out_file} (sha256 {card['sha256'][:12]}..., "
          f"{card['training']['steps']} steps); validation: {card['validation']}")
    return 0


def _sidecar_collection(suffix: str, sidecars: list[Path]):
    from qmri_bids.bids.discovery import Collection, Member

    members = []
    for path in sidecars:
        if not path.is_file():
            raise MissingInputError(f"{path}: sidecar not found")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc})") from exc
        entities = dict(re.findall(r"([a-zA-Z]+)-([a-zA-Z0-9]+)", path.name))
        nifti = path.with_name(path.name[: -len(".json")] + ".nii.gz")
        members.append(Member(nifti, {{"sub": "subject"}.get(k, k): v
                                      for k, v in entities.items()}, meta))
    return Collection(suffix, "protocol", None, {}, members)


def _train_qmri(args) -> int:
    from qmri_bids.qmri.model_store import locate_estimator, read_card
    from qmri_bids.qmri.protocols import resolve_collection
    from qmri_bids.workflows.training import init_qmri_training_wf

    sources = args.protocol
    if len(sources) == 1 and sources[0].is_dir():
        from qmri_bids.bids.discovery import discover, select_participants

        bids_dir = sources[0].resolve()
        labels = [args.participant_label] if args.participant_label else None
        subjects = select_participants(bids_dir, labels)
        found = discover(bids_dir, args.work_dir.resolve() / "bids_db", subjects)
        collections = [c for s in found for c in s.collections if c.suffix == args.collection]
        if not collections:
            raise NothingSelectedError(f"no {args.collection} collection in {bids_dir}")
        collection = collections[0]
    else:
        collection = _sidecar_collection(args.collection, sources)
    # The network maps what the collection's model fits (MTS: the VFA model of its mt-off pair).
    model = resolve_collection(collection).model.estimation_model()
    plan = locate_estimator(model, model_dir=args.model_dir)
    if plan.weights is not None and not args.force:
        print(f"an estimator for this protocol exists: {plan.weights} (use --force to train "
              "another into --model-dir)")
        return 0
    workflow = init_qmri_training_wf(model_name=model.name, protocol=plan.protocol,
                                     cache_dir=args.model_dir.resolve(),
                                     omp_nthreads=args.threads, seed=args.seed, loss=args.loss,
                                     time_budget_s=args.budget_s, force=args.force,
                                     name=f"train_{plan.stem}_wf".replace("-", "_"))
    _run(workflow, args.work_dir)
    card = read_card(args.model_dir / plan.stem)
    print(f"estimator {args.model_dir / plan.stem}.safetensors; protocol {plan.protocol}; "
          f"validation: {card.get('validation', {}).get('efficiency_median')}")
    return 0
