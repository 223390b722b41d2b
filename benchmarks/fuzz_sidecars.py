"""Sidecar fuzzing at scale: many seeded cases of ``tests/hardening/sidecar_fuzz.py``.

Run from the repository root:

    python benchmarks/fuzz_sidecars.py [--cases 500] [--seed 1] [--keep-failures DIR]

Each case corrupts one field (or the whole file) of one sidecar of a dataset holding every
collection kind, runs qmri-bids in-process up to the workflow, and checks exit 0 or 65, no
traceback, and the file named with 65. Prints one line per failing case and a summary (exit
codes, seconds per case); the exit status is the number of failing cases (capped at 100).
With ``--keep-failures``, the corrupted dataset of each failing case is kept there.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hardening.sidecar_fuzz import make_base_dataset, make_cases, run_case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-failures", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qmri-fuzz-") as tmp:
        base = make_base_dataset(Path(tmp) / "base")
        cases = make_cases(base, args.seed, args.cases)
        (Path(tmp) / "baseline").mkdir()
        baseline = run_case(base, Path(tmp) / "baseline", None)
        if baseline.code != 0:
            print(f"note: the base dataset itself exits {baseline.code}; only what each "
                  "corruption adds is checked:\n  " + "\n  ".join(sorted(baseline.lines)))
        codes: collections.Counter[int] = collections.Counter()
        failures = 0
        t0 = time.monotonic()
        for index, case in enumerate(cases):
            work = Path(tmp) / f"case{index}"
            work.mkdir()
            outcome = run_case(base, work, case)
            codes[outcome.code] += 1
            problems = outcome.problems(baseline)
            if problems:
                failures += 1
                final = outcome.stderr.split("qmri-bids:")[-1].strip().replace("\n", " | ")
                print(f"FAIL {case.id}: exit {outcome.code}: {'; '.join(problems)}: "
                      f"{final[:400]}", flush=True)
                if args.keep_failures:
                    shutil.copytree(work / "ds", args.keep_failures / f"case{index}")
            shutil.rmtree(work)
        seconds = time.monotonic() - t0
    print(f"{len(cases)} cases (seed {args.seed}): {failures} failing; exit codes "
          f"{dict(sorted(codes.items()))}; {seconds / max(1, len(cases)):.2f} s per case")
    return min(failures, 100)


if __name__ == "__main__":
    raise SystemExit(main())
