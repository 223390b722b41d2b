"""The demo's double-angle collection (sub-02): a TB1DAM pair in fmap/ instead of the VFA's
TB1map, at twice the VFA voxel size, whose closed-form B1 is the truth; every other collection
byte-identical to a demo without it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.demo import qmri_collections as qc
from qmri_bids.demo.phantom import make_head_phantom
from qmri_bids.qmri.protocols import collection_from_paths, load_collection_data


def _write(root: Path, tb1dam_subjects: tuple[str, ...]) -> Path:
    phantom = make_head_phantom((40, 48, 12), (4.4, 4.4, 4.4), np.random.default_rng(1))
    qc.write_subject_collections(root, "02", phantom, np.random.default_rng(3),
                                 qc.QmriSettings(n_slices=4, tb1dam_subjects=tb1dam_subjects))
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("demo_tb1dam")
    return _write(base / "with", ("02",)), _write(base / "without", ())


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_only_the_b1_files_differ(pair):
    with_dam, without = map(_hashes, pair)
    dam = {"sub-02/fmap/sub-02_flip-1_TB1DAM.json", "sub-02/fmap/sub-02_flip-1_TB1DAM.nii.gz",
           "sub-02/fmap/sub-02_flip-2_TB1DAM.json", "sub-02/fmap/sub-02_flip-2_TB1DAM.nii.gz",
           "derivatives/groundtruth/sub-02/anat/sub-02_acq-tb1dam_TB1map.json",
           "derivatives/groundtruth/sub-02/anat/sub-02_acq-tb1dam_TB1map.nii.gz"}
    assert set(with_dam) - set(without) == dam
    assert set(without) - set(with_dam) == {"sub-02/fmap/sub-02_TB1map.json",
                                            "sub-02/fmap/sub-02_TB1map.nii.gz"}
    assert all(with_dam[k] == without[k] for k in set(with_dam) & set(without))


def test_the_double_angle_pair_gives_the_true_b1_on_its_grid(pair):
    root = pair[0]
    fmap = root / "sub-02" / "fmap"
    members = [fmap / f"sub-02_flip-{i}_TB1DAM.nii.gz" for i in (1, 2)]
    loaded = load_collection_data(collection_from_paths(members, "TB1DAM"))
    assert loaded.model.to_protocol() == {"flip_angle_deg": 60.0}
    meta = json.loads((fmap / "sub-02_flip-1_TB1DAM.json").read_text())
    assert meta["IntendedFor"] == [f"bids::sub-02/anat/sub-02_flip-{i}_VFA.nii.gz"
                                   for i in (1, 2)]
    truth_path = (root / "derivatives" / "groundtruth" / "sub-02" / "anat"
                  / "sub-02_acq-tb1dam_TB1map.nii.gz")
    truth = np.asarray(nib.load(str(truth_path)).dataobj, dtype=np.float64)
    vfa = nib.load(str(root / "sub-02" / "anat" / "sub-02_flip-1_VFA.nii.gz"))
    assert loaded.data.shape[:3] == truth.shape == tuple(n // 2 for n in vfa.shape)
    np.testing.assert_allclose(nib.load(str(truth_path)).affine, loaded.affine)
    np.testing.assert_allclose(np.diag(loaded.affine)[:3], 2 * np.diag(vfa.affine)[:3])
    b1 = loaded.model.closed_form_maps(loaded.data, None, np.ones(truth.shape, bool))[0]["B1"]
    # the brightest fifth of the grid (inside the head, where the ratio is not noise-dominated)
    bright = loaded.data[..., 0] > np.percentile(loaded.data[..., 0], 80)
    assert np.median(np.abs(b1[bright] / truth[bright] - 1)) < 0.02
