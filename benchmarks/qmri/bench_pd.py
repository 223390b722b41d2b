"""Receive-corrected PD (``PDmap``) against the demo's truth, and on ds-real brains.

    python benchmarks/qmri/bench_pd.py [--demo DIR] [--quick]

(a) Demo (known truth: PD = the phantom's water fraction, CSF = 100 p.u.). The demo's qMRI
    collections carry no receive field (``qmri_bids/demo/qmri_collections.py`` multiplies only
    the anatomical T1w/T2w by it), so two scenarios per subject and collection (VFA with its
    TB1map, TR-aware IRT1):
    * ``as written``: the demo's images; the correction must not add error;
    * ``x receive``: the same collection re-simulated from the demo's truth maps (T1map, M0map,
      TB1map, NoiseSigma of ``derivatives/groundtruth``) with the demo's own receive field
      (``desc-truefield_T1w``, the field of that subject's anatomical images) applied to the
      signal before the Rician noise, as a receive coil does.
    Each collection is mapped once with the default (network) estimator; the PD step then runs
    with the receive field left in (``none``), removed by the bias CNN (``cnn``, the default)
    and by N4 (``n4``). Errors: median |PD / truth - 1| in GM+WM (and p90), median PD error in
    p.u. in WM and GM, and the receive field's error against the true field (median
    |estimate / truth - 1| in GM+WM, both scaled to median 1 over the estimated voxels).
(b) ds-real: sub-brain01 MTS (mt-off pair, no B1 map) and sub-brain02 VFA with its TB1map, NLLS
    estimates: PD in the WM and GM classes of a 2-class k-means of T1 (0.3-2.5 s) against the
    usual 3 T values (WM ~69 p.u., the hMRI calibration value; GM ~80 p.u.; Tofts 2003).

Writes ``benchmarks/qmri/results/pd.json`` and ``pd.md``; records the bias CNN's sha256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from qmri_bids.bias.weights import load_model
from qmri_bids.demo.qmri_collections import slab
from qmri_bids.demo.volumes import add_rician_noise, save_volume
from qmri_bids.qmri.mapping import map_collection
from qmri_bids.qmri.plan import plan_collection
from qmri_bids.qmri.protocols import collection_from_paths, resolve_collection
from qmri_bids.qmri.receive import proton_density, voxel_spacing

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / "scratch"
REPO = HERE.parents[1]
DS = Path(os.environ.get("QMRI_SHARED_DATA", REPO.parent / "shared" / "data")) / "ds-real"
METHODS = ("none", "cnn", "n4")
COLLECTIONS = (("vfa", "VFA"), ("irt1", "IRT1"))


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))


def _receive_weighted(demo: Path, sub: str, coll: str, suffix: str, out: Path) -> list[Path]:
    """The collection re-simulated from the demo's truth with the subject's receive field."""
    gt = demo / "derivatives" / "groundtruth" / f"sub-{sub}" / "anat"
    paths = sorted((demo / f"sub-{sub}" / "anat").glob(f"sub-{sub}_*_{suffix}.nii.gz"))
    resolved = resolve_collection(collection_from_paths(paths, suffix))
    model, members = resolved.model, resolved.members
    t1 = _load(gt / f"sub-{sub}_acq-{coll}_T1map.nii.gz")
    m0 = _load(gt / f"sub-{sub}_acq-{coll}_M0map.nii.gz")
    field = _load(gt / f"sub-{sub}_desc-truefield_T1w.nii.gz")
    field = field[..., slab(field.shape[2], t1.shape[2])]
    b1 = gt / f"sub-{sub}_acq-{coll}_TB1map.nii.gz"
    b1 = torch.as_tensor(_load(b1)) if b1.is_file() else None
    sigma = json.loads((gt / f"sub-{sub}_acq-{coll}_T1map.json").read_text())["NoiseSigma"]
    with torch.no_grad():
        clean = model(torch.as_tensor(np.stack([m0 * field, t1], -1)), b1).numpy()
    noisy = add_rician_noise(clean, sigma, np.random.default_rng([int(sub), len(coll)]))
    affine = nib.load(str(paths[0])).affine
    written = []
    for i, member in enumerate(members):
        target = out / f"sub-{sub}" / Path(member.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_volume(noisy[..., i], affine, target)
        target.with_name(target.name.replace(".nii.gz", ".json")).write_text(
            json.dumps(member.metadata))
        written.append(target)
    return written


def bench_demo(demo: Path, subjects: list[str], bias_model) -> list[dict]:
    rows = []
    for sub in subjects:
        gt = demo / "derivatives" / "groundtruth" / f"sub-{sub}" / "anat"
        pd_full = 100.0 * _load(gt / f"sub-{sub}_PDmap.nii.gz")
        field_full = _load(gt / f"sub-{sub}_desc-truefield_T1w.nii.gz")
        for coll, suffix in COLLECTIONS:
            labels = _load(gt / f"sub-{sub}_acq-{coll}_desc-tissue_dseg.nii.gz").astype(int)
            z = slab(pd_full.shape[2], labels.shape[2])
            truth, true_field = pd_full[..., z], field_full[..., z]
            b1 = demo / f"sub-{sub}" / "fmap" / f"sub-{sub}_TB1map.nii.gz"
            if not b1.is_file():  # sub-02: B1 from a TB1DAM collection; use its true map here
                b1 = gt / f"sub-{sub}_acq-{coll}_TB1map.nii.gz"
            b1 = b1 if suffix == "VFA" and b1.is_file() else None
            written = sorted((demo / f"sub-{sub}" / "anat").glob(f"sub-{sub}_*_{suffix}.nii.gz"))
            for scenario, paths in (
                    ("as written", written),
                    ("x receive", _receive_weighted(demo, sub, coll, suffix, SCRATCH / "pd"))):
                collection = collection_from_paths(paths, suffix, b1)
                result = map_collection(collection, plan_collection(collection),
                                        receive_method="none")
                primary = result.mapsets[0].values
                brain, mask = np.isin(labels, (4, 5)), result.mask
                for method in METHODS:
                    t0 = time.perf_counter()
                    pd = proton_density(primary["M0"], primary["T1"], mask,
                                        voxel_spacing(result.affine), method=method,
                                        bias_model=bias_model)
                    seconds = time.perf_counter() - t0
                    rel = np.abs(pd.pd / truth - 1)
                    row = {"subject": sub, "collection": coll, "scenario": scenario,
                           "method": method, "estimator": result.mapsets[0].estimator,
                           "median_abs_err_pct": float(100 * np.nanmedian(rel[brain])),
                           "p90_abs_err_pct": float(100 * np.nanpercentile(rel[brain], 90)),
                           "WM_err_pu": float(np.nanmedian((pd.pd - truth)[labels == 5])),
                           "GM_err_pu": float(np.nanmedian((pd.pd - truth)[labels == 4])),
                           "reference_voxels": pd.reference.get("Voxels"), "seconds": seconds}
                    if pd.receive is not None:
                        # the demo's images carry no receive field: there the truth is 1
                        field = true_field if scenario == "x receive" else np.ones_like(truth)
                        scaled = field / np.median(field[mask])
                        row["field_err_pct"] = float(100 * np.median(
                            np.abs(pd.receive[brain] / scaled[brain] - 1)))
                    rows.append(row)
                    print(f"sub-{sub} {coll} {scenario:10s} {method:4s} "
                          f"|err| {row['median_abs_err_pct']:.2f} % "
                          f"(WM {row['WM_err_pu']:+.2f}, GM {row['GM_err_pu']:+.2f} p.u.) "
                          f"{seconds:.1f} s", flush=True)
    return rows


def _kmeans2(values: np.ndarray, iters: int = 50) -> np.ndarray:
    """Labels (0 = low, 1 = high) of a 2-class 1-D k-means."""
    c = np.percentile(values, [25, 75]).astype(float)
    for _ in range(iters):
        lab = np.abs(values[:, None] - c[None]).argmin(1)
        c = np.array([values[lab == k].mean() for k in (0, 1)])
    return np.abs(values[:, None] - c[None]).argmin(1)


def bench_real(bias_model) -> list[dict]:
    cases = [("sub-brain01 MTS (no B1 map)", "brain01", "MTS", None),
             ("sub-brain02 VFA + TB1map", "brain02", "VFA",
              DS / "sub-brain02" / "fmap" / "sub-brain02_TB1map.nii.gz")]
    rows = []
    for name, sub, suffix, b1 in cases:
        paths = sorted((DS / f"sub-{sub}" / "anat").glob(f"sub-{sub}_*_{suffix}.nii.gz"))
        collection = collection_from_paths(paths, suffix, b1)
        result = map_collection(collection, plan_collection(collection, estimators=("nlls",)),
                                receive_method="none")
        values, mask = result.mapsets[0].values, result.mask
        t1 = values["T1"]
        tissue = mask & np.isfinite(t1) & (t1 > 0.3) & (t1 < 2.5)
        labels = np.full(t1.shape, -1)
        labels[tissue] = _kmeans2(t1[tissue])  # 0 = WM (short T1), 1 = GM
        for method in METHODS:
            pd = proton_density(values["M0"], t1, mask, voxel_spacing(result.affine),
                                method=method, bias_model=bias_model)
            row = {"data": name, "method": method, "reference": pd.reference.get("Region"),
                   "reference_voxels": pd.reference.get("Voxels")}
            if pd.pd is not None:
                row.update({"WM_pu": float(np.median(pd.pd[labels == 0])),
                            "GM_pu": float(np.median(pd.pd[labels == 1])),
                            "WM_cv": float(np.std(pd.pd[labels == 0])
                                           / np.mean(pd.pd[labels == 0]))})
            rows.append(row)
            print(f"{name} {method}: WM {row.get('WM_pu', float('nan')):.1f} GM "
                  f"{row.get('GM_pu', float('nan')):.1f} p.u.", flush=True)
    return rows


def _markdown(demo_rows: list[dict], real_rows: list[dict], model) -> str:
    lines = [f"Bias CNN: `{model.name}` sha256 `{model.sha256}`", "",
             "| subject | collection | scenario | none | CNN | N4 | field error CNN / N4 |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["subject"], r["collection"], r["scenario"]) for r in demo_rows},
                  key=lambda k: (k[0], k[1], k[2] != "as written"))
    for key in keys:
        by = {r["method"]: r for r in demo_rows
              if (r["subject"], r["collection"], r["scenario"]) == key}
        cells = [f"{by[m]['median_abs_err_pct']:.2f} %" for m in METHODS]
        fields = " / ".join(f"{by[m]['field_err_pct']:.1f} %" for m in ("cnn", "n4"))
        lines.append(f"| sub-{key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells)
                     + f" | {fields} |")
    lines += ["", "| data | method | WM p.u. | GM p.u. | WM CV |", "|---|---|---|---|---|"]
    for r in real_rows:
        lines.append(f"| {r['data']} | {r['method']} | {r.get('WM_pu', float('nan')):.1f} | "
                     f"{r.get('GM_pu', float('nan')):.1f} | {r.get('WM_cv', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=SCRATCH / "demo",
                        help="demo dataset (written there if absent)")
    parser.add_argument("--quick", action="store_true", help="sub-01 only, no ds-real")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if not (args.demo / "dataset_description.json").is_file():
        from qmri_bids.demo.dataset import DemoSettings, write_demo_dataset

        write_demo_dataset(args.demo, DemoSettings())
    model = load_model()
    subjects = ["01"] if args.quick else ["01", "02"]
    t0 = time.perf_counter()
    demo_rows = bench_demo(args.demo, subjects, model)
    real_rows = [] if args.quick or not DS.is_dir() else bench_real(model)
    out = {"bias_model": {"name": model.name, "sha256": model.sha256},
           "torch_threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
           "demo": demo_rows, "ds_real": real_rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pd.json").write_text(json.dumps(out, indent=1))
    table = _markdown(demo_rows, real_rows, model)
    (RESULTS / "pd.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
