"""The reports of a real participant-level run of the CLI: the run record, the report's
content, the methods text, the group level, and ``--reports-only``."""

from __future__ import annotations

from qmri_bids.reports import latest_run_record, read_iqms
from qmri_bids.reports.iqm import iqm_path
from qmri_bids.reports.layout import scan_participant


def test_run_record_of_a_real_run(pipeline_run):
    out = pipeline_run["out"]
    rec = latest_run_record(out, "01")
    assert rec is not None and rec.status == "finished" and rec.exit_code == 0
    assert rec.software["nipype"] and rec.device == "cpu" and rec.hardware
    labels = [i.label for i in rec.inputs]
    assert labels[:2] == ["sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz"]
    # every input owns nodes that ran, under the names the record derived for it
    for item in rec.inputs:
        nodes = rec.nodes_of(item)
        assert nodes, item.label
        assert all(n.status in ("done", "cached") for n in nodes)
        assert any(n.duration_s is not None for n in nodes)
    cnn = [n for n in rec.nodes if n.name.endswith("anat_00_T1w_bias_wf.cnn")]
    assert cnn and cnn[0].started is not None and cnn[0].duration_s > 0
    assert rec.crashes == []
    # --resource-monitor: each processing node's measured peak beside the memory it declared
    mapping = [n for n in rec.nodes if n.name.endswith("_wf.map")]
    assert mapping and all(n.peak_mem_gb and n.peak_mem_gb > 0 and n.mem_gb for n in mapping)
    # ... and its sampling files stay in the work dir, not the directory the CLI ran from
    from tests.conftest import REPO_ROOT

    assert not list(REPO_ROOT.glob(".proc-*")), "resource-monitor files in the caller's cwd"


def test_report_and_iqms_of_a_real_run(pipeline_run):
    out = pipeline_run["out"]
    html = (out / "sub-01.html").read_text()
    assert "Bias-field correction" in html and "N4 (SimpleITK)" in html
    values, _, _ = read_iqms(iqm_path(out, "01"))
    for suffix in ("T1w", "T2w"):
        for method in ("cnn", "n4"):
            # the demo's fields are strong: both methods lower the within-class CV
            assert values[f"{suffix}_{method}_cv_after"] < values[f"{suffix}_{method}_cv_before"]
            assert 0.5 < values[f"{suffix}_{method}_field_p01"] < 1.0 < \
                values[f"{suffix}_{method}_field_p99"] < 2.0
    deriv = scan_participant(out, "01")
    for col in deriv.collections:
        assert f"{col.collection} (" in html
        for m in col.primary():
            key = f"{col.acq}_{m.suffix}_median"
            assert key in values and values[key] == values[key]  # finite
        if "dict" in col.references():
            assert "Network against dictionary" in html
    # dictionary matching is described only for the collections that have its maps
    methods = (out / "logs" / "CITATION.md").read_text()
    with_dict = [c.collection for c in deriv.collections if "dict" in c.references()]
    assert ("dictionary matching" in methods) == bool(with_dict)
    assert "## References" in methods and "Tustison" in methods


def test_group_level_of_a_real_run(pipeline_run):
    group = pipeline_run["group"]
    assert group.n_participants == 1 and group.computed_now == []
    names = {t.name for t in group.tables}
    assert "group_bias.tsv" in names
    header = (pipeline_run["out"] / "group_bias.tsv").read_text().splitlines()[0].split("\t")
    assert "T1w_n4_cjv_after" in header and header[-1] == "outliers"


def test_reports_only_rebuilds_from_the_outputs(pipeline_run, tmp_path):
    """``--reports-only`` rebuilds the report and the citation from the derivatives and run
    records; no node runs (a fresh, empty work dir stays without results)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = pipeline_run["out"]
    report = out / "sub-01.html"
    before = report.stat().st_mtime_ns
    report.unlink()
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-c", "from qmri_bids.cli.run import main; raise SystemExit(main())",
         str(pipeline_run["bids"]), str(out), "participant", "-w", str(work), "--reports-only",
         "--skip-bids-validation"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report.is_file() and report.stat().st_mtime_ns > before
    assert f"report: {report}" in proc.stdout
    assert (out / "logs" / "CITATION.md").is_file()
    assert not list(work.rglob("result_*.pklz"))
