"""Build-only graph tests: the full participant graph from generated inputs, in seconds.

Every bias method × qMRI estimator choice × collection type is built (nothing runs), from
``SubjectInputs`` made here with empty files where the images would be: the factories read no
file, only the plans. Checked: the graph flattens (every connection resolves), the processing
and sink nodes that must exist do, the mapping node gets its plan and memory from it, the
training sub-workflow appears exactly when the plan says "train on demand", the crash folder is
set on every node, and the methods boilerplate is collected in order. A participant with a
collection that provides a B1+ map (TB1DAM) gets it wired into the mapping of the collections
that use B1, unless they have a TB1map from fmap/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from nipype.pipeline.engine.utils import generate_expanded_graph

from qmri_bids.bids.discovery import AnatImage, Collection, Member, SubjectInputs
from qmri_bids.config import RunConfig
from qmri_bids.qmri.models.mrf import default_mrf_schedule
from qmri_bids.qmri.plan import link_b1_providers, plan_collection
from qmri_bids.workflows.base import describe, init_qmri_bids_wf, planned_outputs

SHAPE = (8, 8, 4)
MRF_SIDECAR = default_mrf_schedule().to_sidecar()  # the shipped MRF network's protocol

# collection type -> (grouping entity, per-member entities and metadata)
COLLECTIONS: dict[str, tuple[str, list[tuple[dict, dict]]]] = {
    "VFA": ("flip", [({"flip": "1"}, {"FlipAngle": 3, "RepetitionTimeExcitation": 0.015}),
                     ({"flip": "2"}, {"FlipAngle": 20, "RepetitionTimeExcitation": 0.015})]),
    # one flip angle off the demo protocol: no shipped network, train on demand
    "VFA-untrained": ("flip", [({"flip": "1"}, {"FlipAngle": 4,
                                                "RepetitionTimeExcitation": 0.015}),
                               ({"flip": "2"}, {"FlipAngle": 20,
                                                "RepetitionTimeExcitation": 0.015})]),
    "IRT1": ("inv", [({"inv": str(i)}, {"InversionTime": ti, "RepetitionTime": 2.55})
                     for i, ti in enumerate((0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4, 1.7),
                                            start=1)]),
    "MESE": ("echo", [({"echo": str(k)}, {"EchoTime": round(0.0129 * k, 6)})
                      for k in range(1, 11)]),
    "MEGRE": ("echo", [({"echo": str(k)}, {"EchoTime": 0.004 * k}) for k in range(1, 5)]),
    "MTS": ("flip", [({"flip": "1", "mt": "off"}, {"FlipAngle": 6, "MTState": False,
                                                   "RepetitionTimeExcitation": 0.028}),
                     ({"flip": "1", "mt": "on"}, {"FlipAngle": 6, "MTState": True,
                                                  "RepetitionTimeExcitation": 0.028}),
                     ({"flip": "2", "mt": "off"}, {"FlipAngle": 20, "MTState": False,
                                                   "RepetitionTimeExcitation": 0.018})]),
    "MTR": ("mt", [({"mt": "off"}, {"MTState": False}), ({"mt": "on"}, {"MTState": True})]),
    "MP2RAGE": ("inv", [({"inv": str(i)}, {"InversionTime": ti, "FlipAngle": fa,
                                           "RepetitionTimeExcitation": 0.0072,
                                           "RepetitionTimePreparation": 5.0,
                                           "NumberShots": 160})
                        for i, (ti, fa) in enumerate(((0.8, 4.0), (2.7, 5.0)), start=1)]),
    "MRF": ("part", [({"part": "mag"}, MRF_SIDECAR), ({"part": "phase"}, MRF_SIDECAR)]),
    "TB1DAM": ("flip", [({"flip": "1"}, {"FlipAngle": 60, "RepetitionTime": 10.0}),
                        ({"flip": "2"}, {"FlipAngle": 120, "RepetitionTime": 10.0})]),
}
BIAS = {"cnn": ("cnn",), "n4": ("n4",), "both": ("cnn", "n4")}
ESTIMATORS = {"nn": ("nn",), "nlls": ("nn", "nlls"), "dict": ("nn", "dict"),
              "all": ("nn", "nlls", "dict")}


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def _collection(bids: Path, kind: str) -> Collection:
    suffix = kind.split("-")[0]
    _, members = COLLECTIONS[kind]
    datatype = "fmap" if suffix.startswith("TB1") else "anat"
    out = []
    for extra, metadata in members:
        label = "_".join(f"{k}-{v}" for k, v in extra.items())
        path = _touch(bids / "sub-01" / datatype / f"sub-01_{label}_{suffix}.nii.gz")
        entities = {"subject": "01", "datatype": datatype, "suffix": suffix,
                    "extension": ".nii.gz", **extra}
        out.append(Member(path, entities, dict(metadata)))
    return Collection(suffix, "01", None, {}, out)


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build") / "ds"


def _config(bids: Path, bias: str, estimators: str) -> RunConfig:
    base = bids.parent
    return RunConfig(bids_dir=bids, output_dir=base / "out", analysis_level="participant",
                     work_dir=base / "work", model_dir=base / "models", omp_nthreads=2,
                     bias_methods=BIAS[bias], qmri_estimators=ESTIMATORS[estimators])


def _inputs(bids: Path, config: RunConfig, kind: str) -> SubjectInputs:
    t1w = _touch(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    anat = AnatImage(t1w, "T1w", {"subject": "01", "suffix": "T1w", "datatype": "anat",
                                  "extension": ".nii.gz"}, {}, n_voxels=8 * 8 * 4)
    collection = _collection(bids, kind)
    collection.plan = plan_collection(collection, estimators=config.qmri_estimators,
                                      model_dir=config.model_dir, shape=SHAPE)
    return SubjectInputs("01", None, anat=[anat], collections=[collection])


def _expanded(workflow) -> tuple[dict, set]:
    """The graph Nipype runs (identity nodes removed, their inputs propagated): nodes by name
    relative to the subject workflow, and the edges with their connected fields."""
    graph = generate_expanded_graph(workflow._create_flat_graph())
    name = {n: n.fullname.split(".sub_01_wf.", 1)[1] for n in graph.nodes}
    edges = {(name[u], name[v], src, dst) for u, v, data in graph.edges(data=True)
             for src, dst in data["connect"]}
    return {name[n]: n for n in graph.nodes}, edges


@pytest.mark.parametrize("kind", list(COLLECTIONS))
@pytest.mark.parametrize("estimators", list(ESTIMATORS))
@pytest.mark.parametrize("bias", list(BIAS))
def test_full_graph_builds_from_the_plans(bids, bias, estimators, kind):
    config = _config(bids, bias, estimators)
    inputs = _inputs(bids, config, kind)
    (collection,) = inputs.collections
    plan = collection.plan
    suffix = collection.suffix
    workflow = init_qmri_bids_wf(config=config, subjects=[inputs])
    nodes, edges = _expanded(workflow)

    qmri, ds_qmri = f"qmri_00_{suffix}_wf", f"ds_qmri_00_{suffix}_wf"
    trains = plan.network is not None and plan.network.train_on_demand
    # MTS: its mt-off pair (6/20 deg, TR 28/18 ms) is the shipped ds-real MT network
    assert trains == (kind in ("VFA-untrained", "MEGRE"))
    expected = {f"{qmri}.map", f"{ds_qmri}.ds_maps"}
    expected |= {f"{qmri}.train_estimator_wf.train"} if trains else set()
    for method in BIAS[bias]:
        corr = f"anat_00_T1w_bias_wf.{method}"
        expected |= {corr, f"ds_anat_00_T1w_wf.ds_{method}", f"ds_anat_00_T1w_wf.ds_{method}field"}
        assert nodes[corr].inputs.in_file == str(inputs.anat[0].path)
        assert (corr, f"ds_anat_00_T1w_wf.ds_{method}", "out_corrected", "in_file") in edges
        assert (corr, f"ds_anat_00_T1w_wf.ds_{method}field", "out_field", "in_file") in edges
    assert set(nodes) == expected

    mapper = nodes[f"{qmri}.map"]
    assert mapper.inputs.plan == plan.to_dict() and mapper.mem_gb == plan.mem_gb
    assert mapper.inputs.collection["members"][0]["path"] == str(collection.members[0].path)
    assert mapper.n_procs == config.omp_nthreads
    for field, sink_field in (("out_files", "in_file"), ("suffixes", "suffix"),
                              ("descs", "desc"), ("metas", "meta_dict")):
        assert (f"{qmri}.map", f"{ds_qmri}.ds_maps", field, sink_field) in edges
    if trains:
        train = nodes[f"{qmri}.train_estimator_wf.train"]
        assert train.inputs.protocol == plan.network.protocol
        assert train.inputs.cache_dir == str(config.model_dir)
        assert (f"{qmri}.train_estimator_wf.train", f"{qmri}.map", "estimator_file",
                "estimator_file") in edges
    assert {n.config["execution"]["crashdump_dir"] for n in nodes.values()} == {
        str(config.log_dir("01"))}

    text = describe(workflow)
    assert text.startswith("Results included in this manuscript come from processing")
    anat = text.index("Anatomical images were corrected")
    maps = text.index(f"Quantitative maps of the {suffix} collection")
    assert anat < maps
    if trains:
        assert maps < text.index("No pretrained estimator matched")
    assert ("non-linear least squares" in text) == ("nlls" in plan.estimators)
    assert planned_outputs(config, [inputs])[collection.label] == plan.summary()


def test_a_collection_without_a_plan_is_refused(bids):
    config = _config(bids, "n4", "nn")
    inputs = _inputs(bids, config, "VFA")
    inputs.collections[0].plan = None
    with pytest.raises(ValueError, match="has no plan"):
        init_qmri_bids_wf(config=config, subjects=[inputs])


def _participant(bids: Path, config: RunConfig, kinds: tuple[str, ...]) -> SubjectInputs:
    collections = [_collection(bids, kind) for kind in kinds]
    for collection in collections:
        collection.plan = plan_collection(collection, estimators=config.qmri_estimators,
                                          model_dir=config.model_dir, shape=SHAPE)
    return SubjectInputs("01", None, collections=collections)


def test_a_provided_b1_map_is_wired_into_the_collections_that_use_b1(bids, caplog):
    """VFA and MTS depend on B1, IRT1 does not: the TB1DAM map reaches the first two only,
    through a resampling node, and their sidecars and Sources name it."""
    config = _config(bids, "n4", "nn")
    inputs = _participant(bids, config, ("VFA", "IRT1", "MTS", "TB1DAM"))
    vfa, irt1, mts, dam = inputs.collections
    assert (vfa.plan.uses_b1, irt1.plan.uses_b1, mts.plan.uses_b1, dam.plan.uses_b1) == (
        True, False, True, False)
    with caplog.at_level(logging.INFO, logger="qmri_bids.qmri"):
        link_b1_providers(inputs.collections, "sub-01")
    assert "VFA is mapped with the TB1map computed from TB1DAM" in caplog.text
    assert irt1.plan.b1_provider is None and dam.plan.b1_provider is None
    assert vfa.plan.b1_from_provider and mts.plan.b1_from_provider

    workflow = init_qmri_bids_wf(config=config, subjects=[inputs])
    nodes, edges = _expanded(workflow)
    provider = "qmri_03_TB1DAM_wf.map"
    for index, consumer in ((0, vfa), (2, mts)):
        qmri = f"qmri_{index:02d}_{consumer.suffix}_wf"
        assert (provider, f"{qmri}.b1_to_grid", "provided", "in_file") in edges
        assert (f"{qmri}.b1_to_grid", f"{qmri}.map", "out_file", "b1map") in edges
        to_grid = nodes[f"{qmri}.b1_to_grid"]
        assert to_grid.inputs.reference == consumer.plan.members[0]
        assert tuple(to_grid.inputs.shape) == SHAPE
        sink = nodes[f"ds_qmri_{index:02d}_{consumer.suffix}_wf.ds_maps"]
        assert sink.inputs.extra_meta["B1Map"] == "sub-01_acq-tb1dam_TB1map.nii.gz"
        assert "TB1DAM" in sink.inputs.extra_meta["B1MapSource"]
        assert sink.inputs.source_uris == ["bids::sub-01/fmap/sub-01_acq-tb1dam_TB1map.nii.gz"]
        assert planned_outputs(config, [inputs])[consumer.label][0] == "B1 from TB1DAM"
    assert not any(n.startswith(("qmri_01_IRT1_wf.b1_to_grid", "qmri_03_TB1DAM_wf.b1"))
                   for n in nodes)
    assert not any(u == provider and v.startswith("qmri_01_IRT1_wf") for u, v, _, _ in edges)
    assert not nodes["ds_qmri_01_IRT1_wf.ds_maps"].inputs.source_uris
    assert "computed from the TB1DAM collection of the same participant" in describe(workflow)


def test_a_tb1map_from_fmap_wins_over_a_provided_one(bids, caplog):
    config = _config(bids, "n4", "nn")
    inputs = _participant(bids, config, ("VFA", "TB1DAM"))
    vfa, _ = inputs.collections
    vfa.b1map = _touch(bids / "sub-01" / "fmap" / "sub-01_TB1map.nii.gz")
    with caplog.at_level(logging.INFO, logger="qmri_bids.qmri"):
        link_b1_providers(inputs.collections, "sub-01")
    assert "VFA is mapped with sub-01_TB1map.nii.gz from fmap/, not with the TB1map" in (
        caplog.text)
    assert vfa.plan.b1_provider is not None and not vfa.plan.b1_from_provider

    nodes, edges = _expanded(init_qmri_bids_wf(config=config, subjects=[inputs]))
    assert "qmri_00_VFA_wf.b1_to_grid" not in nodes
    assert not any(u == "qmri_01_TB1DAM_wf.map" and v.startswith("qmri_00_VFA")
                   for u, v, _, _ in edges)
    sink = nodes["ds_qmri_00_VFA_wf.ds_maps"]
    assert "B1Map" not in sink.inputs.extra_meta  # the mapping node names the fmap/ file
    assert "wins over the TB1map" in sink.inputs.extra_meta["B1MapSource"]
    assert str(vfa.b1map) in sink.inputs.extra_sources and not sink.inputs.source_uris
