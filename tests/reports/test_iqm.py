"""Derivative discovery and the participant IQMs, against known answers of generated trees."""

from __future__ import annotations

import numpy as np
import pytest

from qmri_bids.bias.cnn import foreground_mask
from qmri_bids.bias.metrics import coefficient_of_joint_variation, neutral_classes, within_class_cv
from qmri_bids.reports.iqm import (
    compute_participant_iqms,
    iqm_path,
    load_bias_images,
    read_dseg_names,
    read_iqms,
)
from qmri_bids.reports.layout import scan_participant, split_name
from tests.reports._trees import DSEG_NAMES, VFA_T1, write_dataset, write_participant


def test_split_name():
    assert split_name("sub-01_ses-a_acq-vfa_desc-crbsd_T1map.nii.gz") == (
        {"sub": "01", "ses": "a", "acq": "vfa", "desc": "crbsd"}, "T1map", ".nii.gz")
    assert split_name("group_summary.tsv") is None
    assert split_name("sub-01_broken-_T1w.nii.gz") is None


def test_scan_participant(tree):
    deriv = scan_participant(tree, "01")
    (anat,) = deriv.anat
    assert anat.suffix == "T1w" and list(anat.methods) == ["cnn", "n4"]
    assert all(o.field is not None and o.corrected.is_file() for o in anat.methods.values())
    cols = {c.acq: c for c in deriv.collections}
    assert set(cols) == {"vfa", "mrf"}
    vfa = cols["vfa"]
    assert vfa.collection == "VFA" and vfa.references() == ["nlls"]
    assert [m.suffix for m in vfa.primary()] == ["T1map", "R1map", "M0map"]
    assert vfa.get("T1map", "crbsd").units == "s"
    assert [p.name for p in deriv.dsegs] == ["sub-01_acq-vfa_desc-tissue_dseg.nii.gz"]


def test_bias_metrics_known_answers(tree):
    """Metrics equal the shared definitions (qmri_bids.bias.metrics) on the uncorrected
    image, which is corrected x field; correcting a known smooth field lowers the CV."""
    info = write_participant(tree.parent / "one", "01", seed=7, record=False)
    deriv = scan_participant(tree.parent / "one", "01")
    images = load_bias_images(deriv.anat[0])
    np.testing.assert_allclose(images.before, info["raw"], rtol=1e-5, atol=1e-3)
    path = compute_participant_iqms(tree.parent / "one", "01", derivatives=deriv,
                                    bias_images={deriv.anat[0].key: images})
    values, _, _ = read_iqms(path)
    mask = foreground_mask(images.before)
    classes = neutral_classes(images.corrected["cnn"], images.corrected["n4"], mask)
    assert values["T1w_cnn_cv_before"] == pytest.approx(within_class_cv(images.before,
                                                                        classes), rel=1e-5)
    assert values["T1w_cnn_cv_after"] < values["T1w_cnn_cv_before"]
    ca, cb = classes == 1, classes == 2
    assert values["T1w_n4_cjv_after"] == pytest.approx(
        coefficient_of_joint_variation(images.corrected["n4"], ca, cb), rel=1e-5)
    f = images.fields["cnn"][mask]
    assert values["T1w_cnn_field_p01"] == pytest.approx(np.percentile(f, 1), rel=1e-5)
    assert values["T1w_cnn_field_range"] == pytest.approx(np.percentile(f, 99)
                                                          - np.percentile(f, 1), rel=1e-4)
    # n4's stored field is 2 % above the true one (its own normalisation)
    assert values["T1w_n4_field_p99"] == pytest.approx(1.02 * values["T1w_cnn_field_p99"],
                                                       rel=1e-4)


def test_map_and_roi_metrics_known_answers(tree):
    values, units, provenance = read_iqms(compute_participant_iqms(tree, "02"))
    info_mask = scan_participant(tree, "02")
    assert info_mask.collections
    n_wm = values["vfa_T1map_WM_n"]
    n_gm = values["vfa_T1map_GM_n"]
    assert values["vfa_T1map_n"] == n_wm + n_gm
    assert values["vfa_T1map_WM_median"] == pytest.approx(VFA_T1[1])
    assert values["vfa_T1map_GM_median"] == pytest.approx(VFA_T1[2])
    assert values["vfa_T1map_WM_iqr"] == pytest.approx(0.0, abs=1e-6)
    expected_median = VFA_T1[1] if n_wm > n_gm else VFA_T1[2]
    assert values["vfa_T1map_median"] == pytest.approx(expected_median)
    assert values["vfa_R1map_WM_median"] == pytest.approx(1 / VFA_T1[1], rel=1e-5)
    assert values["vfa_T1map_crbsd_median"] == pytest.approx(0.05 * expected_median, rel=1e-5)
    assert 0 < values["vfa_T1map_nlls_iqr"] < 0.2  # 2 % noise around two values
    assert values["mrf_T2map_median"] == pytest.approx(0.08)  # the single-slice collection
    assert units["vfa_T1map_median"] == "s" and units["vfa_R1map_median"] == "1/s"
    assert "desc-tissue_dseg" in provenance["dseg"]
    assert iqm_path(tree, "02").parent.name == "qc"


def test_roi_dseg_from_another_derivatives_folder(tmp_path):
    """``roi_dseg``: a derivatives folder (the demo's ground truth layout) with the label
    table at its root; a dseg on another grid is not used."""
    out = write_dataset(tmp_path / "out", n=1, with_dseg=False)
    seg_root = tmp_path / "seg"
    src = write_participant(tmp_path / "tmp", "01", seed=1, record=False)
    import nibabel as nib

    anat = seg_root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    nib.save(nib.Nifti1Image(src["labels"].astype(np.int16), affine),
             str(anat / "sub-01_acq-vfa_desc-tissue_dseg.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), affine),
             str(anat / "sub-01_desc-tissue_dseg.nii.gz"))  # anatomical grid: not the maps'
    (seg_root / "desc-tissue_dseg.tsv").write_text("index\tname\n0\tbackground\n1\tinner\n"
                                                   "2\touter\n")
    assert read_dseg_names(anat / "sub-01_acq-vfa_desc-tissue_dseg.nii.gz", seg_root) == \
        {1: "inner", 2: "outer"}
    values, _, provenance = read_iqms(compute_participant_iqms(out, "01", roi_dseg=seg_root))
    assert values["vfa_T1map_inner_median"] == pytest.approx(VFA_T1[1])
    assert "mrf_T2map_inner_median" not in values  # the MRF grid has no matching dseg
    assert provenance["dseg"].endswith("sub-01_acq-vfa_desc-tissue_dseg.nii.gz")
    assert set(DSEG_NAMES.values()).isdisjoint({k.split("_")[2] for k in values})
