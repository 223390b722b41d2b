"""Small derivative trees written with nibabel, shaped like the pipeline's outputs (names and
sidecars as the writers in qmri_bids.workflows.outputs / interfaces make them, with the sidecar
fixes of issue 10 applied), with run records; and IQM tables for large group tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from qmri_bids.reports.record import (
    CrashRecord,
    InputRecord,
    NodeRecord,
    RunRecord,
    SkippedInput,
    Step,
    write_run_record,
)

ANAT_SHAPE = (32, 36, 28)
MAP_SHAPE = (32, 36, 6)
SPACING = (2.0, 2.0, 2.5)
RUN_ID = "20260101-120000_0badc0de"
VFA_T1 = {1: 0.9, 2: 1.5}  # dseg label -> T1 (s) of the synthetic VFA maps
DSEG_NAMES = {1: "WM", 2: "GM"}


def _save(path: Path, data: np.ndarray, spacing=SPACING, meta: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, np.float32), np.diag([*spacing, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    if meta is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
    return path


def ellipsoid(shape, radii=(0.42, 0.4, 0.4)) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape], indexing="ij")
    return sum((g / r) ** 2 for g, r in zip(grids, radii, strict=False)) <= 1.0


def anat_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw, true image, field): two tissues in an ellipsoid, a smooth field, Rician-free
    noise; raw = true x field."""
    rng = np.random.default_rng(seed)
    obj = ellipsoid(ANAT_SHAPE)
    inner = ellipsoid(ANAT_SHAPE, (0.25, 0.22, 0.22))
    true = np.where(obj, np.where(inner, 900.0, 600.0), 0.0)
    true = np.where(obj, true + rng.normal(0, 15, ANAT_SHAPE), np.abs(rng.normal(0, 5,
                                                                                 ANAT_SHAPE)))
    x = np.linspace(-1, 1, ANAT_SHAPE[0])[:, None, None]
    z = np.linspace(-1, 1, ANAT_SHAPE[2])[None, None, :]
    field = np.broadcast_to(1.0 + 0.25 * x + 0.1 * z, ANAT_SHAPE).astype(np.float64)
    return true * field, true, field


def sidecar_sources(*names: str) -> list[str]:
    return [f"bids:raw:{n}" for n in names]


