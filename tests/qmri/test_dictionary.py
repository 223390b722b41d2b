"""Dictionary matching (MRF and EPG multi-echo spin echo)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmri_bids.qmri.dictionary import (
    DictionaryGrid,
    DictionaryMatcher,
    default_mese_epg_grid,
    default_mrf_grid,
    geometric_axis,
)
from qmri_bids.qmri.models.mese_epg import MESEEPG
from qmri_bids.qmri.models.mrf import MRFModel, MRFSchedule, default_mrf_schedule

REL_STEP = 0.1


@pytest.fixture(scope="module")
def mrf_model() -> MRFModel:
    # 300 time points: shorter schedules have T1/T2 ridges along which an off-grid signal can
    # match an atom two steps away (a property of the schedule, not of the matcher)
    sched = default_mrf_schedule(n_timepoints=300, n_lobes=3)
    return MRFModel(sched, n_states=16)


@pytest.fixture(scope="module")
def mrf_matcher(mrf_model: MRFModel) -> DictionaryMatcher:
    grid = default_mrf_grid(rel_step=REL_STEP, t1_range=(0.1, 3.0), t2_range=(0.01, 1.0))
    return DictionaryMatcher(mrf_model, grid)


def test_geometric_axis_spacing():
    ax = geometric_axis(0.05, 4.0, 0.05)
    assert ax[0] == pytest.approx(0.05) and ax[-1] == pytest.approx(4.0)
    assert np.all(ax[1:] / ax[:-1] <= 1.05 + 1e-12)
    assert np.allclose(ax[1:] / ax[:-1], ax[1] / ax[0])


def test_grid_constraint_and_description(mrf_matcher):
    pts = mrf_matcher.grid.points()
    assert np.all(pts["T2"] <= pts["T1"])
    desc = mrf_matcher.info["grid"]
    assert desc["T1"]["relative_step"] <= REL_STEP + 1e-9
    assert mrf_matcher.info["n_atoms"] == len(pts["T1"]) < desc["T1"]["n"] * desc["T2"]["n"]
    assert 1 <= mrf_matcher.n_components < mrf_matcher.n_timepoints
    assert mrf_matcher.energy_retained >= 0.99999
    assert mrf_matcher.real_atoms  # FISP with 0 RF phase: real fingerprints


def test_mrf_on_grid_exact_with_complex_m0(mrf_model, mrf_matcher):
    rng = np.random.default_rng(3)
    idx = torch.as_tensor(rng.choice(mrf_matcher.n_atoms, 64, replace=False))
    t1 = mrf_matcher.atom_values["T1"][idx]
    t2 = mrf_matcher.atom_values["T2"][idx]
    m0 = torch.polar(torch.as_tensor(rng.uniform(0.5, 2, 64)),
                     torch.as_tensor(rng.uniform(-3, 3, 64)))
    params = torch.stack([m0.real, m0.imag, t1, t2, torch.ones_like(t1)], -1)
    data = mrf_model(params).reshape(8, 8, -1)
    fit = mrf_matcher.match(data)
    assert fit.index.shape == (8, 8)
    assert torch.equal(fit.index.reshape(-1), idx)
    torch.testing.assert_close(fit["T1"].reshape(-1), t1.float())
    torch.testing.assert_close(fit["T2"].reshape(-1), t2.float())
    torch.testing.assert_close(fit.m0.reshape(-1), m0.to(torch.complex64), rtol=1e-4, atol=1e-5)
    assert torch.all(fit.correlation > 0.9999)
    # params are in model order and reproduce the data (usable as an NLLS start)
    assert fit.parameter_names == mrf_model.parameter_names
    torch.testing.assert_close(mrf_model(fit.params.double()).reshape(data.shape), data,
                               rtol=1e-3, atol=1e-4)


def test_mrf_off_grid_within_one_step(mrf_model, mrf_matcher):
    rng = np.random.default_rng(4)
    t1 = torch.as_tensor(np.exp(rng.uniform(np.log(0.2), np.log(2.5), 80)))
    t2 = torch.as_tensor(np.exp(rng.uniform(np.log(0.02), np.log(0.5), 80)))
    t2 = torch.minimum(t2, 0.8 * t1)
    one = torch.ones_like(t1)
    params = torch.stack([one, torch.zeros_like(t1), t1, t2, one], -1)
    fit = mrf_matcher.match(mrf_model(params))
    step = math.log1p(REL_STEP)
    assert torch.all((fit["T1"].double() / t1).log().abs() <= step + 1e-6)
    assert torch.all((fit["T2"].double() / t2).log().abs() <= step + 1e-6)


def test_chunking_bounds_memory_and_changes_nothing(mrf_model):
    grid = default_mrf_grid(rel_step=0.25, t1_range=(0.1, 3.0), t2_range=(0.01, 1.0))
    big = DictionaryMatcher(mrf_model, grid)
    # tiny chunks: <= 3000 scores per matching chunk, dictionary simulated twice (not stored)
    small = DictionaryMatcher(mrf_model, grid, atom_chunk=37, max_elements=3000)
    assert small.voxel_chunk() * small.n_atoms <= 3000
    assert small.n_atoms * small.n_timepoints > 8 * small.max_elements  # two-pass build used
    assert small.n_components == big.n_components
    torch.testing.assert_close(small.atoms.abs(), big.atoms.abs(), atol=1e-5, rtol=0)
    params = torch.tensor([[0.9, 0.1, 0.8, 0.07, 1.0]] * 50 + [[1.1, -0.3, 1.7, 0.2, 1.0]] * 50,
                          dtype=torch.float64)
    noise = torch.randn(100, mrf_model.n_timepoints, dtype=torch.complex128,
                        generator=torch.Generator().manual_seed(0))
    data = mrf_model(params) + 0.002 * noise
    a, b = big.match(data), small.match(data)
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.m0, b.m0, rtol=1e-4, atol=1e-5)


def test_fixed_number_of_components_and_mask(mrf_model, mrf_matcher):
    m = DictionaryMatcher(mrf_model, mrf_matcher.grid, n_components=4)
    assert m.n_components == 4 and m.energy_retained < mrf_matcher.energy_retained
    data = mrf_model(torch.tensor([1.0, 0.0, 1.0, 0.1, 1.0]).expand(3, 5))
    fit = m.match(data, mask=torch.tensor([True, False, True]))
    assert fit.index[1] == -1 and torch.isnan(fit["T1"][1]) and fit.m0[1] == 0
    assert torch.all(fit.index[[0, 2]] >= 0)


def test_mese_epg_recovers_t2_and_b1_and_uses_known_b1():
    model = MESEEPG(0.01, 12)
    grid = default_mese_epg_grid(rel_step=0.05, b1=np.round(np.arange(0.6, 1.0001, 0.05), 3))
    matcher = DictionaryMatcher(model, grid)
    assert not matcher.real_atoms or not model.is_complex
    idx = torch.tensor([3, 50, 120, matcher.n_atoms - 1])
    t2 = matcher.atom_values["T2"][idx]
    b1 = matcher.atom_values["B1"][idx]
    data = model(torch.stack([torch.full_like(t2, 250.0), t2, b1], -1))
    fit = matcher.match(data)
    assert torch.equal(fit.index, idx)
    torch.testing.assert_close(fit["M0"], torch.full((4,), 250.0), rtol=1e-4, atol=0)
    # a known B1 map restricts the search to the nearest B1 slice of the dictionary
    fit_b1 = matcher.match(data, b1=b1 + 0.01)
    assert torch.equal(fit_b1.index, idx)
    wrong = matcher.match(data, b1=torch.full((4,), 0.6, dtype=torch.float64))
    assert torch.allclose(wrong["B1"], torch.tensor(0.6))


def test_b1_axis_as_known_argument_of_a_fixed_b1_model():
    model = MESEEPG(0.01, 10, estimate_b1=False)
    grid = DictionaryGrid({"T2": geometric_axis(0.02, 0.5, 0.05), "B1": [0.7, 0.85, 1.0]},
                          constraint=None)
    matcher = DictionaryMatcher(model, grid)
    assert matcher.b1_as_argument
    data = model(torch.tensor([[2.0, 0.1]], dtype=torch.float64), torch.tensor([0.85]))
    fit = matcher.match(data)
    assert fit["B1"][0] == pytest.approx(0.85) and fit.params.shape == (1, 2)


def test_grid_must_cover_model_parameters(mrf_model):
    with pytest.raises(ValueError, match="neither a grid axis"):
        DictionaryMatcher(mrf_model, DictionaryGrid({"T1": [1.0], "T2": [0.1]}))


def test_complex_atoms_with_rf_phases():
    # quadratic RF phase cycling makes the unit-M0 fingerprints genuinely complex
    base = default_mrf_schedule(n_timepoints=120, n_lobes=2)
    phase = 0.5 * np.arange(base.n_timepoints) ** 2 % 360.0
    sched = MRFSchedule(base.flip_angle_deg, base.tr, base.te, phase, base.inversion_time)
    model = MRFModel(sched, n_states=16)
    grid = default_mrf_grid(rel_step=0.2, t1_range=(0.1, 3.0), t2_range=(0.01, 1.0))
    matcher = DictionaryMatcher(model, grid, atom_chunk=100)
    assert not matcher.real_atoms and matcher.atoms.is_complex()
    idx = torch.tensor([0, 17, 101, matcher.n_atoms - 1])
    t1, t2 = matcher.atom_values["T1"][idx], matcher.atom_values["T2"][idx]
    m0 = torch.polar(torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([0.3, -2.0, 1.0, 3.0]))
    params = torch.stack([m0.real.double(), m0.imag.double(), t1, t2, torch.ones_like(t1)], -1)
    fit = matcher.match(model(params))
    assert torch.equal(fit.index, idx)
    torch.testing.assert_close(fit.m0, m0, rtol=1e-4, atol=1e-5)
