"""Collections → models: validation messages, member order, Philips scaling, member exclusion,
data loading, the foreground mask."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.model_store import protocol_hash
from qmri_bids.qmri.models import IRT1TRModel, MP2RAGEModel, MTSModel, VFAModel
from qmri_bids.qmri.protocols import (
    collection_from_paths,
    foreground_mask,
    load_b1map,
    load_collection_data,
    philips_scale_factors,
    resample_b1map,
    resolve_collection,
)


def _model(collection):
    return resolve_collection(collection).model


def _coll(suffix, metas, entities=None):
    members = [SimpleNamespace(path=Path(f"sub-x_run-{i + 1}_{suffix}.nii.gz"),
                               entities=(entities or [{}] * len(metas))[i], metadata=md)
               for i, md in enumerate(metas)]
    return SimpleNamespace(suffix=suffix, members=members, b1map=None)


def test_vfa_protocol_per_member_tr():
    m = _model(_coll("VFA", [
        {"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
        {"FlipAngle": 20, "RepetitionTime": 0.018}]))
    assert isinstance(m, VFAModel)
    np.testing.assert_allclose(m.flip_angle_deg, [6, 20])
    np.testing.assert_allclose(m.tr, [0.028, 0.018])


def test_members_in_another_order_are_the_same_protocol():
    """Members are sorted by the model's order field: same protocol, same hash, and the
    resolved members follow the model's order (the data are read in that order)."""
    metas = [{"EchoTime": te, "RepetitionTime": 3.0} for te in (0.03, 0.01, 0.02)]
    resolved = resolve_collection(_coll("MESE", metas))
    assert [m.metadata["EchoTime"] for m in resolved.members] == [0.01, 0.02, 0.03]
    in_order = _model(_coll("MESE", sorted(metas, key=lambda md: md["EchoTime"])))
    assert resolved.model.to_protocol() == in_order.to_protocol()
    assert protocol_hash("mese-mono", resolved.model.to_protocol()) == protocol_hash(
        "mese-mono", in_order.to_protocol())


@pytest.mark.parametrize(
    "suffix,metas,pattern",
    [
        ("VFA", [{"FlipAngle": "3", "RepetitionTime": 0.015},
                 {"FlipAngle": 20, "RepetitionTime": 0.015}],
         r"run-1_VFA.*'FlipAngle' must be a number, got str '3'"),
        ("MESE", [{"EchoTime": 35}, {"EchoTime": 70}], r"run-1_MESE.*EchoTime = 35.*0\.035"),
        ("IRT1", [{"InversionTime": 0.1}, {"InversionTime": 45}, {"InversionTime": 1}],
         r"run-2_IRT1.*InversionTime = 45"),
        ("VFA", [{"FlipAngle": 3}, {"FlipAngle": 20, "RepetitionTime": 0.015}],
         r"run-1_VFA.*'RepetitionTimeExcitation'.*missing"),
        ("MEGRE", [{"EchoTime": 0.01}, {}], r"run-2_MEGRE.*'EchoTime' is missing"),
        ("VFA", [{"FlipAngle": 0, "RepetitionTime": 0.015},
                 {"FlipAngle": 20, "RepetitionTime": 0.015}], r"FlipAngle = 0 is outside"),
        ("VFA", [{"FlipAngle": 200, "RepetitionTime": 0.015},
                 {"FlipAngle": 20, "RepetitionTime": 0.015}], r"FlipAngle = 200 is outside"),
        ("VFA", [{"FlipAngle": 20, "RepetitionTime": 0.015}], r"at least 2 members, got 1"),
        ("VFA", [{"FlipAngle": 10, "RepetitionTime": 0.015}] * 3,
         r"FlipAngle is 10 for all members.*needs it to vary"),
        ("MESE", [{"EchoTime": 0.01}, {"EchoTime": 0.02}, {"EchoTime": 0.02}],
         r"EchoTime = 0.02 appears in several members \(sub-x_run-2_MESE.*run-3"),
        ("MTS", [{"FlipAngle": 6, "RepetitionTime": 0.03, "MTState": False}] * 3,
         r"one mt-on and two mt-off"),
        ("XYZ", [{}], r"no qMRI protocol for suffix 'XYZ'"),
    ],
)
def test_bad_protocols_raise_clear_errors(suffix, metas, pattern):
    with pytest.raises(BadDataError, match=pattern):
        resolve_collection(_coll(suffix, metas))


