"""``qmri-bids demo DIR``: write the simulated demo dataset."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qmri_bids.errors import CannotWriteError, UsageError


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qmri-bids demo",
                                     description="Write a small simulated BIDS dataset "
                                                 "(head phantom with known bias field).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--subjects", type=int, default=2, help="number of participants")
    parser.add_argument("--seed", type=int, default=20221)
    parser.add_argument("--no-qmri", action="store_true",
                        help="only the T1w/T2w images (no VFA/TB1map/IRT1/MESE/MRF collections)")
    parser.add_argument("--nist-mrf", type=Path, default=None, metavar="REFERENCE_DIR",
                        help="also write sub-nistmrf: MRF simulated from the NIST MnCl2 3 T "
                             "maps (nist_mncl2_3p0T_*_T1map/_T2map.nii.gz) in REFERENCE_DIR")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            raise UsageError("invalid arguments to 'qmri-bids demo'") from exc
        return 0
    if args.subjects < 1:
        raise UsageError("--subjects must be at least 1")
    from qmri_bids.demo.dataset import DemoSettings, write_demo_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s | %(message)s",
                        stream=sys.stderr)
    try:
        out = write_demo_dataset(args.out_dir, DemoSettings(
            n_subjects=args.subjects, seed=args.seed, qmri=not args.no_qmri,
            nist_mrf_dir=args.nist_mrf))
    except PermissionError as exc:
        raise CannotWriteError(f"cannot write the demo dataset to {args.out_dir}: {exc}") from exc
    print(f"demo dataset written to {out}")
    return 0
