"""The double-angle B1+ model (TB1DAM, closed form; it provides the TB1map of its participant)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.base import B1_MAP
from qmri_bids.qmri.models import TB1DAMModel, VFAModel
from qmri_bids.qmri.models.tb1dam import double_angle_b1, saturation_bias

from ._checks import F64, ModelChecks


class TestTB1DAMModel(ModelChecks):
    model = TB1DAMModel(60.0)
    params = ([1000.0, 1.0], [500.0, 0.8], [200.0, 1.25])


def _b1_field() -> np.ndarray:
    """A smooth B1+ over 0.75-1.3 on a 9 x 7 grid."""
    x, y = np.meshgrid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 7), indexing="ij")
    return 1.0 + 0.2 * x + 0.1 * y - 0.05 * x * y


def test_closed_form_inverts_the_long_tr_signal_exactly():
    model = TB1DAMModel(60.0)
    kappa = _b1_field()
    truth = torch.from_numpy(np.stack([np.full_like(kappa, 800.0), kappa], -1))
    data = model(truth).numpy()
    np.testing.assert_allclose(data[..., 1] / data[..., 0], 2 * np.cos(kappa * np.pi / 3))
    values, algorithm = model.closed_form_maps(data, None, np.ones(kappa.shape, bool))
    np.testing.assert_allclose(values["B1"], kappa, rtol=1e-12)
    assert "arccos(S(2a) / (2 S(a)))" in algorithm and "TR >> T1" in algorithm


def test_closed_form_with_noise_and_a_mask():
    model = TB1DAMModel(60.0)
    kappa = _b1_field()
    clean = model(torch.from_numpy(np.stack([np.full_like(kappa, 1000.0), kappa], -1))).numpy()
    rng = np.random.default_rng(0)
    noisy = np.hypot(clean + rng.normal(0, 2.0, clean.shape), rng.normal(0, 2.0, clean.shape))
    mask = np.ones(kappa.shape, bool)
    mask[0] = False
    b1 = model.closed_form_maps(noisy, None, mask)[0]["B1"]
    assert np.isnan(b1[0]).all()
    assert np.abs(b1[1:] / kappa[1:] - 1).max() < 0.02  # SNR ~500-900 in the α image


def test_long_tr_is_valid_and_a_short_tr_is_biased_as_predicted():
    """Simulated with the project's spoiled-gradient-echo (VFA) model, which has T1 saturation:
    at TR = 8 T1 the double-angle B1 is right; at TR = 0.67 T1 it is ~+20 % off, as
    :func:`saturation_bias` predicts (from the same physics) and the warning reports."""
    kappa, t1 = _b1_field(), 1.2
    params = torch.from_numpy(np.stack([np.full_like(kappa, 1000.0), np.full_like(kappa, t1)],
                                       -1))
    b1 = torch.from_numpy(kappa)

    def double_angle(tr: float) -> np.ndarray:
        data = VFAModel([60.0, 120.0], [tr, tr])(params, b1).numpy()
        return TB1DAMModel(60.0).closed_form_maps(data, None, np.ones(kappa.shape, bool))[0]["B1"]

    assert np.abs(double_angle(8 * t1) / kappa - 1).max() < 5e-3
    short = double_angle(0.8)
    assert np.median(short / kappa - 1) > 0.15
    predicted = saturation_bias(60.0, 0.8, t1)
    # at nominal B1 exactly as predicted (the bias varies a little with κ elsewhere)
    nominal = VFAModel([60.0, 120.0], [0.8, 0.8])(torch.tensor([1.0, t1], dtype=F64)).numpy()
    assert double_angle_b1(nominal[0], nominal[1], 60.0) - 1 == pytest.approx(predicted)
    assert abs(saturation_bias(60.0, 10 * t1, t1)) < 1e-3


def test_ratio_is_clipped_and_invalid_voxels_are_nan():
    s_alpha = np.array([100.0, 100.0, 100.0, 0.0, np.nan])
    s_double = np.array([250.0, 0.0, 100.0, 50.0, 10.0])  # ratio 1.25, 0, 0.5, -, -
    b1 = double_angle_b1(s_alpha, s_double, 60.0)
    assert b1[0] == 0.0  # ratio clipped to 1: arccos(1) = 0
    assert b1[1] == pytest.approx(1.5)  # ratio 0: κα = 90 deg, the unambiguous limit
    assert b1[2] == pytest.approx(1.0)
    assert np.isnan(b1[3:]).all()


def _members(flips, metas):
    return [SimpleNamespace(path=f"sub-x_flip-{i}_TB1DAM.nii.gz", entities={"flip": str(i)},
                            metadata={"FlipAngle": fa, **meta})
            for i, (fa, meta) in enumerate(zip(flips, metas, strict=True), start=1)]


def test_sidecars_give_the_protocol_and_warn_about_a_short_tr(caplog):
    long_tr = [{"RepetitionTime": 10.0}] * 2
    model = TB1DAMModel.from_sidecars(_members((60, 120), long_tr))
    assert model.to_protocol() == {"flip_angle_deg": 60.0}
    with caplog.at_level(logging.INFO, logger="qmri_bids.qmri"):
        TB1DAMModel.from_sidecars(_members((60, 120), [{"RepetitionTime": 2.0}] * 2))
        TB1DAMModel.from_sidecars(_members((45, 90.3), [{}, {}]))  # within 1 % of 2α
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "RepetitionTime 2 s is short against T1" in warning[0].message
    assert f"{100 * saturation_bias(60.0, 2.0):+.1f} %" in warning[0].message
    assert "no RepetitionTime" in caplog.text


@pytest.mark.parametrize(("flips", "message"), [
    ((60, 110), "needs the second to be twice the first"),
    ((90, 180), "not below 90 deg"),
    ((60, 60), "FlipAngle is 60 for all members"),
])
def test_impossible_protocols_name_the_files(flips, message):
    with pytest.raises(BadDataError, match=message) as exc:
        TB1DAMModel.from_sidecars(_members(flips, [{}, {}]))
    assert "sub-x_flip-1_TB1DAM.nii.gz" in str(exc.value)


def test_exactly_two_members():
    three = _members((30, 60, 120), [{}] * 3)
    path, reason = TB1DAMModel.members_problem(three)
    assert path == three[0].path and "exactly two members" in reason and "found 3" in reason
    assert TB1DAMModel.members_problem(three[1:]) is None
    with pytest.raises(BadDataError, match="exactly 2 members"):
        TB1DAMModel.from_sidecars(three)


def test_it_provides_the_b1_map_and_never_consumes_one():
    model = TB1DAMModel(60.0)
    assert TB1DAMModel.provides == B1_MAP
    assert [o.suffix for o in TB1DAMModel.outputs] == [B1_MAP]
    assert not model.uses_b1()
    p = torch.tensor([[1000.0, 0.9]], dtype=F64)
    torch.testing.assert_close(model(p, torch.tensor([0.7], dtype=F64)), model(p))
    # what it provides is what the B1-dependent models take
    assert VFAModel([3.0, 20.0], [0.015, 0.015]).uses_b1()
