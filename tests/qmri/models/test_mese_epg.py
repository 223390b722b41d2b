"""The CPMG EPG model: the checks every registered model passes (its physics against an
independent reference is tested with the EPG engine, ``tests/qmri/test_epg.py``)."""

from __future__ import annotations

import torch

from qmri_bids.qmri.models.mese_epg import MESEEPG

from ._checks import ModelChecks, assert_exact_jacobian


class TestMESEEPG(ModelChecks):
    model = MESEEPG(0.01, 8, t1=0.9, refocus_deg=160.0)
    params = ([1.3, 0.07, 0.85], [40.0, 0.15, 0.95])
    crb_rtol = 1e-4


def test_exact_jacobian_matches_automatic_differentiation():
    """The T2-tangent Jacobian (used by the CRB maps and NLLS at a known B1) equals jacfwd."""
    from qmri_bids.qmri.crb import jacobian_mode

    model = MESEEPG(echo_spacing=0.01, n_echoes=12, t1=1.2, refocus_deg=160.0,
                    estimate_b1=False)
    assert model.has_exact_jacobian and jacobian_mode(model, 2) == "model"
    p = torch.tensor([[1000.0, 0.08], [3.0, 0.02], [50.0, 1.5]], dtype=torch.float64)
    b1 = torch.tensor([1.0, 0.7, 1.25], dtype=torch.float64)
    assert_exact_jacobian(model, p, b1, (3, 12, 2))


def test_exact_jacobian_with_estimated_b1_matches_automatic_differentiation():
    for scales_excitation in (True, False):
        model = MESEEPG(echo_spacing=0.008, n_echoes=10, t1=0.9, refocus_deg=170.0,
                        b1_scales_excitation=scales_excitation)
        p = torch.tensor([[1000.0, 0.08, 0.85], [3.0, 0.02, 1.0], [50.0, 1.5, 0.6]],
                         dtype=torch.float64)
        b1 = torch.tensor([1.0, 0.9, 1.2], dtype=torch.float64)
        for known in (None, b1):
            assert_exact_jacobian(model, p, known, (3, 10, 3))
