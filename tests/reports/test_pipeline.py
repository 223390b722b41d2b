"""The reports of a real participant-level run (the hooks attached from outside, as the CLI
will call them): the run record, the report's content, the methods text, the group level."""

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
