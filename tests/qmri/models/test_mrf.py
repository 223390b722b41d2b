"""FISP-MRF model, schedules and the MRF BIDS convention."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qmri_bids.qmri.models import MODELS
from qmri_bids.qmri.models.mrf import (
    DEFAULT_MRF_STATES,
    MRFModel,
    MRFSchedule,
    default_mrf_schedule,
    default_schedule_path,
    load_mrf_series,
    read_mrf_schedule,
    schedule_tsv_path,
    write_mrf_series,
)

from ._checks import ModelChecks, assert_exact_jacobian


def short_schedule(n: int = 60, inversion: float | None = 0.02) -> MRFSchedule:
    return default_mrf_schedule(n_timepoints=n, n_lobes=2, inversion_time_s=inversion)


def bloch_fisp(schedule: MRFSchedule, t1: float, t2: float, b1: float, n_iso: int) -> np.ndarray:
    """Independent isochromat (Bloch) simulation of FISP: ``n_iso`` spins spread uniformly over
    the 2*pi dephasing of one gradient unit; i*mean(Mx + iMy) at each TE. Exact while
    ``n_iso > 2 * n_timepoints`` (no aliasing of dephasing orders)."""
    phases = 2 * np.pi * np.arange(n_iso) / n_iso
    m = np.zeros((3, n_iso))
    m[2] = 1.0
    if schedule.inversion_time is not None:
        m[2] = -1.0
        ti = schedule.inversion_time
        m[:2] *= math.exp(-ti / t2)
        m[2] = m[2] * math.exp(-ti / t1) + 1 - math.exp(-ti / t1)

    def relax(m: np.ndarray, t: float) -> np.ndarray:
        e1, e2 = math.exp(-t / t1), math.exp(-t / t2)
        return np.stack([m[0] * e2, m[1] * e2, m[2] * e1 + 1 - e1])

    out = []
    for fa, tr, te, ph in zip(schedule.flip_angle_deg, schedule.tr, schedule.te,
                              schedule.rf_phase_deg, strict=True):
        a, p = math.radians(fa) * b1, math.radians(ph)
        # rotation by a about the axis (cos p, sin p, 0), right-handed
        ux, uy = math.cos(p), math.sin(p)
        c, s = math.cos(a), math.sin(a)
        rot = np.array([
            [c + ux * ux * (1 - c), ux * uy * (1 - c), uy * s],
            [ux * uy * (1 - c), c + uy * uy * (1 - c), -ux * s],
            [-uy * s, ux * s, c],
        ])
        m = relax(rot @ m, te)
        out.append(1j * np.mean(m[0] + 1j * m[1]))
        m = relax(m, tr - te)
        mxy = (m[0] + 1j * m[1]) * np.exp(1j * phases)  # one gradient unit
        m = np.stack([mxy.real, mxy.imag, m[2]])
    return np.array(out)


class TestMRFModel(ModelChecks):
    # a short schedule keeps the generic checks (gradcheck: outputs x parameters) fast
    model = MRFModel(short_schedule(12), n_states=8)
    params = ([1.0, 0.2, 0.8, 0.06, 1.0], [0.5, -0.5, 1.5, 0.2, 0.85])
    crb_rtol = 1e-4


def test_forward_shape_dtype_complex_finite():
    model = MRFModel(short_schedule())
    assert model.is_complex and MODELS["mrf"] is MRFModel
    assert model.parameter_names == ("M0_re", "M0_im", "T1", "T2", "B1")
    p = torch.tensor([1.0, 0.5, 0.8, 0.06, 0.9]).expand(2, 3, 5)
    sig = model(p)
    assert sig.shape == (2, 3, 60) and sig.dtype == torch.complex64
    assert torch.all(torch.isfinite(sig.real)) and torch.all(torch.isfinite(sig.imag))
    sig64 = model(p.double())
    assert sig64.dtype == torch.complex128
    torch.testing.assert_close(sig64.to(torch.complex64), sig, rtol=1e-4, atol=1e-6)
    # the complex M0 carries the phase: signal = M0 * real fingerprint
    fp = model.fingerprint(p[..., 2].double(), p[..., 3].double(), p[..., 4].double())
    assert not fp.is_complex()
    m0 = torch.complex(p[..., 0], p[..., 1]).to(torch.complex128)
    torch.testing.assert_close(sig64, m0[..., None] * fp)
    # inversion: the first samples have the opposite sign of late ones (T1 recovery through 0)
    assert fp[0, 0, 0] < 0 < fp[0, 0, -1]


@pytest.mark.parametrize("t1,t2,b1", [(0.3, 0.02, 1.0), (1.2, 0.15, 0.8), (2.0, 1.0, 1.15)])
def test_matches_bloch_isochromat_simulation(t1, t2, b1):
    sched = short_schedule(40)
    model = MRFModel(sched, n_states="exact")
    sig = model(torch.tensor([1.0, 0.0, t1, t2, b1], dtype=torch.float64)).numpy()
    ref = bloch_fisp(sched, t1, t2, b1, n_iso=2 * sched.n_timepoints + 2)
    np.testing.assert_allclose(sig, ref, atol=1e-12)


def test_real_path_equals_complex_path_and_rf_phases():
    sched = short_schedule(50)
    p = torch.tensor([[1.0, 0.0, 0.9, 0.08, 1.0], [0.3, -0.7, 0.4, 0.03, 0.7]], dtype=torch.float64)
    a = MRFModel(sched)(p)
    b = MRFModel(sched, force_complex=True)(p)
    torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    # non-zero RF phases take the complex path and agree with the Bloch reference
    rng = np.random.RandomState(1)
    phased = MRFSchedule(sched.flip_angle_deg, sched.tr, sched.te,
                         rng.uniform(-180, 180, sched.n_timepoints), sched.inversion_time)
    model = MRFModel(phased, n_states="exact")
    sig = model(torch.tensor([1.0, 0.0, 0.9, 0.08, 0.95], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(sig, bloch_fisp(phased, 0.9, 0.08, 0.95, 102), atol=1e-12)


def test_default_truncation_error_within_documented_bound():
    model = MRFModel()  # default 500-point schedule, DEFAULT_MRF_STATES orders
    assert model.n_states == DEFAULT_MRF_STATES and model.n_timepoints == 500
    exact = MRFModel(n_states="exact")
    t1 = torch.tensor([0.3, 1.0, 2.0, 1.5, 3.2], dtype=torch.float64)
    t2 = torch.tensor([0.03, 0.1, 0.3, 1.0, 1.6], dtype=torch.float64)
    err = (model.fingerprint(t1, t2) - exact.fingerprint(t1, t2)).abs().amax(-1)
    rel = err / exact.fingerprint(t1, t2).abs().amax(-1)
    bounds = torch.tensor([2e-4, 2e-4, 2e-4, 3e-3, 1e-2], dtype=torch.float64)
    assert torch.all(rel < bounds), rel


def test_gradients_match_finite_differences():
    model = MRFModel(short_schedule(40), n_states=16)
    p0 = torch.tensor([0.8, 0.3, 0.9, 0.07, 0.92], dtype=torch.float64)
    # torch.func needs real outputs: differentiate the (real, imag) view
    def real_view(p: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(model(p))

    jac = torch.func.jacfwd(real_view)(p0)
    assert jac.shape == (40, 2, 5)
    for i, h in enumerate((1e-6, 1e-6, 1e-6, 1e-7, 1e-6)):
        dp = torch.zeros(5, dtype=torch.float64)
        dp[i] = h
        fd = (real_view(p0 + dp) - real_view(p0 - dp)) / (2 * h)
        torch.testing.assert_close(jac[..., i], fd, rtol=1e-5, atol=1e-8)
    assert jac[..., 2:].abs().amax() > 0  # T1, T2, B1 columns are informative
    torch.testing.assert_close(torch.func.jacrev(real_view)(p0), jac)


def test_b1_parameter_and_known_b1_multiply():
    sched = short_schedule(30)
    fixed = MRFModel(sched, estimate_b1=False)
    free = MRFModel(sched)
    assert fixed.parameter_names == ("M0_re", "M0_im", "T1", "T2")
    p = torch.tensor([1.0, 0.0, 1.0, 0.1], dtype=torch.float64)
    b1 = torch.tensor(0.85, dtype=torch.float64)
    torch.testing.assert_close(fixed(p, b1), free(torch.cat([p, b1[None]])))
    torch.testing.assert_close(free(torch.cat([p, torch.tensor([0.5], dtype=torch.float64)]),
                                    torch.tensor(1.7, dtype=torch.float64)), fixed(p, b1))


def test_crb_finite_and_positive():
    from qmri_bids.qmri import crb as crb_mod
    model = MRFModel(short_schedule(80), n_states=20)
    p = torch.tensor([[1.0, 0.2, 0.8, 0.06, 1.0], [0.5, -0.5, 1.5, 0.2, 0.85]],
                     dtype=torch.float64)
    var = crb_mod.crb(model, p, sigma=0.01)
    assert var.shape == (2, 5)
    assert torch.all(torch.isfinite(var)) and torch.all(var > 0)
    # a noisier acquisition has a proportionally larger bound
    torch.testing.assert_close(crb_mod.crb(model, p, sigma=0.02), 4 * var, rtol=1e-6, atol=0)


def test_packaged_default_schedule_is_the_generator_output(tmp_path):
    sched = default_mrf_schedule()
    assert sched.n_timepoints == 500
    assert 5.0 <= sched.flip_angle_deg.min() and sched.flip_angle_deg.max() <= 60.0
    assert 0.011 - 1e-9 <= sched.tr.min() and sched.tr.max() <= 0.015 + 1e-9
    path = default_schedule_path()
    side = json.loads(path.with_suffix(".json").read_text())
    packaged = MRFSchedule.from_tsv(path, inversion_time=side["InversionTime"])
    for attr in ("flip_angle_deg", "tr", "te", "rf_phase_deg"):
        np.testing.assert_array_equal(getattr(packaged, attr), getattr(sched, attr))
    assert packaged.inversion_time == sched.inversion_time == 0.02
    # deterministic
    np.testing.assert_array_equal(default_mrf_schedule().tr, sched.tr)


def test_schedule_sidecar_and_tsv_reading(tmp_path):
    sched = short_schedule(25)
    nii = tmp_path / "sub-01_acq-fisp_part-mag_MRF.nii.gz"
    assert schedule_tsv_path(nii).name == "sub-01_acq-fisp_mrfschedule.tsv"
    # inline sidecar arrays win
    meta = sched.to_sidecar()
    got = read_mrf_schedule(nii, meta)
    np.testing.assert_array_equal(got.flip_angle_deg, sched.flip_angle_deg)
    assert got.inversion_time == 0.02
    # otherwise the TSV beside the NIfTI, EchoTime/InversionTime from the sidecar
    with pytest.raises(FileNotFoundError):
        read_mrf_schedule(nii, {"EchoTime": 0.002})
    sched.to_tsv(schedule_tsv_path(nii))
    got = read_mrf_schedule(nii, {"EchoTime": 0.002})
    np.testing.assert_array_equal(got.tr, sched.tr)
    assert got.inversion_time is None  # no InversionTime anywhere: no inversion
    got = read_mrf_schedule(nii, {"InversionTime": 0.05})
    assert got.inversion_time == 0.05


def test_write_and_load_series_round_trip(tmp_path):
    sched = short_schedule(20)
    model = MRFModel(sched)
    params = torch.tensor([[[0.7, -0.4, 1.0, 0.08, 1.0], [1.0, 0.2, 0.5, 0.04, 0.9]]])
    data = model(params).numpy()[:, :, None, :]  # (1, 2, 1, 20)
    for inline in (False, True):
        out = tmp_path / ("inline" if inline else "tsv")
        written = write_mrf_series(out, "sub-01_acq-fisp", data, np.eye(4), sched, inline)
        names = {p.name for p in written}
        assert "sub-01_acq-fisp_part-phase_MRF.nii.gz" in names
        assert ("sub-01_acq-fisp_mrfschedule.tsv" in names) is not inline
        loaded, _affine, got = load_mrf_series(out / "sub-01_acq-fisp_part-phase_MRF.nii.gz")
        np.testing.assert_allclose(loaded, data, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.flip_angle_deg, sched.flip_angle_deg)
        assert got.inversion_time == sched.inversion_time


def test_invalid_schedules_rejected():
    with pytest.raises(ValueError):
        MRFSchedule([10.0, 20.0], [0.01, 0.01], 0.02)  # TE > TR
    with pytest.raises(ValueError):
        MRFSchedule([], 0.01, 0.002)


MRF_TRUTH = [[0.8, -0.6, 0.9, 0.07], [1.2, 0.4, 0.35, 0.025]]


def test_dictionary_initial_guess():
    model = MRFModel(short_schedule(100), n_states=16, estimate_b1=False)
    truth = torch.tensor(MRF_TRUTH, dtype=torch.float64)
    start = model.initial_guess(model(truth))
    assert start.shape == (2, 4) and start.dtype == torch.float64
    assert torch.all((start[:, 2:] / truth[:, 2:]).log().abs() < math.log(1.3))
    m0 = torch.complex(start[:, 0], start[:, 1]) / torch.complex(truth[:, 0], truth[:, 1])
    assert torch.all((m0.abs() - 1).abs() < 0.3) and torch.all(m0.angle().abs() < 0.1)


def test_nlls_on_complex_mrf_data():
    from qmri_bids.qmri import nlls
    model = MRFModel(short_schedule(100), n_states=16, estimate_b1=False)
    truth = torch.tensor(MRF_TRUTH, dtype=torch.float64)
    data = model(truth)
    fit = nlls.fit_nlls(model, data)
    torch.testing.assert_close(fit.params, truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inversion", [0.02, None])
def test_exact_jacobian_matches_automatic_differentiation(inversion):
    """The tangent-propagated Jacobian (used by the CRB maps and NLLS) equals jacfwd through
    the simulation, with and without an inversion, at known B1 values."""
    from qmri_bids.qmri.crb import jacobian_mode

    model = MRFModel(short_schedule(50, inversion), n_states=16, estimate_b1=False)
    assert model.has_exact_jacobian and jacobian_mode(model, 4) == "model"
    p = torch.tensor([[0.8, 0.3, 0.9, 0.07], [-0.5, 1.1, 2.5, 0.4], [1.0, 0.0, 0.15, 0.012]],
                     dtype=torch.float64)
    b1 = torch.tensor([1.0, 0.75, 1.3], dtype=torch.float64)
    assert_exact_jacobian(model, p, b1, (3, 100, 4), atol=1e-10)


def test_exact_jacobian_not_claimed_where_it_does_not_apply():
    from qmri_bids.qmri.crb import jacobian_mode

    assert not MRFModel(short_schedule(20), n_states=8).has_exact_jacobian  # B1 estimated
    phased = MRFModel(MRFSchedule(flip_angle_deg=np.full(20, 20.0), tr=np.full(20, 0.01),
                                  te=np.full(20, 0.002), rf_phase_deg=np.arange(20) * 10.0),
                      n_states=8, estimate_b1=False)
    assert not phased.has_exact_jacobian and jacobian_mode(phased, 4) != "model"
    with pytest.raises(NotImplementedError):
        phased.jacobian(torch.tensor([1.0, 0.0, 1.0, 0.1], dtype=torch.float64))
