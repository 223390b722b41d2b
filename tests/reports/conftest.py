"""Fixtures of the report tests: a generated derivatives tree (seconds) and one real pipeline
run on a small demo (the only pipeline run of these tests, shared by all that need it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.foundation._helpers import DEMO_SHAPE, DEMO_SPACING
from tests.reports._trees import write_dataset, write_participant

ARTIFACTS = REPO_ROOT / ".ci" / "artifacts"


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    """sub-01 clean, sub-02 without a run record (derivatives of an older version), sub-03
    whose MESE mapping crashed; reports not built."""
    out = write_dataset(tmp_path_factory.mktemp("tree") / "out", n=1)
    write_participant(out, "02", seed=2, record=False)
    write_participant(out, "03", crash=True, seed=3)
    return out


@pytest.fixture(scope="session")
def tree_reports(tree) -> dict:
    """The tree with every participant report, the citation files and the group report."""
    from qmri_bids.reports import build_group_report, build_reports

    reports = build_reports(tree)
    group = build_group_report(tree)
    return {"out": tree, "reports": reports, "group": group}


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> dict:
    """The real participant level (``qmri-bids ... --bias-method both --qmri-estimator all``)
    on one small demo participant without its MRF collection (the slowest one), then the
    group level.

    A fresh process: its workers are forked, and this pytest process may have run torch
    already (a parent that used a multi-threaded OpenMP pool before forking deadlocks its
    workers in libgomp).
    """
    from qmri_bids.demo.dataset import DemoSettings, write_demo_dataset

    base = tmp_path_factory.mktemp("pipeline")
    bids = base / "bids"
    write_demo_dataset(bids, DemoSettings(n_subjects=1, shape=DEMO_SHAPE, spacing=DEMO_SPACING))
    dropped = _drop_untrained_collections(bids, base / "db")
    for path in list(bids.rglob("*")):
        if path.is_file() and "derivatives" not in path.parts and "mrf" in path.name.lower():
            path.unlink()
    out, work = base / "out", base / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "from qmri_bids.cli.run import main; raise SystemExit(main())",
         str(bids), str(out), "participant",
         "-w", str(work), "--nprocs", "2", "--omp-nthreads", "1", "--bias-method", "both",
         "--qmri-estimator", "all", "--skip-bids-validation", "--resource-monitor"],
        capture_output=True, text=True, timeout=900, cwd=REPO_ROOT, env=env, check=False)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    from qmri_bids.reports import build_group_report

    group = build_group_report(out)
    return {"bids": bids, "out": out, "work": work, "stdout": proc.stdout,
            "stderr": proc.stderr, "seconds": seconds, "group": group, "dropped": dropped}


def _drop_untrained_collections(bids: Path, db: Path) -> list[str]:
    """Remove the collections (not MRF, removed anyway) whose protocol has no verified network
    in this tree: training one on demand takes minutes, which these tests must not spend
    (the shipped networks are re-exported when the estimator version changes)."""
    from qmri_bids.bids.discovery import discover
    from qmri_bids.qmri.plan import plan_collection

    dropped = []
    for inputs in discover(bids, db, ["01"]):
        for col in inputs.collections:
            if col.suffix == "MRF":
                continue
            plan = plan_collection(col, estimators=("nn",), model_dir=db / "models")
            if plan.network is not None and plan.network.train_on_demand:
                dropped.append(col.suffix)
                for member in col.members:
                    for path in (member.path, member.path.with_name(
                            member.path.name.replace(".nii.gz", ".json"))):
                        path.unlink(missing_ok=True)
    return dropped


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None
