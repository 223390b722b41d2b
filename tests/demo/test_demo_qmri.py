"""The demo's qMRI collections: discovery, fits against the ground truth, determinism, BIDS."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.demo.dataset import DemoSettings, write_demo_dataset
from qmri_bids.demo.qmri_collections import (
    B1_RANGE,
    IRT1_TI,
    MESE_TE,
    VFA_FLIP_DEG,
    VFA_TR,
    write_nist_mrf_subject,
)
from qmri_bids.qmri.protocols import collection_from_paths

WM, GM = 5, 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", DemoSettings(n_subjects=1))


def _gt(demo: Path, name: str) -> np.ndarray:
    path = demo / "derivatives" / "groundtruth" / "sub-01" / "anat" / f"sub-01_{name}.nii.gz"
    return np.asarray(nib.load(str(path)).dataobj)


def _members(demo: Path, pattern: str) -> list[Path]:
    paths = sorted((demo / "sub-01" / "anat").glob(pattern),
                   key=lambda p: int(p.name.split("_")[1].split("-")[1]))
    assert paths, pattern
    return paths


def test_files_protocols_and_geometry(demo):
    anat = demo / "sub-01" / "anat"
    vfa = _members(demo, "sub-01_flip-*_VFA.nii.gz")
    assert [json.loads(p.with_name(p.name[:-7] + ".json").read_text())["FlipAngle"]
            for p in vfa] == list(VFA_FLIP_DEG)
    meta = json.loads((anat / "sub-01_flip-1_VFA.json").read_text())
    assert meta["RepetitionTimeExcitation"] == VFA_TR and meta["MagneticFieldStrength"] == 3
    assert len(_members(demo, "sub-01_inv-*_IRT1.nii.gz")) == len(IRT1_TI)
    assert "RepetitionTime" in json.loads((anat / "sub-01_inv-1_IRT1.json").read_text())
    mese = json.loads((anat / "sub-01_echo-10_MESE.json").read_text())
    assert mese["EchoTime"] == MESE_TE[-1] and mese["RefocusingFlipAngle"] == 180
    # slab geometry: 8 central slices, affine shifted to the first one
    full = nib.load(str(demo / "sub-01" / "anat" / "sub-01_T1w.nii.gz"))
    slab = nib.load(str(vfa[0]))
    assert slab.shape == (*full.shape[:2], 8)
    z0 = (full.shape[2] - 8) // 2
    np.testing.assert_allclose(slab.affine, full.affine @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z0], [0, 0, 0, 1]]), atol=1e-4)
    labels_full = _gt(demo, "desc-tissue_dseg")
    np.testing.assert_array_equal(_gt(demo, "acq-vfa_desc-tissue_dseg"),
                                  labels_full[..., z0:z0 + 8])
    # B1: smooth, within range, the raw TB1map equals the truth, IntendedFor BIDS URIs
    b1 = np.asarray(nib.load(str(demo / "sub-01" / "fmap" / "sub-01_TB1map.nii.gz")).dataobj)
    np.testing.assert_array_equal(b1, _gt(demo, "acq-vfa_TB1map"))
    assert b1.min() >= B1_RANGE[0] - 1e-6 and b1.max() <= B1_RANGE[1] + 1e-6
    assert b1.max() - b1.min() > 0.2
    side = json.loads((demo / "sub-01" / "fmap" / "sub-01_TB1map.json").read_text())
    assert side["IntendedFor"] == [f"bids::sub-01/anat/{p.name}" for p in vfa]
    for coll in ("vfa", "irt1", "mese", "mrf"):
        gt = demo / "derivatives" / "groundtruth" / "sub-01" / "anat"
        sidecar = next(gt.glob(f"sub-01_acq-{coll}_*map.json"))
        assert json.loads(sidecar.read_text())["NoiseSigma"] > 0


def test_discovery_finds_collections_with_b1(demo, tmp_path):
    from qmri_bids.bids.discovery import discover

    (res,) = discover(demo, tmp_path / "db", ["01"])
    found = {c.suffix: c for c in res.collections}
    assert set(found) == {"VFA", "IRT1", "MESE", "MRF"} and not res.skipped
    assert [len(found[s].members) for s in ("VFA", "IRT1", "MESE")] == [2, 9, 10]
    assert sorted(m.path.name for m in found["MRF"].members) == [
        "sub-01_part-mag_MRF.nii.gz", "sub-01_part-phase_MRF.nii.gz"]
    assert found["MRF"].b1map == demo / "sub-01" / "fmap" / "sub-01_acq-mrf_TB1map.nii.gz"
    assert found["VFA"].b1map == demo / "sub-01" / "fmap" / "sub-01_TB1map.nii.gz"
    assert not [s for s in res.skipped if s.what == "TB1map"]


@pytest.mark.parametrize("suffix, pattern, truth, b1", [
    ("VFA", "sub-01_flip-*_VFA.nii.gz", "acq-vfa_T1map", True),
    ("IRT1", "sub-01_inv-*_IRT1.nii.gz", "acq-irt1_T1map", False),
    ("MESE", "sub-01_echo-*_MESE.nii.gz", "acq-mese_T2map", False),
])
def test_fit_recovers_truth(demo, suffix, pattern, truth, b1):
    from qmri_bids.qmri.mapping import map_collection
    from qmri_bids.qmri.plan import plan_collection

    b1map = demo / "sub-01" / "fmap" / "sub-01_TB1map.nii.gz" if b1 else None
    coll = collection_from_paths(_members(demo, pattern), suffix, b1map)
    labels = _gt(demo, "acq-vfa_desc-tissue_dseg")
    mask = np.isin(labels, (WM, GM))
    mask[..., [0, 1, 3, 4, 6, 7]] = False  # two of the eight slices keep the test fast
    result = map_collection(coll, plan_collection(coll, estimators=("nlls",)), mask=mask)
    (nlls,) = result.mapsets
    key = "T2" if suffix == "MESE" else "T1"
    true = _gt(demo, truth)
    for label in (WM, GM):
        sel = mask & (labels == label)
        rel = nlls.values[key][sel] / true[sel] - 1
        assert np.median(np.abs(rel)) < 0.03, (suffix, label, np.median(np.abs(rel)))
        assert abs(np.median(rel)) < 0.01, (suffix, label, np.median(rel))  # no bias


def test_mrf_series_matches_model(demo):
    """The stored MRF series is M0 x the model's fingerprint at the truth, plus the noise."""
    from qmri_bids.qmri.models.mrf import load_mrf_series

    data, _, schedule = load_mrf_series(demo / "sub-01" / "anat" /
                                             "sub-01_part-mag_MRF.nii.gz")
    assert schedule.n_timepoints == 500 and schedule.inversion_time == pytest.approx(0.02)
    labels = _gt(demo, "acq-mrf_desc-tissue_dseg")
    assert data.shape == (*labels.shape, 500)
    gt = demo / "derivatives" / "groundtruth" / "sub-01" / "anat"
    meta = json.loads((gt / "sub-01_acq-mrf_T1map.json").read_text())
    from qmri_bids.demo.qmri_collections import mrf_fingerprints

    sel = labels == WM
    t1, t2, b1 = (_gt(demo, f"acq-mrf_{m}")[sel].astype(np.float64)
                  for m in ("T1map", "T2map", "TB1map"))
    b1_raw = np.asarray(nib.load(str(demo / "sub-01" / "fmap" /
                                     "sub-01_acq-mrf_TB1map.nii.gz")).dataobj)[sel]
    np.testing.assert_array_equal(b1_raw, b1.astype(np.float32))
    m0 = _gt(demo, "acq-mrf_M0map")[sel] * np.exp(1j * meta["M0Phase"])
    pred = m0[:, None] * mrf_fingerprints(t1, t2, np.round(b1, 2))
    resid = data[sel] - pred
    # residual = complex Gaussian noise of the recorded sigma (float32 storage adds ~1e-7)
    assert np.std(resid.real) == pytest.approx(meta["NoiseSigma"], rel=0.05)
    assert abs(np.mean(resid)) < 0.05 * meta["NoiseSigma"]


