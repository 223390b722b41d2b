"""Group level: 1,000 participants from stored IQM tables in seconds, outliers flagged exactly,
several output folders, tables computed when missing, the CLI entry (run_group)."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qmri_bids.errors import MissingInputError, NothingSelectedError
from qmri_bids.group import run_group
from qmri_bids.reports import build_group_report
from qmri_bids.reports.figures import robust_z
from tests.reports._trees import write_dataset, write_iqm_tables, write_participant


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_robust_z():
    v = np.r_[np.linspace(0.9, 1.1, 20), 5.0, np.nan]
    z = robust_z(v)
    assert np.isnan(z[-1]) and z[-2] > 3 and np.all(np.abs(z[:20]) < 2)
    assert np.all(robust_z(np.ones(10)) == 0)  # nobody spreads: nobody is an outlier
    assert np.all(np.isnan(robust_z(np.r_[1.0, 2.0, 50.0])))  # too few to tell


def test_thousand_participants_under_a_minute(tmp_path):
    out = tmp_path / "out"
    injected = {17: {"T1w_cnn_cv_after": 0.9}, 503: {"vfa_T1map_median": 2.5},
                998: {"vfa_T1map_WM_median": 0.2, "vfa_T1map_n": 99.0}}
    labels = write_iqm_tables(out, 1000, injected)
    start = time.monotonic()
    result = build_group_report(out)
    seconds = time.monotonic() - start
    assert seconds < 60, f"group level took {seconds:.1f} s"
    assert result.n_participants == 1000 and result.computed_now == []
    flagged = {(p, m) for p, m, _, _ in result.outliers}
    # exactly the injected values (voxel counts are never flagged: field of view, not QC)
    assert flagged == {(f"sub-{labels[17]}", "T1w_cnn_cv_after"),
                       (f"sub-{labels[503]}", "vfa_T1map_median"),
                       (f"sub-{labels[998]}", "vfa_T1map_WM_median")}
    bias = read_tsv(out / "group_bias.tsv")
    qmri = read_tsv(out / "group_qmri.tsv")
    roi = read_tsv(out / "group_roi.tsv")
    assert len(bias) == len(qmri) == len(roi) == 1000
    assert bias[17]["participant_id"] == "sub-0017"
    assert float(bias[17]["T1w_cnn_cv_after"]) == pytest.approx(0.9)
    assert bias[17]["outliers"] == "T1w_cnn_cv_after" and bias[16]["outliers"] == "n/a"
    assert qmri[503]["outliers"] == "vfa_T1map_median"
    assert roi[998]["outliers"] == "vfa_T1map_WM_median"
    assert list(qmri[0]) == ["participant_id", "vfa_T1map_iqr", "vfa_T1map_median",
                             "vfa_T1map_n", "outliers"]
    html = result.html.read_text()
    assert html.count("<svg") >= 3 and "sub-0503" in html
    assert "3 value(s) flagged" in html


def test_several_output_folders_and_missing_tables(tmp_path):
    """Two runs into two folders; the same participant in both: the newer table wins. A
    participant whose report was never built gets its table computed now."""
    first = write_dataset(tmp_path / "run1", n=2)
    second = write_dataset(tmp_path / "run2", n=0)
    write_participant(second, "02", seed=5, vfa_scale=1.2)
    write_participant(second, "04", seed=4)
    result = build_group_report([first, second], tmp_path / "group")
    assert result.n_participants == 3
    assert sorted(result.computed_now) == ["sub-01", "sub-02", "sub-04"]
    rows = {r["participant_id"]: r for r in read_tsv(tmp_path / "group" / "group_roi.tsv")}
    assert set(rows) == {"sub-01", "sub-02", "sub-04"}
    # sub-02 appears twice; the run2 table was written last, with T1 scaled by 1.2
    assert float(rows["sub-02"]["vfa_T1map_WM_median"]) == pytest.approx(1.08)
    html = result.html.read_text()
    assert "the newer table" in html and "computed now" in html
    assert "Outliers are flagged from 5 participants on" in html


def test_roi_dseg_request_recomputes_only_what_lacks_it(tmp_path):
    out = write_dataset(tmp_path / "out", n=1, with_dseg=False)
    build_group_report(out)
    assert "WM" not in (out / "sub-01" / "qc" / "sub-01_desc-iqm.tsv").read_text()
    seg = write_dataset(tmp_path / "seg", n=1)  # same grid, with dsegs
    result = build_group_report(out, roi_dseg=seg)
    assert result.computed_now == ["sub-01"]
    roi = read_tsv(out / "group_roi.tsv")
    assert float(roi[0]["vfa_T1map_WM_median"]) == pytest.approx(0.9)
    assert build_group_report(out, roi_dseg=seg).computed_now == []  # now stored


def _config(out: Path, labels=None):
    return SimpleNamespace(output_dir=out, participant_labels=labels)


def test_run_group_writes_census_and_report(tmp_path, capsys):
    out = write_dataset(tmp_path / "out", n=2)
    assert run_group(_config(out)) == 0
    census = read_tsv(out / "group_summary.tsv")
    assert [r["participant_id"] for r in census] == ["sub-01", "sub-02"]
    n_files = len(list((out / "sub-01").rglob("*.nii.gz")))
    assert int(census[0]["n_images"]) + int(census[0]["n_maps"]) == n_files
    # VFA: 3 network + 3 NLLS + 2 CRB SD maps; MRF: 1 map (the rest: 4 bias outputs, a dseg)
    assert (int(census[0]["n_maps"]), int(census[0]["n_images"])) == (9, 5)
    assert (out / "group_report.html").is_file() and (out / "group_qmri.tsv").is_file()
    assert "group report:" in capsys.readouterr().out
    assert run_group(_config(out, ["02"])) == 0
    assert [r["participant_id"] for r in read_tsv(out / "group_qmri.tsv")] == ["sub-02"]


def test_run_group_errors(tmp_path):
    with pytest.raises(MissingInputError, match="participant level first"):
        run_group(_config(tmp_path / "nothing"))
    out = write_dataset(tmp_path / "out", n=0)
    with pytest.raises(NothingSelectedError):
        run_group(_config(out))
