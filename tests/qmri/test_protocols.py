"""Protocol building, validation messages, Philips scaling, member exclusion, data loading."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.protocols import (
    IRT1Protocol,
    MP2RAGEProtocol,
    MTSProtocol,
    VFAProtocol,
    collection_from_paths,
    load_b1map,
    load_collection_data,
    philips_scale_factors,
    protocol_from_collection,
)


def _coll(suffix, metas, entities=None):
    members = [SimpleNamespace(path=Path(f"sub-x_run-{i + 1}_{suffix}.nii.gz"),
                               entities=(entities or [{}] * len(metas))[i], metadata=md)
               for i, md in enumerate(metas)]
    return SimpleNamespace(suffix=suffix, members=members, b1map=None)


def test_vfa_protocol_per_member_tr():
    p = protocol_from_collection(_coll("VFA", [
        {"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
        {"FlipAngle": 20, "RepetitionTime": 0.018}]))
    assert isinstance(p, VFAProtocol)
    np.testing.assert_allclose(p.flip_angle_deg, [6, 20])
    np.testing.assert_allclose(p.repetition_time, [0.028, 0.018])
    assert p.model().name == "vfa"


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
        protocol_from_collection(_coll(suffix, metas))


def test_mts_roles_from_entities_and_mp2rage_fields():
    metas = [{"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
             {"FlipAngle": 6, "RepetitionTimeExcitation": 0.028},
             {"FlipAngle": 20, "RepetitionTimeExcitation": 0.018}]
    ents = [{"mt": "off"}, {"mt": "on"}, {"mt": "off"}]
    p = protocol_from_collection(_coll("MTS", metas, ents))
    assert isinstance(p, MTSProtocol) and p.mt_on.tolist() == [False, True, False]
    m = p.model()
    assert (m.index_pd, m.index_mt, m.index_t1) == (0, 1, 2)
    common = {"RepetitionTimeExcitation": 0.007, "RepetitionTimePreparation": 5.0,
              "NumberShots": 176}
    mp = protocol_from_collection(_coll("MP2RAGE", [
        {"InversionTime": 2.5, "FlipAngle": 5, **common},
        {"InversionTime": 0.7, "FlipAngle": 4, **common}]))
    assert isinstance(mp, MP2RAGEProtocol)
    np.testing.assert_allclose(mp.inversion_time, [0.7, 2.5])
    np.testing.assert_allclose(mp.flip_angle_deg, [4, 5])
    assert (mp.n_before, mp.n_after) == (88, 88)
    with pytest.raises(BadDataError, match="infeasible"):
        protocol_from_collection(_coll("MP2RAGE", [
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
        data, proto, affine, excluded = load_collection_data(coll)
    assert isinstance(proto, IRT1Protocol) and len(proto.inversion_time) == 18
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


def test_real_b1map_2d_accepted(ds_real):
    b1 = load_b1map(ds_real / "sub-brain02" / "fmap" / "sub-brain02_TB1map.nii.gz", (128, 128, 1))
    assert b1.shape == (128, 128, 1) and 0.7 < np.median(b1) < 1.3
