"""The schema validator (bids-validator-deno) on derivative trees: offline, zero errors on a
tree with every file the participant and group levels write, the known sidecar errors found,
and the real pipeline's output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from qmri_bids.reports.validate import parse_issues, validate_derivatives, validator_command
from tests.reports._trees import write_dataset

needs_validator = pytest.mark.skipif(validator_command() is None,
                                     reason="bids-validator-deno is not installed "
                                            "(pip install bids-validator-deno)")


@pytest.fixture(scope="module")
def full_tree(tree_reports):
    """The tree with reports, IQM tables, citation and group outputs (all that is written)."""
    return tree_reports["out"]


def test_bidsignore_covers_what_we_write(tmp_path):
    out = write_dataset(tmp_path / "out", n=0)
    lines = (out / ".bidsignore").read_text().split()
    assert {"*/log", "*/qc", "*.html", "group_*.tsv", "logs/"} <= set(lines)
    assert "*/log/" not in lines  # does not match sub-X/log with the schema validator


@needs_validator
def test_tree_validates_with_zero_errors(full_tree):
    assert (full_tree / "sub-01" / "qc").is_dir() and (full_tree / "group_qmri.tsv").is_file()
    result = validate_derivatives(full_tree)
    assert result.available, result.reason
    assert result.errors == [], result.summary()
    assert result.version == "3.0.2"


@needs_validator
def test_known_sidecar_errors_are_reported(tmp_path):
    out = write_dataset(tmp_path / "out", n=1, record=False)
    bad = out / "sub-01" / "anat" / "sub-01_acq-vfa_T1map.json"
    meta = json.loads(bad.read_text())
    del meta["SkullStripped"]
    meta["InversionTime"] = [0.35, 0.5]
    bad.write_text(json.dumps(meta))
    (out / "sub-01" / "log").mkdir(exist_ok=True)
    (out / ".bidsignore").write_text("*/log/\n")  # the old pattern: the log folder is flagged
    result = validate_derivatives(out)
    found = {(i.code, i.sub_code, i.location) for i in result.errors}
    assert ("SIDECAR_KEY_REQUIRED", "SkullStripped",
            "/sub-01/anat/sub-01_acq-vfa_T1map.nii.gz") in found
    assert ("JSON_SCHEMA_VALIDATION_ERROR", "InversionTime",
            "/sub-01/anat/sub-01_acq-vfa_T1map.json") in found
    assert any(code == "NOT_INCLUDED" and loc.startswith("/sub-01/log")
               for code, _, loc in found)
    assert "SkullStripped" in result.summary()


@needs_validator
def test_validator_runs_without_network(full_tree, tmp_path):
    """Everything it needs came from PyPI at install time: it runs in a network namespace
    with no network at all."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"user network namespaces are not permitted here: {probe.stderr!r}")
    cmd = ["unshare", "-rn", *validator_command(), str(full_tree), "--format", "json",
           "--datasetTypes", "derivative"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "DENO_DIR": str(tmp_path / "deno")})
    issues = parse_issues(json.loads(proc.stdout))
    assert not [i for i in issues if i.severity == "error"]
    assert issues, "a report without any finding (not even a warning) is not plausible"


def test_missing_validator_is_reported_not_raised(monkeypatch, tmp_path):
    from qmri_bids.reports import validate

    monkeypatch.setattr(validate, "validator_command", lambda: None)
    result = validate.validate_derivatives(tmp_path)
    assert not result.available and "not installed" in result.reason
    assert not result.ok and "did not run" in result.summary()


@needs_validator
def test_pipeline_output_validates_with_zero_errors(pipeline_run):
    result = validate_derivatives(pipeline_run["out"])
    assert result.available, result.reason
    assert result.errors == [], result.summary()
    assert not [w for w in result.warnings if "Description" in (w.sub_code or "")], \
        result.summary()