def write_participant(out: Path, subject: str = "01", *, methods=("cnn", "n4"),
                      references=("nlls",), crash: bool = False, seed: int = 0,
                      vfa_scale: float = 1.0, with_dseg: bool = True,
                      record: bool = True) -> dict:
    """One participant: a T1w corrected by ``methods``, a VFA collection (network maps,
    ``references`` maps, CRB SD maps), a single-slice MRF collection, a dseg, a run record
    (dict requested and skipped for VFA), optionally a crash file."""
    anat = out / f"sub-{subject}" / "anat"
    raw, _true, field = anat_images(seed)
    src = f"sub-{subject}/anat/sub-{subject}_T1w.nii.gz"
    for method in methods:
        # Each method's estimate: the true field, a little off for N4 (its own normalisation).
        est = field * (1.02 if method == "n4" else 1.0)
        common = {"SkullStripped": False, "Sources": sidecar_sources(src),
                  "Method": f"{method} method"}
        if method == "cnn":
            common.update({"Model": "bias_cnn_v2", "ModelSHA256": "ab" * 32})
        else:
            common.update({"Parameters": {"shrink_factor": 4, "n_levels": 4,
                                          "n_iterations": 50, "bspline_distance_mm": 200.0,
                                          "mask": "Otsu foreground"}})
        _save(anat / f"sub-{subject}_desc-{method}_T1w.nii.gz", raw / est,
              meta={"Description": "bias-field corrected image (raw / field)", **common})
        _save(anat / f"sub-{subject}_desc-{method}field_T1w.nii.gz", est,
              meta={"Description": "multiplicative bias field", **common})
    mask = ellipsoid(MAP_SHAPE, (0.42, 0.4, 0.6))
    labels = np.where(mask, np.where(ellipsoid(MAP_SHAPE, (0.2, 0.2, 0.6)), 2, 1), 0)
    t1 = np.zeros(MAP_SHAPE)
    for lab, value in VFA_T1.items():
        t1[labels == lab] = value * vfa_scale
    members = [f"sub-{subject}/anat/sub-{subject}_flip-{i}_VFA.nii.gz" for i in (1, 2)]
    vfa_meta = {"SourceCollection": "VFA", "FlipAngle": [3.0, 20.0],
                "RepetitionTimeExcitation": 0.015, "MagneticFieldStrength": 3,
                "SkullStripped": False, "B1Map": f"sub-{subject}_TB1map.nii.gz",
                "Estimator": {"Name": "vfa-2cf98fb070e7a83e", "SHA256": "cd" * 32,
                              "Loss": "crb", "ProtocolHash": "2cf98fb070e7a83e"},
                "NoiseSigma": 0.58, "NoiseEstimation": "background (Rayleigh median of "
                                                       "voxels outside the object)",
                "Sources": sidecar_sources(*members)}
    net = "CRB-trained neural network (Zhang et al. 2022), vfa model"
    rng = np.random.default_rng(seed + 1)
    maps = {"T1map": (t1, "s"), "R1map": (np.where(mask, 1 / np.where(t1 > 0, t1, 1), 0),
                                          "1/s"),
            "M0map": (np.where(mask, 1000.0, 0.0), "arbitrary")}
    for suffix, (data, units) in maps.items():
        _save(anat / f"sub-{subject}_acq-vfa_{suffix}.nii.gz", data,
              meta={**vfa_meta, "Units": units, "Description": f"{suffix} (network)",
                    "EstimationAlgorithm": net})
        for ref in references:
            noisy = np.where(mask, data * (1 + rng.normal(0, 0.02, MAP_SHAPE)), 0)
            _save(anat / f"sub-{subject}_acq-vfa_desc-{ref}_{suffix}.nii.gz", noisy,
                  meta={**vfa_meta, "Units": units, "Description": f"{suffix} ({ref})",
                        "EstimationAlgorithm": f"{ref} estimator, vfa model"})
        if suffix != "R1map":
            _save(anat / f"sub-{subject}_acq-vfa_desc-crbsd_{suffix}.nii.gz",
                  np.where(mask, 0.05 * data, 0),
                  meta={**vfa_meta, "Units": units, "Description": "CRB SD",
                        "EstimationAlgorithm": "square root of the Cramér-Rao bound"})
    mrf_mask = ellipsoid((32, 36, 1), (0.42, 0.4, 10.0))
    mrf_meta = {"SourceCollection": "MRF", "MagneticFieldStrength": 3, "SkullStripped": False,
                "InversionTime": 0.02, "EchoTime": 0.002,
                "Estimator": {"Name": "mrf-e5d8ac784a108d06", "SHA256": "ef" * 32,
                              "Loss": "crb", "ProtocolHash": "e5d8ac784a108d06"},
                "NoiseSigma": 7.0, "NoiseEstimation": "background (Rayleigh median of voxels "
                                                      "outside the object)",
                "Sources": sidecar_sources(f"sub-{subject}/anat/sub-{subject}_part-mag_MRF"
                                           ".nii.gz")}
    _save(anat / f"sub-{subject}_acq-mrf_T2map.nii.gz", np.where(mrf_mask, 0.08, 0),
          meta={**mrf_meta, "Units": "s", "Description": "T2 (network)",
                "EstimationAlgorithm": "CRB-trained neural network (Zhang et al. 2022), mrf "
                                       "model"})
    if with_dseg:
        _save(anat / f"sub-{subject}_acq-vfa_desc-tissue_dseg.nii.gz", labels,
              meta={"Description": "tissue labels", "SkullStripped": False})
        (anat / f"sub-{subject}_acq-vfa_desc-tissue_dseg.tsv").write_text(
            "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in DSEG_NAMES.items()))
    log = out / f"sub-{subject}" / "log" / RUN_ID
    log.mkdir(parents=True, exist_ok=True)
    crash_path = None
    if crash:
        crash_path = log / f"crash-20260101-120100-root-map-{subject}.txt"
        crash_path.write_text(
            f"Node: qmri_bids_0_1_wf.sub_{subject}_wf.qmri_01_MESE_wf.map\n"
            "Working directory: /tmp/work\n\nNode inputs:\n\nplan = {}\n\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
            "qmri_bids.errors.BadDataError: sub-01_echo-1_MESE.nii.gz: EchoTime = 35 is "
            "outside (0, 1]\n")
    info = {"bias": methods, "crash": crash_path, "mask": mask, "labels": labels, "t1": t1,
            "field": field, "raw": raw}
    if record:
        write_run_record(make_record(out, subject, methods, references, crash_path), out)
    return info


def make_record(out: Path, subject: str, methods, references, crash_path) -> RunRecord:
    wf = f"qmri_bids_0_1_wf.sub_{subject}_wf"
    nodes = [NodeRecord(f"{wf}.anat_00_T1w_bias_wf.{m}", "done", 1000.0, 1003.0, 3.0, 0.5)
             for m in methods]
    nodes.append(NodeRecord(f"{wf}.qmri_00_VFA_wf.map", "done", 1003.0, 1010.5, 7.5, 1.0,
                            1.4))
    nodes.append(NodeRecord(f"{wf}.qmri_01_MESE_wf.map", "failed", 1003.0, 1004.0, None, 1.0))
    inputs = [
        InputRecord("anat", f"sub-{subject}_T1w.nii.gz", "T1w",
                    [str(out / f"raw/sub-{subject}/anat/sub-{subject}_T1w.nii.gz")],
                    "anat_00_T1w_bias_wf", "ds_anat_00_T1w_wf",
                    [Step(f"bias-{m}") for m in methods]),
        InputRecord("collection", "VFA", "VFA",
                    [f"/raw/sub-{subject}/anat/sub-{subject}_flip-{i}_VFA.nii.gz"
                     for i in (1, 2)], "qmri_00_VFA_wf", "ds_qmri_00_VFA_wf",
                    [Step("nn", detail={"network": "vfa-2cf98fb070e7a83e", "shipped": True,
                                        "train_on_demand": False,
                                        "validation": {"efficiency_median":
                                                       {"20": {"T1": 1.0116}}}}),
                     *[Step(r) for r in references],
                     Step("dict", "skipped", "not an estimator of the vfa model (it has nn, "
                                             "nlls)")],
                    b1map=f"/raw/sub-{subject}/fmap/sub-{subject}_TB1map.nii.gz",
                    model="vfa"),
        InputRecord("collection", "MESE", "MESE",
                    [f"/raw/sub-{subject}/anat/sub-{subject}_echo-{i}_MESE.nii.gz"
                     for i in (1, 2, 3)], "qmri_01_MESE_wf", "ds_qmri_01_MESE_wf",
                    [Step("nn")], model="mese-mono"),
    ]
    crashes = []
    if crash_path is not None:
        crashes = [CrashRecord(f"{wf}.qmri_01_MESE_wf.map", "qmri_bids.errors.BadDataError: "
                               "sub-01_echo-1_MESE.nii.gz: EchoTime = 35 is outside (0, 1]",
                               str(crash_path))]
    return RunRecord(
        run_id=RUN_ID, subject=subject, status="failed" if crash_path else "finished",
        exit_code=65 if crash_path else 0, started="2026-01-01T12:00:00+00:00",
        finished="2026-01-01T12:03:20+00:00", command=["qmri-bids", "bids", "out"],
        software={"qmri-bids": "0.1.0", "nipype": "1.11.0", "pybids": "0.22.0",
                  "torch": "2.13.0", "SimpleITK": "2.5.7"},
        python="3.11.7", device="cpu", device_reason="--device cpu was requested",
        hardware="test CPU", settings={"bias_methods": list(methods),
                                       "qmri_estimators": ["nn", *references, "dict"],
                                       "nprocs": 2, "omp_nthreads": 1, "mem_gb": 8},
        inputs=inputs, skipped=[SkippedInput("T2w", f"/raw/sub-{subject}/anat/"
                                             f"sub-{subject}_T2w.nii.gz",
                                             "its JSON sidecar is not valid JSON")],
        nodes=nodes, crashes=crashes)


def write_dataset(out: Path, n: int = 2, **kw) -> Path:
    """A derivatives dataset (dataset_description, .bidsignore) with ``n`` participants."""
    from qmri_bids.bids.derivatives import write_dataset_description

    out.mkdir(parents=True, exist_ok=True)
    raw = out.parent / f"{out.name}_raw"
    raw.mkdir(exist_ok=True)
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "raw",
                                                             "BIDSVersion": "1.10.0"}))
    write_dataset_description(out, raw)
    for i in range(1, n + 1):
        write_participant(out, f"{i:02d}", seed=i, **kw)
    return out