def test_same_seed_same_bytes(tmp_path):
    small = {"n_subjects": 1, "shape": (40, 48, 36), "spacing": (4.4, 4.4, 4.4), "qmri_slices": 2}
    a = write_demo_dataset(tmp_path / "a", DemoSettings(**small))
    b = write_demo_dataset(tmp_path / "b", DemoSettings(**small))
    for name in ("sub-01/anat/sub-01_flip-2_VFA.nii.gz", "sub-01/anat/sub-01_part-mag_MRF.nii.gz",
                 "derivatives/groundtruth/sub-01/anat/sub-01_acq-vfa_TB1map.nii.gz"):
        raw = [gzip.decompress((d / name).read_bytes()) for d in (a, b)]
        assert raw[0] == raw[1], name
    assert (a / "sub-01/anat/sub-01_flip-2_VFA.nii.gz").read_bytes() == (
        b / "sub-01/anat/sub-01_flip-2_VFA.nii.gz").read_bytes()


def test_no_qmri_option(tmp_path):
    small = {"n_subjects": 1, "shape": (40, 48, 36), "spacing": (4.4, 4.4, 4.4), "qmri": False}
    out = write_demo_dataset(tmp_path / "ds", DemoSettings(**small))
    assert sorted(p.name for p in (out / "sub-01" / "anat").glob("*.nii.gz")) == [
        "sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz"]


