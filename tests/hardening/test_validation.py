"""bids-validator's inputs and outputs are untrusted too: a user configuration that is not one,
a report that is not UTF-8 or not the expected JSON, end in a warning or exit 16, never in a
traceback."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from qmri_bids.errors import ValidationError
from tests.foundation._helpers import make_tiny_bids


@pytest.mark.parametrize("text", ["[1, 2]", '{"ignoredFiles": "x"}', "{", "\xff"])
def test_user_validator_config_that_is_not_one_is_ignored(tmp_path, caplog, text):
    from qmri_bids.bids.validation import _validator_config

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01", "02"), shape=(8, 8, 4))
    (ds / ".bids-validator-config.json").write_bytes(text.encode("latin-1"))
    path = _validator_config(ds, ["01"], tmp_path / "cfg.json")
    assert json.loads(path.read_text()) == {"ignoredFiles": ["/sub-02/**"]}
    assert ".bids-validator-config.json" in caplog.text


def _fake_validator(bin_dir: Path, stdout: bytes, code: int) -> None:
    bin_dir.mkdir()
    (bin_dir / "report").write_bytes(stdout)
    exe = bin_dir / "bids-validator"
    exe.write_text(f"#!/bin/sh\ncat '{bin_dir / 'report'}'\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("stdout, code, raises", [
    (b"\xff\xfe not utf-8 and not json", 1, True),
    (b"[]", 0, False),
    (json.dumps({"issues": {"errors": ["not a dict", {"key": "X", "reason": "bad",
                                                       "files": [7]}]}}).encode(), 1, True),
])
def test_odd_validator_reports(tmp_path, monkeypatch, stdout, code, raises):
    from qmri_bids.bids.validation import validate_dataset

    ds = make_tiny_bids(tmp_path / "ds", subjects=("01",), shape=(8, 8, 4))
    _fake_validator(tmp_path / "bin", stdout, code)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    args = (ds, ["01"], tmp_path / "work", tmp_path / "out", "run1")
    if raises:
        with pytest.raises(ValidationError, match="bids-validator found"):
            validate_dataset(*args)
    else:
        validate_dataset(*args)
    assert (tmp_path / "out" / "logs" / "bids-validator_run1.json").is_file()
