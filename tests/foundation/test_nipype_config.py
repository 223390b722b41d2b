"""Nipype execution settings chosen by the CLI must reach the workflow that runs.

Nipype deep-copies its global configuration into every workflow and node when they are built,
and those copies win at run time, so ``run.py`` must call ``_configure_nipype`` *before*
``init_qmri_bids_wf`` (a regression here silently drops hash_method=content,
stop_on_first_crash, create_report=false...). Per-participant crash folders are set on each node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ._helpers import cli, make_tiny_bids


# These tests look at the N4 node (its folder, its hash file, its core function), so they ask for
# N4 explicitly: the default method is the CNN.
def _n4_hash_file(work: Path) -> Path:
    (path,) = work.glob("qmri_bids_*_wf/sub_01_wf/anat_00_T1w_bias_wf/n4/_0x*.json")
    return path


def test_hash_method_content_is_applied(tmp_path):
    """In a fresh process (the console script), nodes must hash their input files by content."""
    from nipype.utils.filemanip import hash_infile

    exe = shutil.which("qmri-bids")
    if exe is None:
        pytest.skip("the qmri-bids console script is not on PATH")
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",))
    work = tmp_path / "w"
    proc = subprocess.run([exe, str(ds), str(tmp_path / "out"), "participant", "-w", str(work),
                           "--skip-bids-validation", "--nprocs", "1", "--bias-method", "n4"], check=False,
                          capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = ds / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    hashed = {k: v for k, v in json.loads(_n4_hash_file(work).read_text())}
    assert hashed["in_file"][1] == hash_infile(str(raw)), "input hashed by timestamp, not content"
    # create_report = false is set too: no HTML report in the work dir
    assert not list(work.glob("qmri_bids_*_wf/index.html"))


def test_in_process_rerun_reuses_cache(tmp_path):
    """Two runs in one process (e.g. a notebook, or this test suite) with the same work dir:
    the second must reuse the N4 node. Nipype's global config is reset to its defaults first, as
    in a fresh process."""
    from nipype import config as ncfg

    ncfg.set_default_config()
    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",))
    work, out = tmp_path / "w", tmp_path / "out"
    argv = [ds, out, "participant", "-w", work, "--skip-bids-validation", "--nprocs", "1",
            "--bias-method", "n4"]
    assert cli(argv)[0] == 0
    (result,) = work.glob("qmri_bids_*_wf/sub_01_wf/anat_00_T1w_bias_wf/n4/result_n4.pklz")
    before = result.stat().st_mtime_ns
    assert cli(argv)[0] == 0
    assert result.stat().st_mtime_ns == before, "the N4 node was re-executed"


def test_crash_files_go_to_the_participant_log_dir(tmp_path, monkeypatch):
    """A failing node writes a text crash file to sub-X/log/<run-id>/ and the run exits 1."""
    from qmri_bids.bias import n4 as n4_module

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",))
    out = tmp_path / "out"
    monkeypatch.setattr(n4_module, "n4_correct", broken)
    code = cli([ds, out, "participant", "-w", tmp_path / "w", "--skip-bids-validation",
                "--nprocs", "1", "--use-plugin", _linear_plugin(tmp_path),
                "--bias-method", "n4"])[0]
    assert code == 1
    crashes = list((out / "sub-01" / "log").glob("*/crash-*.txt"))
    assert crashes, "no crash file in the participant's log folder"
    assert "injected failure" in crashes[0].read_text()


def _linear_plugin(tmp_path: Path) -> Path:
    # In-process execution so that the monkeypatched core is the one that runs.
    path = tmp_path / "linear.yml"
    path.write_text("plugin: Linear\nplugin_args: {}\n")
    return path