def _fake_nist(ref: Path) -> None:
    """A 6 x 5 stand-in for the NIST reference maps (same names, seconds, with the outliers of
    the real fits: a voxel with T2 > T1 and one with T1 = 1e4 s)."""
    ref.mkdir(parents=True)
    t1 = np.full((6, 5, 1), 0.8, np.float32)
    t2 = np.full((6, 5, 1), 0.08, np.float32)
    t1[0, 0], t2[2, 0], t1[2, 2] = 1e4, 5.0, 0.3
    mask = np.ones((6, 5, 1), np.uint8)
    mask[4:] = 0
    for name, arr in (("T1map", t1), ("T2map", t2), ("mask", mask)):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(ref / f"nist_mncl2_3p0T_site_{name}.nii.gz"))


def test_nist_mrf_subject(tmp_path):
    _fake_nist(tmp_path / "ref")
    small = {"n_subjects": 1, "shape": (40, 48, 36), "spacing": (4.4, 4.4, 4.4), "qmri_slices": 2}
    out = write_demo_dataset(tmp_path / "ds", DemoSettings(**small, nist_mrf_dir=tmp_path / "ref"))
    assert "sub-nistmrf\t" in (out / "participants.tsv").read_text()
    from qmri_bids.qmri.models.mrf import load_mrf_series

    data, _, schedule = load_mrf_series(out / "sub-nistmrf" / "anat" /
                                        "sub-nistmrf_acq-site_part-phase_MRF.nii.gz")
    gt = out / "derivatives" / "groundtruth" / "sub-nistmrf" / "anat"
    t1 = np.asarray(nib.load(str(gt / "sub-nistmrf_acq-sitemrf_T1map.nii.gz")).dataobj)
    ok = np.asarray(nib.load(str(gt / "sub-nistmrf_acq-sitemrf_desc-fit_mask.nii.gz")).dataobj)
    assert data.shape == (*t1.shape, 500) and schedule.n_timepoints == 500
    # every other voxel in-plane: rows 0, 2, 4 (4: outside the mask) x columns 0, 2, 4
    assert t1.shape == (3, 3, 1) and ok.sum() == 4
    assert t1[1, 1, 0] == pytest.approx(0.3, rel=0.006)  # quantised on a 1 % log grid
    assert t1[0, 0, 0] == 0 and t1[1, 0, 0] == 0  # implausible fits left out (M0 = 0)


def test_nist_reference_found(shared_reference):
    from qmri_bids.demo.qmri_collections import _nist_sites

    assert _nist_sites(shared_reference), "no 3 T NIST maps in the shared reference"


def test_nist_mrf_missing_is_skipped(tmp_path, caplog):
    assert write_nist_mrf_subject(tmp_path / "ds", tmp_path / "nowhere", 1) is False
    assert "skipped" in caplog.text
    assert not (tmp_path / "ds" / "sub-nistmrf").exists()


@pytest.mark.skipif(shutil.which("bids-validator") is None, reason="bids-validator not installed")
def test_bids_validator_no_errors(demo):
    proc = subprocess.run(["bids-validator", str(demo), "--json"], capture_output=True,
                          text=True, timeout=300, check=False)
    out = proc.stdout[proc.stdout.index("{"):]
    report = json.loads(out)
    errors = report["issues"]["errors"]
    assert not errors, [e.get("reason") for e in errors]


@pytest.mark.parametrize("suffix, pattern", [("VFA", "sub-01_flip-*_VFA.nii.gz"),
                                             ("IRT1", "sub-01_inv-*_IRT1.nii.gz"),
                                             ("MESE", "sub-01_echo-*_MESE.nii.gz")])
def test_demo_simulates_with_the_model_the_pipeline_resolves(demo, suffix, pattern, tmp_path):
    """The demo builds its simulation models from the sidecars it writes, through the same
    registry as the pipeline: the protocols are the shipped estimators' ones."""
    from qmri_bids.demo.qmri_collections import sidecar_model
    from qmri_bids.qmri.model_store import SHIPPED_DIR
    from qmri_bids.qmri.plan import plan_collection
    from qmri_bids.qmri.protocols import resolve_collection

    paths = _members(demo, pattern)
    metas = [json.loads(p.with_name(p.name[:-7] + ".json").read_text()) for p in paths]
    simulated = sidecar_model(suffix, [p.name[:-7] for p in paths], metas)
    resolved = resolve_collection(collection_from_paths(paths, suffix)).model
    assert type(simulated) is type(resolved)
    assert simulated.to_protocol() == resolved.to_protocol()
    # the plan looks up the network of the estimation model (EPG for a CPMG echo train)
    network = plan_collection(collection_from_paths(paths, suffix), estimators=("nn",),
                              model_dir=tmp_path / "models").network
    assert network.weights is not None and network.weights.parent == SHIPPED_DIR, network