def test_mts_roles_from_entities_and_mp2rage_fields():
    metas = [{"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
             {"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
             {"FlipAngle": 20, "RepetitionTimeExcitation": 0.018}]
    ents = [{"mt": "off"}, {"mt": "on"}, {"mt": "off"}]
    m = _model(_coll("MTS", metas, ents))
    assert isinstance(m, MTSModel) and m.to_protocol()["mt_on"] == [False, True, False]
    assert (m.index_pd, m.index_mt, m.index_t1) == (0, 1, 2)
    with pytest.raises(BadDataError, match=r"run-2_MTS.*'MTState' must be true or false"):
        _model(_coll("MTS", [metas[0], {**metas[1], "MTState": "on"}, metas[2]], ents))
    common = {"RepetitionTimeExcitation": 0.007, "RepetitionTimePreparation": 5.0,
              "NumberShots": 176}
    mp = _model(_coll("MP2RAGE", [
        {"InversionTime": 2.5, "FlipAngle": 5, **common},
        {"InversionTime": 0.7, "FlipAngle": 4, **common}]))
    assert isinstance(mp, MP2RAGEModel)
    np.testing.assert_allclose(mp.inversion_time, [0.7, 2.5])
    np.testing.assert_allclose(mp.flip_angle_deg, [4, 5])
    assert (mp.n_before, mp.n_after) == (88, 88)
    with pytest.raises(BadDataError, match="infeasible"):
        resolve_collection(_coll("MP2RAGE", [
            {"InversionTime": 0.2, "FlipAngle": 5, **common},
            {"InversionTime": 0.7, "FlipAngle": 4, **common}]))


def _write(path, arr):
    nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), np.eye(4)), str(path))
    return path


def test_loading_checks_shapes_and_b1_geometry(tmp_path):
    a = _write(tmp_path / "sub-x_flip-1_VFA.nii.gz", np.ones((4, 4, 1)))
    b = _write(tmp_path / "sub-x_flip-2_VFA.nii.gz", np.ones((4, 5, 1)))
    coll = _coll("VFA", [{"FlipAngle": 3, "RepetitionTime": 0.015},
                         {"FlipAngle": 20, "RepetitionTime": 0.015}])
    coll.members[0].path, coll.members[1].path = a, b
    with pytest.raises(BadDataError, match=r"flip-2_VFA.*\(4, 5, 1\) differs"):
        load_collection_data(coll)
    b1_2d = _write(tmp_path / "b1.nii.gz", np.full((4, 4), 95.0))  # 2-D map, in percent
    b1 = load_b1map(b1_2d, (4, 4, 1))
    assert b1.shape == (4, 4, 1) and np.allclose(b1, 0.95)
    with pytest.raises(BadDataError, match=r"b1.nii.gz: B1 map shape \(4, 4\) does not match"):
        load_b1map(b1_2d, (4, 5, 1))


def _phantom(ds):
    files = sorted((ds / "sub-phantom01" / "anat").glob("*_IRT1.nii.gz"),
                   key=lambda p: int(re.search(r"inv-(\d+)", p.name).group(1)))
    return collection_from_paths(files, "IRT1")


def test_philips_scaling_and_inv19_exclusion_on_phantom(ds_real, caplog):
    coll = _phantom(ds_real)
    factors = philips_scale_factors(coll.members)
    md0 = coll.members[0].metadata
    assert factors[0] == pytest.approx(1 / (md0["PhilipsRescaleSlope"] * md0["PhilipsScaleSlope"]))
    assert factors.max() / factors.min() > 2  # the 2.4-fold ScaleSlope variation matters
    with caplog.at_level(logging.INFO, logger="qmri_bids.qmri"):
        loaded = load_collection_data(coll)
    data, model, affine, excluded = loaded.data, loaded.model, loaded.affine, loaded.excluded
    assert isinstance(model, IRT1TRModel) and len(model.inversion_time) == 18
    assert [p.name for p, _ in excluded] == ["sub-phantom01_inv-19_IRT1.nii.gz"]
    assert "EchoTime" in excluded[0][1] and "PixelBandwidth" in excluded[0][1]
    assert any("inv-19" in r.message and "exclud" in r.message for r in caplog.records)
    assert any("Philips scaling" in r.message for r in caplog.records)
    raw = nib.load(str(coll.members[4].path)).get_fdata()
    np.testing.assert_allclose(data[..., 4], raw * factors[4])
    assert data.shape == (128, 128, 1, 18) and affine.shape == (4, 4)
    # kidney echoes share one scaling: factors all equal
    kid = sorted((ds_real / "sub-kidney01" / "anat").glob("*_MESE.nii.gz"))
    f = philips_scale_factors(collection_from_paths(kid, "MESE").members)
    assert np.allclose(f, f[0])


