"""Top-level workflow factories (fMRIPrep style): the run, then one sub-workflow per subject.

Factories take keyword-only arguments and read no file: what they need to know about the
inputs (image sizes, each collection's plan) was decided in pre-flight
(:mod:`qmri_bids.preflight`). Processing workflows end in an ``outputnode`` that the subject
workflow connects to the derivative sinks of :mod:`qmri_bids.workflows.outputs`.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from nipype.pipeline import engine as pe

from qmri_bids.bids.discovery import SubjectInputs
from qmri_bids.config import RunConfig, version_tag
from qmri_bids.interfaces.qmri import collection_to_dict
from qmri_bids.workflows.anatomical import image_mem_gb, init_anat_bias_wf
from qmri_bids.workflows.outputs import (
    QMRI_OUTPUT_FIELDS,
    b1_provenance,
    bias_output_fields,
    init_ds_bias_wf,
    init_ds_qmri_wf,
)
from qmri_bids.workflows.qmri import init_qmri_map_wf


def top_wf_name() -> str:
    """Name (and work sub-folder) of the whole run's workflow: it carries major.minor so a new
    version never reuses old results."""
    return f"qmri_bids_{version_tag()}_wf"


def init_qmri_bids_wf(*, config: RunConfig, subjects: list[SubjectInputs]) -> pe.Workflow:
    """The whole run (one sub-workflow per participant and session)."""
    workflow = pe.Workflow(name=top_wf_name(), base_dir=str(config.work_dir))
    for inputs in subjects:
        if inputs.empty:
            continue
        workflow.add_nodes([init_single_subject_wf(config=config, inputs=inputs)])
    return workflow


def subject_wf_name(inputs: SubjectInputs) -> str:
    ses = f"_ses_{inputs.session}" if inputs.session else ""
    return f"sub_{inputs.subject}{ses}_wf"


def init_single_subject_wf(*, config: RunConfig, inputs: SubjectInputs) -> pe.Workflow:
    """All processing of one participant (and session): each anatomical image corrected by the
    configured methods, each collection mapped as its plan says, everything stored. A collection
    whose plan takes its B1+ map from another collection gets that collection's ``provided``
    map (``plan.b1_provider``, decided in pre-flight)."""
    workflow = pe.Workflow(name=subject_wf_name(inputs))
    workflow.__desc__ = (
        f"Results included in this manuscript come from processing with qmri-bids "
        f"{config.version}, which uses Nipype and PyBIDS.\n"
    )
    for index, anat in enumerate(inputs.anat):
        label = f"{index:02d}_{anat.suffix}"
        bias_wf = init_anat_bias_wf(bias_methods=config.bias_methods,
                                    mem_gb=image_mem_gb(anat.n_voxels),
                                    omp_nthreads=config.omp_nthreads, device=config.device,
                                    name=f"anat_{label}_bias_wf")
        bias_wf.inputs.inputnode.in_file = str(anat.path)
        ds_wf = init_ds_bias_wf(output_dir=config.output_dir, bids_dir=config.bids_dir,
                                source_file=anat.path, source_entities=anat.entities,
                                suffix=anat.suffix, methods=config.bias_methods,
                                name=f"ds_anat_{label}_wf")
        workflow.connect([(bias_wf, ds_wf, [(f"outputnode.{f}", f"inputnode.{f}")
                                            for f in bias_output_fields(config.bias_methods)])])
    by_label = {c.label: c for c in inputs.collections}
    map_wfs: dict[str, pe.Workflow] = {}
    for index, collection in enumerate(inputs.collections):
        if collection.plan is None:
            raise ValueError(f"collection {collection.label} of sub-{inputs.subject} has no "
                             "plan: pre-flight (qmri_bids.preflight) plans every collection")
        link = collection.plan.b1_provider
        if link is not None and link.label not in by_label:
            raise ValueError(f"collection {collection.label} of sub-{inputs.subject} takes its "
                             f"B1+ map from {link.label}, which is not among its collections")
        label = f"{index:02d}_{collection.suffix}"
        map_wf = init_qmri_map_wf(plan=collection.plan, omp_nthreads=config.omp_nthreads,
                                  device=config.device, model_dir=config.model_dir,
                                  name=f"qmri_{label}_wf")
        map_wf.inputs.inputnode.collection = collection_to_dict(collection)
        map_wfs[collection.label] = map_wf
        b1_meta, b1_uris = b1_provenance(collection, by_label.get(link.label) if link else None,
                                         config.output_dir)
        ds_wf = init_ds_qmri_wf(output_dir=config.output_dir, bids_dir=config.bids_dir,
                                suffix=collection.suffix,
                                members=[m.path for m in collection.members],
                                first_entities=collection.members[0].entities,
                                b1map=collection.b1map, name=f"ds_qmri_{label}_wf",
                                extra_meta=b1_meta, source_uris=b1_uris)
        workflow.connect([(map_wf, ds_wf, [(f"outputnode.{f}", f"inputnode.{f}")
                                           for f in QMRI_OUTPUT_FIELDS])])
    for collection in inputs.collections:
        if collection.plan.b1_from_provider:
            workflow.connect(map_wfs[collection.plan.b1_provider.label], "outputnode.provided",
                             map_wfs[collection.label], "inputnode.b1map")
    # Nipype merges only the top workflow's config into nodes (node settings win), so the
    # per-participant crash folder must be set on every node itself.
    log_dir = config.log_dir(inputs.subject)
    for node in workflow._get_all_nodes():
        node.config = node.config or {}
        node.config.setdefault("execution", {}).update(
            {"crashdump_dir": str(log_dir), "crashfile_format": "txt"})
    return workflow


def planned_outputs(config: RunConfig, subjects: list[SubjectInputs]) -> dict[str, list[str]]:
    """For the summary table: what will run on each input (keys: paths or collection labels);
    a collection's entry is its plan's summary."""
    plan: dict[str, list[str]] = {}
    for inputs in subjects:
        for anat in inputs.anat:
            plan[str(anat.path)] = [f"bias {m}" for m in config.bias_methods]
        for col in inputs.collections:
            plan[col.label] = col.plan.summary() if col.plan is not None else []
    return plan


def describe(workflow: pe.Workflow) -> str:
    """The ``__desc__`` boilerplate of a workflow and its sub-workflows, each once, visiting them
    in topological order (what runs first is described first; independent workflows in the
    order they were added)."""
    parts: list[str] = []

    def walk(wf: pe.Workflow) -> None:
        desc = getattr(wf, "__desc__", None)
        if desc:
            parts.append(desc.strip())
        graph = wf._graph
        order = {node: i for i, node in enumerate(graph.nodes)}
        for node in nx.lexicographical_topological_sort(graph, key=order.__getitem__):
            if isinstance(node, pe.Workflow):
                walk(node)

    walk(workflow)
    return "\n\n".join(dict.fromkeys(parts))


def graph_path(config: RunConfig) -> Path:
    return config.work_dir / f"qmri_bids_{version_tag()}_wf" / "graph.dot"
