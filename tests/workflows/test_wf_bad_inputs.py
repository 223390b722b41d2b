"""Bad inputs of the qMRI mapping, in two participant runs on datasets derived from the demo
(VFA only, plus a T1w image as "another input"):

* run 1 (exit 65: unusable inputs skipped, the rest processed) — ``eqfa``: both flip angles
  equal; ``nanvox``: a block of NaN voxels in one VFA member; ``onevfa``: a VFA collection of one
  member (skipped by discovery);
* run 2 (exit 65) — ``b1shape``: a B1 map of another shape (rejected before the workflow runs,
  the message names the file); ``badmodel``: a protocol without shipped model whose estimator in
  ``--model-dir`` has a truncated weights file (a corrupt cache entry: retrained, with a warning).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.errors import EXIT_BAD_DATA
from tests.workflows._wf_helpers import copy_subject, load, participant_run

pytestmark = pytest.mark.slow

VFA = ("anat/sub-01_flip-*_VFA.*", "fmap/sub-01_TB1map.*")
NAN_BLOCK = (slice(20, 32), slice(30, 42), slice(2, 6))  # the VFA slab is 60×72×8


def _set_meta(path: Path, **values) -> None:
    meta = json.loads(path.read_text())
    meta.update(values)
    path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def run1(wf_demo, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("wf_bad1")
    bids = base / "ds"
    sub = copy_subject(wf_demo, bids, "01", "eqfa", (*VFA, "anat/sub-01_T1w.*"))
    _set_meta(sub / "anat" / "sub-eqfa_flip-2_VFA.json", FlipAngle=3)
    sub = copy_subject(wf_demo, bids, "01", "nanvox", VFA)
    member = sub / "anat" / "sub-nanvox_flip-2_VFA.nii.gz"
    img = nib.load(str(member))
    data = img.get_fdata(dtype=np.float32)
    data[NAN_BLOCK] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(member))
    copy_subject(wf_demo, bids, "01", "onevfa", ("anat/sub-01_flip-1_VFA.*",
                                                 "anat/sub-01_T1w.*"))
    run = participant_run(bids, base, "--skip-bids-validation")
    from tests.foundation._helpers import run_log
    run["log"] = run_log(run["work"])
    return run


@pytest.fixture(scope="module")
def run2(wf_demo, tmp_path_factory) -> dict:
    from qmri_bids.qmri.model_store import SHIPPED_DIR

    base = tmp_path_factory.mktemp("wf_bad2")
    bids = base / "ds"
    sub = copy_subject(wf_demo, bids, "01", "b1shape", VFA)
    b1 = sub / "fmap" / "sub-b1shape_TB1map.nii.gz"
    img = nib.load(str(b1))
    nib.save(nib.Nifti1Image(img.get_fdata()[:, :, :-3].astype(np.float32), img.affine), str(b1))
    sub = copy_subject(wf_demo, bids, "01", "badmodel", VFA)
    _set_meta(sub / "anat" / "sub-badmodel_flip-2_VFA.json", FlipAngle=18)
    # a shipped-model-like estimator for that protocol: a real card, truncated weights
    from qmri_bids.bids.discovery import discover
    from qmri_bids.qmri.plan import plan_collection

    model_dir = base / "models"
    networks = {i.subject: plan_collection(i.collections[0], model_dir=model_dir).network
                for i in discover(bids, base / "plan" / "db", ["b1shape", "badmodel"])}
    assert networks["badmodel"].train_on_demand, \
        f"FlipAngle 3/18 unexpectedly has a model: {networks['badmodel'].weights}"
    stem = networks["badmodel"].stem
    shipped = networks["b1shape"].weights  # the demo protocol's shipped estimator
    assert shipped is not None and shipped.parent == SHIPPED_DIR
    model_dir.mkdir()
    shutil.copy(shipped.with_suffix(".json"), model_dir / f"{stem}.json")
    (model_dir / f"{stem}.safetensors").write_bytes(shipped.read_bytes()[:1000])
    run = participant_run(bids, base, "--skip-bids-validation", "--model-dir", model_dir)
    run["stem"] = stem
    run["model_dir"] = model_dir
    from tests.foundation._helpers import run_log
    run["log"] = run_log(run["work"])
    run["crash"] = {s: "\n".join(p.read_text(errors="replace")
                                 for p in (run["out"] / f"sub-{s}" / "log").rglob("crash*")
                                 if p.is_file() and p.suffix in (".txt", ".log", ""))
                    for s in ("b1shape", "badmodel")}
    return run


def _maps(run, sub) -> list[str]:
    return sorted(p.name for p in (run["out"] / f"sub-{sub}" / "anat").glob("*acq-vfa*.nii.gz"))


# ----------------------------------------------------------------------------------- run 1
def test_run1_exit_code(run1):
    assert run1["code"] == EXIT_BAD_DATA, run1["stderr"][-3000:]


def test_equal_flip_angles_skipped_with_named_field(run1):
    assert "FlipAngle" in run1["stderr"] and "sub-eqfa" in run1["stderr"], run1["stderr"][-3000:]
    assert not _maps(run1, "eqfa")
    # the other input of that participant was processed
    assert (run1["out"] / "sub-eqfa" / "anat" / "sub-eqfa_desc-cnn_T1w.nii.gz").is_file()


def test_one_member_collection_skipped_by_discovery(run1):
    assert not _maps(run1, "onevfa")
    assert (run1["out"] / "sub-onevfa" / "anat" / "sub-onevfa_desc-cnn_T1w.nii.gz").is_file()
    lines = [ln for ln in run1["log"].splitlines() if "sub-onevfa" in ln and "VFA" in ln]
    assert any("skip" in ln.lower() for ln in lines), "\n".join(lines[:20])


def test_nan_voxels_processed(run1, wf_demo):
    anat = run1["out"] / "sub-nanvox" / "anat"
    assert {"sub-nanvox_acq-vfa_T1map.nii.gz", "sub-nanvox_acq-vfa_M0map.nii.gz",
            "sub-nanvox_acq-vfa_R1map.nii.gz"} <= set(_maps(run1, "nanvox"))
    t1 = load(anat / "sub-nanvox_acq-vfa_T1map.nii.gz")
    gt = wf_demo / "derivatives" / "groundtruth" / "sub-01" / "anat"
    seg = load(gt / "sub-01_acq-vfa_desc-tissue_dseg.nii.gz").astype(int)
    brain = np.isin(seg, (4, 5))
    nan = np.zeros(t1.shape, bool)
    nan[NAN_BLOCK] = True
    assert (brain & nan).sum() > 50 and (brain & ~nan).sum() > 1000
    assert np.isfinite(t1).all()  # written maps never hold NaN (0 where not estimable)
    outside_block = t1[brain & ~nan]
    assert (outside_block > 0).mean() > 0.99
    truth = load(gt / "sub-01_acq-vfa_T1map.nii.gz")
    rel = np.median(np.abs(outside_block / truth[brain & ~nan] - 1))
    assert rel < 0.05, f"median relative error outside the NaN block {rel:.3f}"


# ----------------------------------------------------------------------------------- run 2
def test_run2_exit_code(run2):
    assert run2["code"] == EXIT_BAD_DATA, run2["stderr"][-3000:]


def test_b1_map_of_another_shape_names_the_file(run2):
    assert not _maps(run2, "b1shape")
    assert "sub-b1shape_TB1map.nii.gz" in run2["stderr"], run2["stderr"][-3000:]
    assert "shape" in run2["stderr"]
    assert not run2["crash"]["b1shape"], "rejected before the workflow: no node may crash"


def test_corrupt_model_in_model_dir_is_retrained(run2):
    """A cache entry whose weights do not match its card is retrained (and replaced), with a
    warning naming it; the maps are then written."""
    from qmri_bids.provenance import sha256_file

    weights = run2["model_dir"] / f"{run2['stem']}.safetensors"
    assert f"{run2['stem']}.safetensors" in run2["log"] and "retrained" in run2["log"]
    assert weights.stat().st_size != 1000
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(weights)
    assert "sub-badmodel_acq-vfa_T1map.nii.gz" in _maps(run2, "badmodel")


def test_node_failure_message_names_the_file(wf_demo, tmp_path, monkeypatch):
    """Bad data found inside a node: exit 65 and the node's message (naming the file) on
    stderr, not only in the crash file."""
    from qmri_bids.errors import BadDataError
    from qmri_bids.qmri import mapping
    from tests.foundation._helpers import cli

    def broken(collection, *args, **kwargs):
        raise BadDataError(f"{collection.members[0].path.name}: injected bad data")

    bids = tmp_path / "ds"
    copy_subject(wf_demo, bids, "01", "inject", VFA)
    monkeypatch.setattr(mapping, "map_collection", broken)
    plugin = tmp_path / "linear.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")  # in-process: the patch applies
    code, _, err = cli([bids, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--skip-bids-validation", "--use-plugin", plugin])
    assert code == EXIT_BAD_DATA, err[-3000:]
    assert "sub-inject_flip-1_VFA.nii.gz: injected bad data" in err
