"""MP2RAGE: the closed-form signal against a pulse-by-pulse simulation, and the UNI lookup."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qmri_bids.qmri.models import MP2RAGEModel

from ._checks import F64, ModelChecks


class TestMP2RAGEModel(ModelChecks):
    model = MP2RAGEModel([0.7, 2.5], [4.0, 5.0], 0.007, 5.0, 88, 88)
    params = ([1.0, 1.1], [800.0, 0.6])
    b1 = 0.93


def _mp2rage_bloch(t1, ti, fa_deg, tr_exc, tr_prep, nb, na, eta, kappa=1.0, cycles=30):
    """Pulse-by-pulse longitudinal simulation of MP2RAGE until steady state (reference)."""
    e1 = math.exp(-tr_exc / t1)
    n = nb + na
    starts = [ti[0] - nb * tr_exc, ti[1] - nb * tr_exc]
    mz, out = 1.0, None
    for _ in range(cycles):
        mz = -eta * mz
        t, sig = 0.0, []
        for k in range(2):
            mz = 1 + (mz - 1) * math.exp(-(starts[k] - t) / t1)
            a = math.radians(fa_deg[k]) * kappa
            for j in range(n):
                if j == nb:
                    sig.append(mz * math.sin(a))
                mz = 1 + (mz * math.cos(a) - 1) * e1
            t = starts[k] + n * tr_exc
        mz = 1 + (mz - 1) * math.exp(-(tr_prep - t) / t1)
        out = sig
    return np.array(out)


@pytest.mark.parametrize("kappa", [1.0, 0.8])
def test_mp2rage_matches_pulse_by_pulse_simulation(kappa):
    proto = {"ti": [0.7, 2.5], "fa_deg": [4.0, 5.0], "tr_exc": 0.007, "tr_prep": 5.0,
             "nb": 88, "na": 88, "eta": 0.96}
    model = MP2RAGEModel(proto["ti"], proto["fa_deg"], proto["tr_exc"], proto["tr_prep"],
                         proto["nb"], proto["na"], proto["eta"])
    for t1 in (0.5, 1.2, 3.0):
        sig = model(torch.tensor([1.0, t1], dtype=F64), torch.tensor(kappa, dtype=F64)).numpy()
        np.testing.assert_allclose(sig, _mp2rage_bloch(t1, kappa=kappa, **proto), rtol=1e-8)


def test_mp2rage_uni_lookup_recovers_t1_with_b1():
    model = MP2RAGEModel([0.7, 2.5], [4.0, 5.0], 0.007, 5.0, 88, 88)
    t1 = torch.tensor([0.6, 0.9, 1.4, 2.0], dtype=F64)
    b1 = torch.tensor([0.85, 1.0, 1.1, 0.95], dtype=F64)
    uni = model.uni(t1, b1)
    torch.testing.assert_close(model.t1_from_uni(uni, b1), t1, rtol=5e-3, atol=0)
    # Ignoring B1 gives a measurably different T1 (the correction matters).
    assert (model.t1_from_uni(uni[[0]]) - t1[0]).abs() > 0.01


def test_closed_form_maps_uni_everywhere_and_t1_inside_the_mask():
    model = TestMP2RAGEModel.model
    t1 = torch.tensor([0.8, 1.6], dtype=F64)
    gre = model(torch.stack([torch.full_like(t1, 500.0), t1], -1)).numpy()
    values, algorithm = model.closed_form_maps(gre, None, np.array([True, False]))
    np.testing.assert_allclose(values["UNI"], model.uni(t1).numpy(), rtol=1e-12)
    assert values["T1"][0] == pytest.approx(0.8, rel=5e-3) and np.isnan(values["T1"][1])
    assert algorithm.startswith("UNI lookup table")


# --------------------------------------------------------------------------- input forms
# BIDS MP2RAGE collections written from the model: signed inversions, part-mag + part-phase
# (radians and scanner units), part-real + part-imag, a lone UNIT1, magnitude-only inversions
# beside their UNIT1, and complete inversions beside a UNIT1; discovered with pybids, planned in
# pre-flight and mapped.

PROTOCOL = {"RepetitionTimeExcitation": 0.0072, "RepetitionTimePreparation": 5.0,
            "NumberShots": 160, "MagneticFieldStrength": 7}
TIS, FAS = (0.8, 2.7), (4.0, 5.0)
SHAPE = (20, 18, 3)


def _truth() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1, inside, complex inversions [..., 2]) with a smooth receiver phase common to both."""
    x, y, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    inside = x**2 + y**2 < 0.7
    t1 = np.where(inside, 0.8 + 0.7 * (x + 1), 1.0)  # 0.8-2.2 s
    model = MP2RAGEModel(TIS, FAS, 0.0072, 5.0, 80, 80)
    m0 = np.where(inside, 1000.0, 0.0)
    gre = model(torch.as_tensor(np.stack([m0, t1], -1))).numpy()
    phase = np.exp(1j * (2.5 * x - 1.5 * y + 0.3))[..., None]  # wraps: values over ±π
    return t1, inside, gre * phase


