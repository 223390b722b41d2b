"""Check the derivatives of a container or cluster run the way the native tests do.

    python tests/container/check_derivatives.py BIDS_DIR OUT_DIR [--participant-label L ...]
        [--container docker|apptainer] [--method cnn n4]

For every anatomical T1w/T2w/PDw/FLAIR image of each selected participant, the bias-corrected
image and its field must exist (``desc-<method>`` and ``desc-<method>field``; by default the
methods are those found in the outputs, cnn and/or n4, at least one; ``--method cnn n4`` requires
those), load with nibabel,
have the input's shape and affine, hold finite values, and the field must be positive. The
derivatives dataset must have its dataset_description.json (with the container type when asked)
and a run record with exit code 0. Exits 0 when all checks pass, 1 otherwise (listing each
problem). Standard library + numpy + nibabel only, so that it runs on the host, not in the image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BIAS_SUFFIXES = ("T1w", "T2w", "PDw", "FLAIR")
METHODS = ("cnn", "n4")


def _labels(bids_dir: Path, wanted: list[str] | None) -> list[str]:
    if wanted:
        return [w.removeprefix("sub-") for w in wanted]
    return sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())


def _inputs(bids_dir: Path, label: str) -> list[Path]:
    found = []
    for suffix in BIAS_SUFFIXES:
        found += sorted((bids_dir / f"sub-{label}").rglob(f"anat/sub-{label}*_{suffix}.nii*"))
    return found


def _expected(bids_dir: Path, out_dir: Path, src: Path, desc: str) -> Path:
    rel = src.relative_to(bids_dir)
    name = rel.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    stem = name[: -len(ext)]
    entities, suffix = stem.rsplit("_", 1)
    return out_dir / rel.parent / f"{entities}_desc-{desc}_{suffix}.nii.gz"


def check(bids_dir: Path, out_dir: Path, labels: list[str] | None, container: str | None,
          methods: list[str] | str | None = None) -> list[str]:
    import nibabel as nib
    import numpy as np

    problems: list[str] = []
    desc_file = out_dir / "dataset_description.json"
    if not desc_file.is_file():
        problems.append(f"missing {desc_file}")
    else:
        desc = json.loads(desc_file.read_text())
        if desc.get("DatasetType") != "derivative":
            problems.append(f"{desc_file}: DatasetType is {desc.get('DatasetType')!r}")
        if container:
            kinds = [(g.get("Container") or {}).get("Type") for g in desc.get("GeneratedBy", [])]
            if container not in kinds:
                problems.append(f"{desc_file}: GeneratedBy Container Type {kinds}, "
                                f"expected {container!r}")
    runs = sorted((out_dir / "logs").glob("run_*.json"))
    if not runs:
        problems.append(f"no run record in {out_dir / 'logs'}")
    elif all(json.loads(r.read_text()).get("exit_code") != 0 for r in runs):
        problems.append(f"no run in {out_dir / 'logs'} ended with exit code 0")

    checked = 0
    for label in _labels(bids_dir, labels):
        inputs = _inputs(bids_dir, label)
        if not inputs:
            problems.append(f"sub-{label}: no anatomical input in {bids_dir}")
        for src in inputs:
            src_img = nib.load(src)
            if isinstance(methods, str):
                wanted = [methods]
            elif methods:
                wanted = list(methods)
            else:
                wanted = [m for m in METHODS if _expected(bids_dir, out_dir, src, m).is_file()]
                if not wanted:
                    problems.append(f"no bias-corrected output (desc-{'/'.join(METHODS)}) for "
                                    f"{src}")
            descs = [d for m in wanted for d in (m, f"{m}field")]
            for desc in descs:
                out = _expected(bids_dir, out_dir, src, desc)
                if not out.is_file():
                    problems.append(f"missing {out}")
                    continue
                try:
                    img = nib.load(out)
                    data = np.asanyarray(img.dataobj)
                except Exception as exc:  # noqa: BLE001 - any load failure is a finding
                    problems.append(f"{out}: cannot be loaded ({exc})")
                    continue
                if img.shape[:3] != src_img.shape[:3]:
                    problems.append(f"{out}: shape {img.shape} != input {src_img.shape}")
                if not np.allclose(img.affine, src_img.affine, atol=1e-3):
                    problems.append(f"{out}: affine differs from the input's")
                if not np.all(np.isfinite(data)):
                    problems.append(f"{out}: non-finite values")
                if desc.endswith("field") and not np.all(data[np.isfinite(data)] > 0):
                    problems.append(f"{out}: the field is not positive everywhere")
                sidecar = Path(str(out)[: -len(".nii.gz")] + ".json")
                if not sidecar.is_file():
                    problems.append(f"missing sidecar {sidecar}")
                checked += 1
    if checked == 0 and not problems:
        problems.append("nothing was checked")
    print(f"check_derivatives: {checked} image(s) checked in {out_dir}, "
          f"{len(problems)} problem(s)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--participant-label", nargs="+", dest="labels")
    parser.add_argument("--container", choices=["docker", "apptainer"])
    parser.add_argument("--method", nargs="+", choices=METHODS, dest="methods",
                        help="bias methods whose outputs must exist (default: those found)")
    args = parser.parse_args(argv)
    problems = check(args.bids_dir, args.out_dir, args.labels, args.container, args.methods)
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
