"""Fixtures of the workflow-level tests (participant runs of the demo and of ds-real).

Runs are expensive (a demo participant run takes ~80 s on 2 busy cores), so each module makes
its run once (module scope) and shares it among several assertions. Helpers: ``_wf_helpers``
(imported as ``tests.workflows._wf_helpers``); the build-only graph tests
(``test_wf_build.py``) need no run at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.foundation._helpers import DEMO_SHAPE, DEMO_SPACING


@pytest.fixture(scope="session")
def wf_demo(tmp_path_factory) -> Path:
    """A 1-participant demo dataset (small shape, see foundation._helpers); read-only."""
    from qmri_bids.demo.dataset import DemoSettings, write_demo_dataset

    root = tmp_path_factory.mktemp("wf_demo") / "ds"
    write_demo_dataset(root, DemoSettings(n_subjects=1, shape=DEMO_SHAPE, spacing=DEMO_SPACING))
    return root


