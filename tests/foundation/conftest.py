"""Fixtures of the foundation test suite (helpers are in ``_helpers``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ._helpers import DEMO_SHAPE, DEMO_SPACING


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo dataset (2 participants, small shape), written once; treat it as read-only."""
    from qmri_bids.demo.dataset import DemoSettings, write_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "ds"
    write_demo_dataset(root, DemoSettings(n_subjects=2, shape=DEMO_SHAPE, spacing=DEMO_SPACING))
    return root


@pytest.fixture()
def demo_copy(demo_dir, tmp_path) -> Path:
    """A private, modifiable copy of the demo dataset (without its derivatives)."""
    dst = tmp_path / "demo"
    shutil.copytree(demo_dir, dst, ignore=shutil.ignore_patterns("derivatives"))
    return dst


@pytest.fixture()
def isolated_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """HOME and the working directory moved to empty temporary folders (to catch stray writes)."""
    home = tmp_path / "home"
    cwd = tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return {"home": home, "cwd": cwd}
