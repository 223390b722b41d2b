"""A TB1DAM (double-angle B1+) collection in fmap/: found by discovery like every collection of
the registry, planned in pre-flight, and linked to the collections of its participant that use
B1 (its IntendedFor, when given, decides which); a TB1map in fmap/ wins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qmri_bids.bids.discovery import discover, load_filters, summary_table
from qmri_bids.config import RunConfig
from qmri_bids.preflight import preflight
from qmri_bids.qmri.plan import B1Provider
from tests.foundation._helpers import blob_image, make_tiny_bids, save_nifti

SHAPE = (8, 8, 4)


def _dataset(root: Path, *, dam_flips=(60, 120), dam_intended_for=None,
             fmap_tb1map=False) -> Path:
    ds = make_tiny_bids(root, subjects=("01",), shape=SHAPE, suffixes=())
    anat, fmap = ds / "sub-01" / "anat", ds / "sub-01" / "fmap"
    for index, fa in enumerate((3, 20), start=1):
        name = f"sub-01_flip-{index}_VFA"
        save_nifti(anat / f"{name}.nii.gz", blob_image(SHAPE, index))
        (anat / f"{name}.json").write_text(json.dumps({"FlipAngle": fa,
                                                       "RepetitionTimeExcitation": 0.015}))
    for index, fa in enumerate(dam_flips, start=1):
        name = f"sub-01_flip-{index}_TB1DAM"
        meta = {"FlipAngle": fa, "RepetitionTime": 10.0}
        if dam_intended_for is not None:
            meta["IntendedFor"] = dam_intended_for
        save_nifti(fmap / f"{name}.nii.gz", blob_image(SHAPE, 10 + index), spacing=(4, 4, 4))
        (fmap / f"{name}.json").write_text(json.dumps(meta))
    if fmap_tb1map:
        save_nifti(fmap / "sub-01_TB1map.nii.gz", np.ones(SHAPE))
        (fmap / "sub-01_TB1map.json").write_text(json.dumps({"IntendedFor": [
            f"bids::sub-01/anat/sub-01_flip-{i}_VFA.nii.gz" for i in (1, 2)]}))
    return ds


def _run(ds: Path, tmp_path: Path):
    (found,) = discover(ds, tmp_path / "db", ["01"])
    config = RunConfig(bids_dir=ds, output_dir=tmp_path / "out", analysis_level="participant",
                       work_dir=tmp_path / "work", bias_methods=("n4",))
    problems = preflight([found], config)
    return found, {c.suffix: c for c in found.collections}, problems


def test_a_tb1dam_collection_in_fmap_provides_the_b1_map_of_the_vfa(tmp_path):
    found, by_suffix, problems = _run(_dataset(tmp_path / "ds"), tmp_path)
    assert problems == [] and set(by_suffix) == {"VFA", "TB1DAM"}
    dam, vfa = by_suffix["TB1DAM"], by_suffix["VFA"]
    assert [m.path.name for m in dam.members] == ["sub-01_flip-1_TB1DAM.nii.gz",
                                                  "sub-01_flip-2_TB1DAM.nii.gz"]
    assert {m.entities["datatype"] for m in dam.members} == {"fmap"}
    assert dam.intended_for == frozenset()
    assert (dam.plan.model_name, dam.plan.protocol, dam.plan.closed_form) == (
        "tb1dam", {"flip_angle_deg": 60.0}, True)
    assert vfa.b1map is None and vfa.plan.b1_provider == B1Provider("TB1DAM", "TB1DAM", True)
    assert "B1 from TB1DAM" in summary_table([found])
    assert "tb1dam" in json.dumps(load_filters(_filter(tmp_path, {"tb1dam": {"run": None}})))


def _filter(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "filter.json"
    path.write_text(json.dumps(content))
    return path


def test_intended_for_decides_which_collections_get_the_map(tmp_path):
    named = [f"bids::sub-01/anat/sub-01_flip-{i}_VFA.nii.gz" for i in (1, 2)]
    _, by_suffix, _ = _run(_dataset(tmp_path / "a", dam_intended_for=named), tmp_path / "ra")
    vfa, dam = by_suffix["VFA"], by_suffix["TB1DAM"]
    assert dam.intended_for == {m.path.resolve() for m in vfa.members}
    assert vfa.plan.b1_from_provider
    other = ["anat/sub-01_flip-1_MTS.nii.gz"]  # subject-relative: another collection
    _, by_suffix, _ = _run(_dataset(tmp_path / "b", dam_intended_for=other), tmp_path / "rb")
    assert by_suffix["VFA"].plan.b1_provider is None


def test_a_tb1map_in_fmap_wins(tmp_path):
    _, by_suffix, problems = _run(_dataset(tmp_path / "ds", fmap_tb1map=True), tmp_path)
    vfa = by_suffix["VFA"]
    assert problems == [] and vfa.b1map.name == "sub-01_TB1map.nii.gz"
    assert vfa.plan.b1_provider == B1Provider("TB1DAM", "TB1DAM", False)


def test_unusable_tb1dam_collections_are_skipped_naming_the_file(tmp_path):
    found, by_suffix, problems = _run(_dataset(tmp_path / "a", dam_flips=(30, 60, 120)),
                                      tmp_path / "ra")
    (skip,) = found.skipped
    assert skip.path.name == "sub-01_flip-1_TB1DAM.nii.gz" and "exactly two members" in (
        skip.reason)
    assert set(by_suffix) == {"VFA"} and by_suffix["VFA"].plan.b1_provider is None
    assert len(problems) == 1  # counted as unusable input: exit 65
    _, by_suffix, problems = _run(_dataset(tmp_path / "b", dam_flips=(60, 100)), tmp_path / "rb")
    (problem,) = problems
    assert "sub-01_flip-1_TB1DAM.nii.gz" in problem and "twice the first" in problem
    assert set(by_suffix) == {"VFA"} and by_suffix["VFA"].plan.b1_provider is None
