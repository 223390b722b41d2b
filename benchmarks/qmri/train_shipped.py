"""Regenerate the pretrained estimators shipped in ``qmri_bids/models/qmri``.

Usage (from the repository root)::

    python benchmarks/qmri/train_shipped.py            # every protocol below (~1-3 min each)
    python benchmarks/qmri/train_shipped.py --only vfa --steps 4000

The MRF network of the default schedule is trained by ``benchmarks/qmri/train_mrf.py`` (hours:
the CRB pool of a 500-point EPG signal, and an ablation).

Protocols (the ds-real demo data):

* ``vfa``: flip angles [3, 20] deg, TR 0.015 s (sub-brain02, the demo);
* ``irt1``: TIs 0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4, 1.7 s (sub-brain03; Barral's
  3-parameter magnitude model);
* ``irt1-tr``: the same TIs with TR 2.55 s (the demo's IR, TR-aware model);
* ``irt1-tr-phantom``: TIs 0.1-1.8 s every 0.1 s, TR 6 s (ds-real sub-phantom01 without its
  inconsistent 2.0 s member);
* ``vfa-mt``: the mt-off pair of ds-real sub-brain01's MTS collection (6 deg / TR 28 ms and
  20 deg / TR 18 ms);
* ``mese-epg`` / ``mese-epg-b1``: the CPMG train TE = 0.0129·k s, k = 1..10 (sub-kidney01, the
  demo) with the EPG model, B1 estimated / B1 a known input;

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
    train_and_card,
)
from qmri_bids.qmri.models import IRT1Model, IRT1TRModel, MESEMonoModel, VFAModel

# The demo's (and ds-real sub-kidney01's) CPMG train: mapped with the EPG model (B1 estimated,
# or a known-B1 input when a TB1map is given), see MESEMonoModel.estimation_model.
_MESE = MESEMonoModel([round(0.0129 * k, 6) for k in range(1, 11)])
_DEMO_TIS = [0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4, 1.7]
DEMO_MODELS = {
    "vfa": lambda: VFAModel([3.0, 20.0], 0.015),
    "irt1": lambda: IRT1Model(_DEMO_TIS),
    "irt1-tr": lambda: IRT1TRModel(_DEMO_TIS, 2.55),
    "irt1-tr-phantom": lambda: IRT1TRModel([round(0.1 * k, 6) for k in range(1, 19)], 6.0),
    "vfa-mt": lambda: VFAModel([6.0, 20.0], [0.028, 0.018]),
    "mese-epg": lambda: _MESE.estimation_model(b1_known=False),
    "mese-epg-b1": lambda: _MESE.estimation_model(b1_known=True),
}

#: training settings of the shipped models (deterministic on CPU: fixed n_steps, seed)
SHIPPED_SETTINGS = {"n_steps": 4000, "batch_size": 1024, "seed": 0, "loss": "crb",
                    "snr_range": (10.0, 200.0), "pool_size": 200_000}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(DEMO_MODELS), help="subset to train")
    ap.add_argument("--steps", type=int, default=None, help="override n_steps")
    ap.add_argument("--out", default=str(SHIPPED_DIR), help="output directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.only or list(DEMO_MODELS):
        model, settings = DEMO_MODELS[name](), dict(SHIPPED_SETTINGS)
        if args.steps:
            settings["n_steps"] = args.steps
        t0 = time.perf_counter()
        proto = model.to_protocol()
        net, card = train_and_card(model, proto, **settings)
        stem = f"{args.out}/{estimator_stem(model.name, proto)}"
        w, _c = export_estimator(net, stem, card)
        print(f"{name}: {w} ({time.perf_counter() - t0:.0f} s) efficiency "
              f"{card['validation']['efficiency_median']}, gate at SNR 50 "
              f"{'passed' if card['validation']['gate']['Passed'] else 'FAILED'}", flush=True)


if __name__ == "__main__":
    main()