def _save(anat: Path, name: str, data: np.ndarray, meta: dict | None) -> None:
    from tests.foundation._helpers import save_nifti

    save_nifti(anat / f"{name}.nii.gz", data)
    if meta is not None:
        (anat / f"{name}.json").write_text(json.dumps(meta))


def _dataset(root: Path, form: str) -> tuple[Path, np.ndarray, np.ndarray]:
    from tests.foundation._helpers import make_tiny_bids

    ds = make_tiny_bids(root, subjects=("01",), suffixes=())
    anat = ds / "sub-01" / "anat"
    t1, inside, gre = _truth()
    uni = MP2RAGEModel.uni_from_signals(torch.as_tensor(gre)).numpy()
    uni = np.where(inside, uni, np.random.default_rng(0).uniform(-0.5, 0.5, SHAPE))
    for k, (ti, fa) in enumerate(zip(TIS, FAS, strict=True), start=1):
        meta = {**PROTOCOL, "InversionTime": ti, "FlipAngle": fa}
        s = gre[..., k - 1]
        prefix = f"sub-01_inv-{k}"
        if form == "signed":
            # phase-corrected: the receiver phase removed, the sign kept
            _save(anat, f"{prefix}_MP2RAGE", np.abs(s) * np.sign(np.cos(np.angle(s)
                                                                         - np.angle(gre[..., 1]))),
                  meta)
        elif form in ("mag-phase", "mag-phase-scanner", "complete+UNIT1"):
            phase = np.angle(s)
            if form == "mag-phase-scanner":
                phase = np.clip(np.round(phase / np.pi * 4096), -4096, 4095)
            _save(anat, f"{prefix}_part-mag_MP2RAGE", np.abs(s), meta)
            _save(anat, f"{prefix}_part-phase_MP2RAGE", phase, meta)
        elif form == "real-imag":
            _save(anat, f"{prefix}_part-real_MP2RAGE", s.real, meta)
            _save(anat, f"{prefix}_part-imag_MP2RAGE", s.imag, meta)
        elif form == "magnitude+UNIT1":
            _save(anat, f"{prefix}_part-mag_MP2RAGE", np.abs(s), meta)
    if form == "UNIT1":
        _save(anat, "sub-01_UNIT1", uni, {**PROTOCOL, "InversionTime": list(TIS),
                                         "FlipAngle": list(FAS)})
    elif form in ("magnitude+UNIT1", "complete+UNIT1"):
        # Siemens stores the UNI in 12 bits (0..4095); its sidecar need not repeat the protocol
        _save(anat, "sub-01_UNIT1", np.round((uni + 0.5) * 4095), {})
    return ds, t1, inside