def write_iqm_tables(out: Path, n: int, outliers: dict[int, dict[str, float]],
                     seed: int = 0) -> list[str]:
    """``n`` participants with only an IQM table and a run record (no images): each metric
    uniform within +-5 % of its own centre (|robust z| < 1.4: no participant is an outlier by
    chance); ``outliers[i]``: metric -> value for participant i."""
    from qmri_bids.reports.iqm import Metric, iqm_path, write_iqms

    rng = np.random.default_rng(seed)
    centres = {"T1w_cnn_cv_before": ("bias", 0.30), "T1w_cnn_cv_after": ("bias", 0.20),
               "T1w_cnn_cjv_after": ("bias", 0.25), "T1w_cnn_field_range": ("bias", 0.3),
               "vfa_T1map_median": ("map", 1.1), "vfa_T1map_iqr": ("map", 0.4),
               "vfa_T1map_n": ("map", 16000.0), "vfa_T1map_WM_median": ("roi", 0.9)}
    labels = []
    for i in range(n):
        subject = f"{i:04d}"
        labels.append(subject)
        metrics = []
        for name, (kind, centre) in centres.items():
            value = outliers.get(i, {}).get(name, centre * (1 + 0.05 * rng.uniform(-1, 1)))
            metrics.append(Metric(name, kind, name.rsplit("_", 1)[0],
                                  "s" if "T1map" in name and not name.endswith("_n") else "",
                                  float(value)))
        write_iqms(iqm_path(out, subject), metrics)
        log = out / f"sub-{subject}" / "log" / RUN_ID
        log.mkdir(parents=True, exist_ok=True)
        (log / "run_record.json").write_text(json.dumps(
            {"schema_version": "1.0", "run_id": RUN_ID, "subject": subject,
             "status": "finished", "exit_code": 0}))
    return labels
