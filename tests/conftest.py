"""Shared fixtures: where the real data live, and skips when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QMRI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DS_REAL = SHARED_DATA / "ds-real"


@pytest.fixture(scope="session")
def ds_real() -> Path:
    """The real BIDS dataset ``../shared/data/ds-real`` (read-only); skip when it is absent."""
    if not (DS_REAL / "dataset_description.json").is_file():
        pytest.skip(f"real dataset not found at {DS_REAL} (set QMRI_SHARED_DATA to its parent)")
    return DS_REAL


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    ref = SHARED_DATA / "reference"
    if not ref.is_dir():
        pytest.skip(f"reference maps not found at {ref}")
    return ref


@pytest.fixture(autouse=True)
def _reset_qmri_bids_logger():
    """In-process CLI runs (also inside module-scoped fixtures) configure the ``qmri_bids``
    logger for a terminal: own handlers, no propagation. Reset it around every test so that
    ``caplog`` sees the messages wherever the test runs in the session."""
    import logging

    def reset() -> None:
        logger = logging.getLogger("qmri_bids")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)

    reset()
    yield
    reset()