def test_foreground_mask_is_the_bright_object_and_rejects_an_empty_collection():
    data = np.zeros((6, 6, 1, 2))
    data[2:4, 2:4] = 100.0
    data[0, 0] = 5.0  # background noise below 10 % of the object
    mask = foreground_mask(data)
    assert mask.sum() == 4 and mask[2:4, 2:4].all()
    with pytest.raises(BadDataError, match="above the background"):
        foreground_mask(np.zeros((4, 4, 1, 2)))


def test_real_b1map_2d_accepted(ds_real):
    b1 = load_b1map(ds_real / "sub-brain02" / "fmap" / "sub-brain02_TB1map.nii.gz", (128, 128, 1))
    assert b1.shape == (128, 128, 1) and 0.7 < np.median(b1) < 1.3


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def test_a_coarse_b1_map_is_resampled_to_the_images_by_the_affines(tmp_path):
    """A linear field on a 2x coarser grid (voxel centres between the fine ones) comes back
    exactly on the fine grid inside the object; its zeros outside do not pull the edge down;
    voxels with no valid neighbour are nominal (1)."""
    fine = np.diag([2.0, 2.0, 3.0, 1.0])
    fine[:3, 3] = (-20.0, 10.0, 5.0)
    coarse = fine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 1, 0], [0, 0, 0, 1]])
    ic, jc, kc = np.indices((6, 5, 3), dtype=np.float64)
    world = np.einsum("ij,jxyz->ixyz", coarse[:3, :3], np.stack([ic, jc, kc])) + coarse[:3, 3,
                                                                                       None, None,
                                                                                       None]
    field = 1.0 + 0.01 * world[0] - 0.004 * world[1] + 0.002 * world[2]
    b1 = np.where(ic < 5, field, 0.0)  # the last coarse row is outside the object
    path = _nifti(tmp_path / "b1.nii.gz", b1, coarse)
    out = resample_b1map(path, (12, 10, 3), fine, target="the VFA collection")
    i, j, k = np.indices((12, 10, 3), dtype=np.float64)
    wf = np.einsum("ij,jxyz->ixyz", fine[:3, :3], np.stack([i, j, k])) + fine[:3, 3, None, None,
                                                                            None]
    expected = 1.0 + 0.01 * wf[0] - 0.004 * wf[1] + 0.002 * wf[2]
    # inside the object and away from its edge, linear interpolation of a linear field is exact
    inner = (i >= 1) & (i <= 8) & (j >= 1) & (j <= 8)
    np.testing.assert_allclose(out[inner], expected[inner], rtol=1e-6)
    # at the object's edge: the nearest valid values, never a blend with the zeros outside
    edge = out[9:11]
    assert np.all(np.isfinite(edge)) and edge.min() > 0.8 * expected[9:11].min()
    assert np.all(out[11] == 1.0)  # only invalid neighbours: nominal
    # the same grid: the same values
    same = resample_b1map(path, (6, 5, 3), coarse)
    np.testing.assert_allclose(same[:5], b1[:5], rtol=1e-6)


def test_a_single_slice_percent_b1_map_and_one_outside_the_images(tmp_path):
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    path = _nifti(tmp_path / "b1_2d.nii.gz", np.full((4, 4), 110.0), affine)  # percent
    # a 2-D map covers its slice thickness: the images' two thin slices inside it get it
    thin = np.diag([2.0, 2.0, 2.0, 1.0])
    thin[2, 3] = -1.0
    out = resample_b1map(path, (4, 4, 3), thin)
    np.testing.assert_allclose(out[..., :2], 1.1, rtol=1e-6)
    assert np.all(out[..., 2] == 1.0)  # 3 mm from the slice centre: outside its 5 mm slab
    far = affine.copy()
    far[:3, 3] = (500.0, 0.0, 0.0)
    with pytest.raises(BadDataError, match="b1_2d.nii.gz: the B1 map's field of view contains no "
                                           "voxel of the MRF collection"):
        resample_b1map(path, (4, 4, 1), far, target="the MRF collection")
    with pytest.raises(BadDataError, match="^the TB1map of TB1DAM: the B1 map's field of view"):
        resample_b1map(path, (4, 4, 1), far, source="the TB1map of TB1DAM")
