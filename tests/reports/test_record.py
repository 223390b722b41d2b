"""The run record: schema round trip, the Nipype status callback, crashes, and the names it
uses for the workflows (checked against the real subject workflow)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmri_bids.reports import record as rr
from tests.reports._trees import RUN_ID, make_record


def test_round_trip_and_location(tmp_path):
    rec = make_record(tmp_path, "01", ("cnn", "n4"), ("nlls",), None)
    rec.session = "A"
    path = rr.write_run_record(rec, tmp_path)
    assert path == tmp_path / "sub-01" / "log" / RUN_ID / "run_record_ses-A.json"
    back = rr.read_run_record(path)
    assert back == rec
    assert rr.find_run_records(tmp_path, "01", "A") == [path]
    assert rr.find_run_records(tmp_path, "01") == []  # the session-less record is another file
    assert rr.latest_run_record(tmp_path, "01", "A") == rec


def test_newer_minor_fields_are_ignored_other_major_refused(tmp_path):
    rec = make_record(tmp_path, "01", ("cnn",), (), None)
    payload = rec.to_dict()
    payload["schema_version"] = "1.7"
    payload["future_field"] = {"x": 1}
    payload["inputs"][0]["future_input_field"] = 3
    path = tmp_path / "r.json"
    path.write_text(json.dumps(payload))
    assert rr.read_run_record(path).inputs[0].label == rec.inputs[0].label
    payload["schema_version"] = "2.0"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"r\.json: run record schema 2\.0"):
        rr.read_run_record(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable run record"):
        rr.read_run_record(path)


def test_latest_skips_unreadable_records(tmp_path):
    old = make_record(tmp_path, "01", ("cnn",), (), None)
    rr.write_run_record(old, tmp_path)
    broken = tmp_path / "sub-01" / "log" / "20990101-000000_ffffffff" / "run_record.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("[]")
    assert rr.latest_run_record(tmp_path, "01").run_id == RUN_ID


class _Node:
    def __init__(self, fullname, mem_gb=1.0, without_submitting=False, runtime=None):
        self.fullname = fullname
        self.mem_gb = mem_gb
        self.run_without_submitting = without_submitting
        self._runtime = runtime

    @property
    def result(self):
        if self._runtime is None:
            raise FileNotFoundError("no result file")
        return SimpleNamespace(runtime=self._runtime)


def test_node_timer_statuses_and_durations():
    clock = iter([10.0, 14.5, 20.0, 21.0, 30.0, 40.0, 41.0]).__next__
    seen = []
    timer = rr.NodeTimer(chain=lambda n, s, r: seen.append((n.fullname, s, r)), clock=clock)
    ran = _Node("wf.sub_01_wf.anat_00_T1w_bias_wf.cnn",
                runtime=SimpleNamespace(duration=4.2, mem_peak_gb=1.3))
    timer(ran, "start")
    timer(ran, "end")
    crashed = _Node("wf.sub_01_wf.qmri_00_VFA_wf.map")
    timer(crashed, "start")
    timer(crashed, "exception")
    cached = _Node("wf.sub_01_wf.anat_01_T2w_bias_wf.n4",
                   runtime=SimpleNamespace(duration=2.0, mem_peak_gb=None))
    timer(cached, "end")
    sink = _Node("wf.sub_01_wf.ds_qmri_00_VFA_wf.ds_maps", without_submitting=True,
                 runtime=[SimpleNamespace(duration=0.1, mem_peak_gb=None),
                          SimpleNamespace(duration=0.2, mem_peak_gb=None)])
    timer(sink, "end")
    timer(_Node("_ds_maps0"), "end")  # a MapNode's sub-node: only forwarded
    recs = {r.name.rsplit(".", 1)[-1]: r for r in timer.records}
    assert set(recs) == {"cnn", "map", "n4", "ds_maps"}
    assert (recs["cnn"].status, recs["cnn"].duration_s, recs["cnn"].peak_mem_gb) == \
        ("done", 4.2, 1.3)
    assert (recs["map"].status, recs["map"].duration_s) == ("failed", 1.0)  # wall clock
    assert (recs["n4"].status, recs["n4"].started) == ("cached", None)
    assert (recs["ds_maps"].status, recs["ds_maps"].duration_s) == ("done", 0.3)
    assert ("_ds_maps0", "end", None) in seen and len(seen) == 7
    # the chained callback gets the record as it stands after the event
    assert [(r.status, r.duration_s) for n, s, r in seen if s == "end" and r is not None] == [
        ("done", 4.2), ("cached", 2.0), ("done", 0.3)]
    assert [r.name for r in timer.records_for("anat_00_T1w_bias_wf")] == [ran.fullname]


def test_node_timer_pickles_for_mapnodes():
    """A MapNode stores the plugin arguments, this callback among them, and pickles itself."""
    timer = rr.NodeTimer(chain=lambda n, s, r: None)
    timer(_Node("wf.a"), "start")
    copy = pickle.loads(pickle.dumps(timer))
    assert copy.records == [] and copy.chain is None
    copy(_Node("wf.b"), "start")
    assert [r.name for r in copy.records] == ["wf.b"]
    assert [r.name for r in timer.records] == ["wf.a"]


def test_real_nipype_crash_file_is_parsed(tmp_path):
    """A text crash file written by Nipype itself (the format the CLI configures)."""
    from nipype import config as ncfg
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from nipype.pipeline.plugins.tools import report_crash

    node = pe.Node(niu.IdentityInterface(fields=["x"]), name="map",
                   base_dir=str(tmp_path / "work"))
    node.config = {"execution": {"crashdump_dir": str(tmp_path / "log"),
                                 "crashfile_format": "txt"}}
    try:
        raise ValueError("EchoTime = 35 is outside (0, 1]")
    except ValueError:
        import sys
        import traceback

        tb = traceback.format_exception(*sys.exc_info())
    old = ncfg.get("execution", "crashfile_format")
    try:
        path = Path(report_crash(node, traceback=tb))
    finally:
        ncfg.set("execution", "crashfile_format", old)
    assert path.suffix == ".txt"
    crash = rr.read_crash_file(path)
    assert crash.node == "map"
    assert crash.message == "ValueError: EchoTime = 35 is outside (0, 1]"
    assert rr.collect_crashes(path.parent) == [crash]


def test_finish_keeps_this_participant_and_adds_unwritten_crashes(tmp_path):
    rec = make_record(tmp_path, "01", ("cnn",), (), None)
    rec.nodes = []
    log = tmp_path / "log"
    log.mkdir()
    (log / "crash-1-root-map-x.txt").write_text(
        "Node: qmri_bids_0_1_wf.sub_01_wf.qmri_00_VFA_wf.map\n\nTraceback (most recent call "
        "last):\nBadDataError: broken\n")
    nodes = [rr.NodeRecord("qmri_bids_0_1_wf.sub_01_wf.qmri_00_VFA_wf.map", "done", 1, 2),
             rr.NodeRecord("qmri_bids_0_1_wf.sub_02_wf.qmri_00_VFA_wf.map", "done", 1, 2),
             rr.NodeRecord("qmri_bids_0_1_wf.sub_01_wf.anat_00_T1w_bias_wf.cnn", "done", 0, 1)]
    failures = [{"fullname": "qmri_bids_0_1_wf.sub_01_wf.anat_00_T1w_bias_wf.cnn",
                 "text": "Traceback...\nMemoryError: out of memory", "crash_file": None},
                {"fullname": "qmri_bids_0_1_wf.sub_02_wf.x", "text": "E: other participant"}]
    rr.finish_run_record(rec, status="failed", exit_code=70, nodes=nodes, log_dir=log,
                         failures=failures)
    assert [n.name.split(".")[1] for n in rec.nodes] == ["sub_01_wf", "sub_01_wf"]
    assert {n.status for n in rec.nodes} == {"failed"}
    assert [(c.node.rsplit(".", 1)[-1], c.message) for c in rec.crashes] == \
        [("map", "BadDataError: broken"), ("cnn", "MemoryError: out of memory")]
    assert rec.finished and rec.exit_code == 70
    with pytest.raises(ValueError, match="unknown run status"):
        rr.finish_run_record(rec, status="done", exit_code=0)


def test_new_record_from_discovery_matches_the_real_workflow(tmp_path):
    """``new_run_record`` on real discovery/plan objects: one step per bias method and
    planned estimator, a skipped dict for VFA with the reason, and workflow names that are
    those of ``init_single_subject_wf`` (every input owns nodes of the built graph)."""
    from qmri_bids.bids.discovery import AnatImage, Collection, Member, SubjectInputs
    from qmri_bids.config import RunConfig
    from qmri_bids.qmri.plan import plan_collection
    from qmri_bids.workflows.base import init_single_subject_wf

    anat_dir = tmp_path / "bids" / "sub-01" / "anat"
    anat_dir.mkdir(parents=True)
    t1w = anat_dir / "sub-01_T1w.nii.gz"
    members = []
    for i, fa in ((1, 3), (2, 20)):
        path = anat_dir / f"sub-01_flip-{i}_VFA.nii.gz"
        path.touch()
        members.append(Member(path, {"subject": "01", "flip": str(i), "suffix": "VFA"},
                              {"FlipAngle": fa, "RepetitionTimeExcitation": 0.015}))
    t1w.touch()
    collection = Collection("VFA", "01", None, {}, members)
    collection.plan = plan_collection(collection, estimators=("nn", "nlls", "dict"),
                                      model_dir=tmp_path / "models", shape=(8, 8, 4))
    inputs = SubjectInputs("01", None, anat=[AnatImage(t1w, "T1w", {"subject": "01",
                                                                     "suffix": "T1w"}, {})],
                           collections=[collection])
    config = RunConfig(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                       analysis_level="participant", work_dir=tmp_path / "work",
                       bias_methods=("cnn", "n4"), qmri_estimators=("nn", "nlls", "dict"))
    rec = rr.new_run_record(config, inputs, command=["qmri-bids", "x"])
    anat, vfa = rec.inputs
    assert [s.name for s in anat.steps] == ["bias-cnn", "bias-n4"]
    assert anat.steps[0].detail["model"] == "bias_cnn_v2" and anat.steps[0].detail["sha256"]
    network = collection.plan.network
    train = [("train", "planned")] if network.train_on_demand else []
    assert [(s.name, s.status) for s in vfa.steps] == [*train, ("nn", "planned"),
                                                       ("nlls", "planned"), ("dict", "skipped")]
    assert "not an estimator of the vfa model" in vfa.steps[-1].reason
    nn = vfa.steps[len(train)]
    assert nn.detail["network"] == network.stem
    assert nn.detail["train_on_demand"] is network.train_on_demand
    if not network.train_on_demand:  # a verified file: its card's validation is recorded
        assert "efficiency_median" in nn.detail["validation"]
    wf = init_single_subject_wf(config=config, inputs=inputs)
    names = [f"{wf.name}.{n.fullname}" for n in wf._get_all_nodes()]
    rec.nodes = [rr.NodeRecord(f"top.{n}") for n in names]
    for item in rec.inputs:
        owned = {n.name.split(".")[2] for n in rec.nodes_of(item)}
        assert owned == {item.workflow, item.sink_workflow}, item.label


def test_progress_lines_follow_the_timer_records(caplog):
    """The per-node log line says what the timer recorded: a sink run in the main process is
    'done', not 'cached'; a node without a start (an earlier run's result) is 'cached'."""
    import logging

    from qmri_bids.cli.run import NodeProgress

    clock = iter([1.0, 4.0, 5.0, 6.0]).__next__
    timer = rr.NodeTimer(chain=NodeProgress(3), clock=clock)
    node = _Node("wf.sub_01_wf.qmri_03_MRF_wf.map")
    sink = _Node("wf.sub_01_wf.ds_qmri_03_MRF_wf.ds_maps", without_submitting=True)
    old = _Node("wf.sub_01_wf.anat_00_T1w_bias_wf.cnn",
                runtime=SimpleNamespace(duration=2.0, mem_peak_gb=None))
    with caplog.at_level(logging.INFO, logger="qmri_bids"):
        timer(node, "start")
        timer(node, "end")
        timer(sink, "end")
        timer(old, "end")
        timer(_Node("_ds_maps0"), "end")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert lines == ["[1/3] sub-01 qmri_03_MRF map done in 3.0 s",
                     "[2/3] sub-01 ds_qmri_03_MRF ds_maps done",
                     "[3/3] sub-01 anat_00_T1w_bias cnn cached"]