def _discover(ds: Path, tmp_path: Path):
    from qmri_bids.bids.discovery import discover
    from qmri_bids.config import RunConfig
    from qmri_bids.preflight import preflight

    (found,) = discover(ds, tmp_path / "db", ["01"])
    config = RunConfig(bids_dir=ds, output_dir=tmp_path / "out", analysis_level="participant",
                       work_dir=tmp_path / "work", bias_methods=("n4",))
    problems = preflight([found], config)
    return found, problems


FORMS = {
    "signed": ["inv-1_MP2RAGE", "inv-2_MP2RAGE"],
    "mag-phase": ["inv-1_part-mag_MP2RAGE", "inv-1_part-phase_MP2RAGE",
                  "inv-2_part-mag_MP2RAGE", "inv-2_part-phase_MP2RAGE"],
    "mag-phase-scanner": ["inv-1_part-mag_MP2RAGE", "inv-1_part-phase_MP2RAGE",
                          "inv-2_part-mag_MP2RAGE", "inv-2_part-phase_MP2RAGE"],
    "real-imag": ["inv-1_part-imag_MP2RAGE", "inv-1_part-real_MP2RAGE",
                  "inv-2_part-imag_MP2RAGE", "inv-2_part-real_MP2RAGE"],
    "UNIT1": ["UNIT1"],
    "magnitude+UNIT1": ["inv-1_part-mag_MP2RAGE", "inv-2_part-mag_MP2RAGE", "UNIT1"],
    "complete+UNIT1": ["inv-1_part-mag_MP2RAGE", "inv-1_part-phase_MP2RAGE",
                       "inv-2_part-mag_MP2RAGE", "inv-2_part-phase_MP2RAGE", "UNIT1"],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_input_form_is_discovered_as_one_collection_and_mapped(form, tmp_path, caplog):
    from qmri_bids.qmri.mapping import map_collection

    ds, t1, inside = _dataset(tmp_path / "ds", form)
    caplog.set_level("INFO", logger="qmri_bids")
    found, problems = _discover(ds, tmp_path)
    assert problems == [] and [c.suffix for c in found.collections] == ["MP2RAGE"]
    (collection,) = found.collections
    assert [m.path.name for m in collection.members] == [f"sub-01_{n}.nii.gz" for n in FORMS[form]]
    plan = collection.plan
    assert plan.closed_form and plan.protocol["inversion_time"] == list(TIS)
    assert plan.protocol["flip_angle_deg"] == list(FAS)
    result = map_collection(collection, plan)
    maps = {m.suffix: m.data for m in result.maps}
    assert set(maps) == {"UNIT1", "T1map", "R1map"}
    np.testing.assert_allclose(maps["T1map"][inside], t1[inside], rtol=5e-3)
    if form == "mag-phase-scanner":
        assert "phase in scanner units (-4096..4095" in caplog.text
    if form == "magnitude+UNIT1":
        assert "UNIT1 in scanner units" in caplog.text and "magnitude-only" in caplog.text
    if form == "complete+UNIT1":  # UNI from the inversions, checked against the UNIT1
        assert "UNI computed from the inversions (used) differs from this UNIT1 by a median" \
            in caplog.text and "WARNING" not in caplog.text


def test_the_relative_phase_decides_the_sign_of_the_uni():
    _, inside, gre = _truth()
    signed = MP2RAGEModel.uni_from_signals(torch.as_tensor(gre)).numpy()
    # a common receiver phase cancels; magnitudes alone lose the sign below UNI = 0
    rotated = MP2RAGEModel.uni_from_signals(torch.as_tensor(gre * np.exp(1j * 1.234))).numpy()
    np.testing.assert_allclose(rotated[inside], signed[inside], atol=1e-12)
    assert (signed[inside] < 0).any() and (signed[inside] > 0).any()
    magnitude = MP2RAGEModel.uni_from_signals(torch.as_tensor(np.abs(gre))).numpy()
    assert (magnitude[inside] >= 0).all()


@pytest.mark.parametrize(("remove", "reason"), [
    (["sub-01_inv-1_part-mag_MP2RAGE"], "inversion 1 has part-phase without its part-mag"),
    (["sub-01_inv-1_part-phase_MP2RAGE", "sub-01_inv-2_part-phase_MP2RAGE"],
     "magnitude-only .* add the part-phase images or the UNIT1"),
    (["sub-01_inv-2_part-mag_MP2RAGE", "sub-01_inv-2_part-phase_MP2RAGE"],
     "needs two inversions .* or a UNIT1 image; found 1"),
])
def test_incomplete_collections_are_unusable_naming_the_file(remove, reason, tmp_path):
    from qmri_bids.bids.discovery import NoUsableInputError

    ds, _, _ = _dataset(tmp_path / "ds", "mag-phase")
    for name in remove:
        (ds / "sub-01" / "anat" / f"{name}.nii.gz").unlink()
    # the only input is unusable: exit 65 with the file and the reason
    with pytest.raises(NoUsableInputError, match=r"sub-01_inv-\d_part-\w+_MP2RAGE.nii.gz: .*"
                                                 + reason):
        _discover(ds, tmp_path)


def test_a_phase_image_of_another_shape_is_bad_data_naming_it(tmp_path):
    from qmri_bids.errors import BadDataError
    from qmri_bids.qmri.mapping import map_collection

    ds, _, _ = _dataset(tmp_path / "ds", "mag-phase")
    _save(ds / "sub-01" / "anat", "sub-01_inv-2_part-phase_MP2RAGE",
          np.random.default_rng(1).uniform(-3, 3, (20, 17, 3)), None)
    found, _ = _discover(ds, tmp_path)
    (collection,) = found.collections
    with pytest.raises(BadDataError, match=r"sub-01_inv-2_part-phase_MP2RAGE.nii.gz: image shape "
                                           r"\(20, 17, 3\) differs from "
                                           r"sub-01_inv-1_part-mag_MP2RAGE.nii.gz \(20, 18, 3\)"):
        map_collection(collection, collection.plan)


def test_a_lone_unit1_needs_the_protocol_of_both_inversions_in_its_sidecar(tmp_path):
    ds, _, _ = _dataset(tmp_path / "ds", "UNIT1")
    side = ds / "sub-01" / "anat" / "sub-01_UNIT1.json"
    side.write_text(json.dumps({**PROTOCOL, "InversionTime": 0.8, "FlipAngle": list(FAS)}))
    found, problems = _discover(ds, tmp_path)
    assert found.collections == [] and len(problems) == 1
    assert "sub-01_UNIT1.nii.gz: field 'InversionTime' must list the values of both " \
           "inversions" in problems[0]


def test_unit1_and_phase_scales_are_detected():
    from qmri_bids.errors import BadDataError
    from qmri_bids.qmri.models.mp2rage import phase_to_radians, uni_from_unit1

    uni = np.linspace(-0.5, 0.5, 11)
    np.testing.assert_allclose(uni_from_unit1(uni, "x"), uni)
    np.testing.assert_allclose(uni_from_unit1(uni + 0.5, "x"), uni)
    np.testing.assert_allclose(uni_from_unit1((uni + 0.5) * 4095, "x"), uni)
    with pytest.raises(BadDataError, match="x: UNIT1 values 0..9000"):
        uni_from_unit1(np.array([0.0, 9000.0]), "x")
    rad = np.linspace(-np.pi, np.pi, 9)
    np.testing.assert_allclose(phase_to_radians(rad, "p"), rad)
    np.testing.assert_allclose(phase_to_radians(rad * 4096 / np.pi, "p"), rad)
    np.testing.assert_allclose(phase_to_radians((rad + np.pi) * 4096 / (2 * np.pi), "p"),
                               rad + np.pi)
    with pytest.raises(BadDataError, match="p: phase values"):
        phase_to_radians(np.array([-9000.0, 0.0]), "p")
