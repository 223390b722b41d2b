"""Regenerate the pretrained estimators shipped in ``qmri_bids/models/qmri``.

Usage (from the repository root)::

    python benchmarks/qmri/train_shipped.py            # VFA, IRT1, MESE (~1-2 min each, 1 thread)
    python benchmarks/qmri/train_shipped.py --only vfa --steps 4000
    python benchmarks/qmri/train_shipped.py --mrf      # also the default MRF schedule (slow: the
                                                       # CRB pool of a 500-point EPG signal)

Protocols (the ds-real demo data):

* ``vfa``: flip angles [3, 20] deg, TR 0.015 s (sub-brain02);
* ``irt1``: TIs 0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4, 1.7 s (sub-brain03; Barral's
  3-parameter magnitude model);
* ``mese-mono``: TE = 0.0129·k s, k = 1..10 (sub-kidney01);
* ``mrf``: :func:`qmri_bids.qmri.models.mrf.default_mrf_schedule`, ``estimate_b1=False``
  (nominal B1; T1, T2 and the complex M0).

Each network is trained with the CRB loss (Zhang et al., MRM 2022), seed 0, SNR 10-200
(relative to the brightest image), validated on a held-out grid at SNR 20/50/100 and written
as ``<model>-<protocol hash>.safetensors`` + ``.json`` model card. The file names follow
:func:`qmri_bids.qmri.model_store.estimator_stem`, so ``find_or_train`` picks them up for the
same protocol (rounded to 6 significant digits).
"""

from __future__ import annotations

import argparse
import logging
import time

from qmri_bids.qmri.model_store import (
    SHIPPED_DIR,
    estimator_stem,
    export_estimator,
    protocol_dict,
    train_and_card,
)
from qmri_bids.qmri.models import IRT1Model, MESEMonoModel, VFAModel

DEMO_MODELS = {
    "vfa": lambda: VFAModel([3.0, 20.0], 0.015),
    "irt1": lambda: IRT1Model([0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4, 1.7]),
    "mese-mono": lambda: MESEMonoModel([round(0.0129 * k, 6) for k in range(1, 11)]),
}

#: training settings of the shipped models (deterministic on CPU: fixed n_steps, seed)
SHIPPED_SETTINGS = {"n_steps": 4000, "batch_size": 1024, "seed": 0, "loss": "crb",
                    "snr_range": (10.0, 200.0), "pool_size": 200_000}
MRF_SETTINGS = {"n_steps": 10000, "batch_size": 256, "seed": 0, "loss": "crb",
                "snr_range": (10.0, 200.0), "pool_size": 20_000, "learning_rate": 1e-3}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=[*DEMO_MODELS, "mrf"], help="subset to train")
    ap.add_argument("--mrf", action="store_true", help="also train the default MRF schedule")
    ap.add_argument("--steps", type=int, default=None, help="override n_steps")
    ap.add_argument("--out", default=str(SHIPPED_DIR), help="output directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = args.only or [*DEMO_MODELS, *(["mrf"] if args.mrf else [])]
    for name in names:
        if name == "mrf":
            from qmri_bids.qmri.models.mrf import MRFModel

            model, settings = MRFModel(estimate_b1=False), dict(MRF_SETTINGS)
        else:
            model, settings = DEMO_MODELS[name](), dict(SHIPPED_SETTINGS)
        if args.steps:
            settings["n_steps"] = args.steps
        t0 = time.perf_counter()
        proto = protocol_dict(model)
        net, card = train_and_card(model, proto, **settings)
        stem = f"{args.out}/{estimator_stem(model.name, proto)}"
        w, _c = export_estimator(net, stem, card)
        print(f"{name}: {w} ({time.perf_counter() - t0:.0f} s) efficiency "
              f"{card['validation']['efficiency_median']}")


if __name__ == "__main__":
    main()
