"""N4 baseline timing: seconds per volume on 2 cores, and one full participant run.

Run from the repository root:

    python benchmarks/bench_n4.py [--repeats 3]

It times ``qmri_bids.bias.n4.n4_correct`` (fMRIPrep-equivalent settings) on ds-real sub-brain01
``T1w`` (128x128x96, 1.5 mm) and on the demo phantom's T1w (80x96x72, 2.2 mm), with ITK limited
to 2 threads, then times a whole ``qmri-bids ... participant --bias-method n4`` run of one demo
participant (discovery, validation, N4 on T1w/T2w, qMRI mapping of its collections, derivatives). Results: stdout (markdown) and
``benchmarks/results/n4.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DS_REAL = Path(os.environ.get("QMRI_SHARED_DATA", REPO.parent / "shared" / "data")) / "ds-real"


def time_n4(path: Path, repeats: int) -> dict:
    import SimpleITK as sitk

    from qmri_bids.bias.n4 import n4_correct
    from qmri_bids.image_io import load_image

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    img = load_image(path)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n4_correct(img.data, img.spacing)
        times.append(time.perf_counter() - start)
    return {"image": str(path), "shape": list(img.data.shape), "spacing": list(img.spacing),
            "seconds_median": statistics.median(times), "seconds_all": times}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict = {"host": platform.processor() or platform.machine(), "threads": 2,
                     "python": sys.version.split()[0], "volumes": []}
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        subprocess.run([sys.executable, "-m", "qmri_bids", "demo", str(demo), "--subjects", "1"],
                       check=True, capture_output=True)
        images = [demo / "sub-01" / "anat" / "sub-01_T1w.nii.gz"]
        if (DS_REAL / "sub-brain01").is_dir():
            images.insert(0, DS_REAL / "sub-brain01" / "anat" / "sub-brain01_T1w.nii.gz")
        else:
            print(f"note: {DS_REAL} absent; only the demo image is timed", file=sys.stderr)
        for image in images:
            results["volumes"].append(time_n4(image, args.repeats))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "qmri_bids", str(demo), str(Path(tmp) / "out"), "participant",
             "-w", str(Path(tmp) / "work"), "--nprocs", "2", "--omp-nthreads", "2",
             "--bias-method", "n4"], capture_output=True, text=True, check=False)
        results["participant_run_seconds"] = time.perf_counter() - start
        results["participant_run_exit_code"] = proc.returncode
    print(f"| image | shape | N4 s/volume (median of {args.repeats}, 2 threads) |")
    print("|---|---|---|")
    for vol in results["volumes"]:
        name = Path(vol["image"]).name
        print(f"| {name} | {'x'.join(map(str, vol['shape']))} | {vol['seconds_median']:.2f} |")
    print(f"\nwhole participant run (demo sub-01: N4 on T1w and T2w, qMRI maps of its VFA, IRT1, "
          f"MESE and MRF collections; 2 procs): "
          f"{results['participant_run_seconds']:.1f} s, exit {proc.returncode}")
    out = REPO / "benchmarks" / "results" / "n4.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
