"""``RunConfig``: written as JSON beside the logs, read back as the same configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmri_bids.config import RunConfig
from qmri_bids.errors import UsageError


def test_json_round_trip_restores_paths_and_tuples(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    config = RunConfig(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                       analysis_level="participant", work_dir=tmp_path / "work",
                       participant_labels=["01", "02"], bids_filters={"t1w": {"run": None}},
                       bias_methods=("cnn", "n4"), qmri_estimators=("nn", "dict"),
                       plugin_args={"n_procs": 2}, verbose=1)
    text = config.to_json()
    assert '"environment"' in text  # recorded for the audit, not configuration
    again = RunConfig.from_json(text)
    assert again == config
    assert isinstance(again.model_dir, Path) and again.model_dir == tmp_path / "work" / "models"
    assert again.bias_methods == ("cnn", "n4") and isinstance(again.qmri_estimators, tuple)


def test_unknown_or_missing_keys_are_usage_errors(tmp_path):
    text = RunConfig(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="group",
                     work_dir=tmp_path / "w").to_json()
    with pytest.raises(UsageError, match=r"unknown configuration key\(s\) \['colour'\]"):
        RunConfig.from_json(text[:-2] + ', "colour": "red"}')
    with pytest.raises(UsageError, match="incomplete configuration"):
        RunConfig.from_json('{"bids_dir": "/x"}')
    with pytest.raises(UsageError, match="not valid JSON"):
        RunConfig.from_json("{")
