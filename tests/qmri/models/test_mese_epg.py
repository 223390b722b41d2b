"""The CPMG EPG model: the checks every registered model passes (its physics against an
independent reference is tested with the EPG engine, ``tests/qmri/test_epg.py``)."""

from __future__ import annotations

from qmri_bids.qmri.models.mese_epg import MESEEPG

from ._checks import ModelChecks


class TestMESEEPG(ModelChecks):
    model = MESEEPG(0.01, 8, t1=0.9, refocus_deg=160.0)
    params = ([1.3, 0.07, 0.85], [40.0, 0.15, 0.95])
    crb_rtol = 1e-4
