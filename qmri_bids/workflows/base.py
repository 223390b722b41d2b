"""Top-level workflow factories (fMRIPrep style): the run, then one sub-workflow per subject."""

from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe

from qmri_bids.bids.discovery import SubjectInputs
from qmri_bids.config import RunConfig, version_tag
from qmri_bids.workflows.anatomical import init_anat_bias_wf
from qmri_bids.workflows.qmri import init_qmri_map_wf


def init_qmri_bids_wf(config: RunConfig, subjects: list[SubjectInputs]) -> pe.Workflow:
    """The whole run. Its name carries major.minor so a new version never reuses old results."""
    workflow = pe.Workflow(name=f"qmri_bids_{version_tag()}_wf", base_dir=str(config.work_dir))
    for inputs in subjects:
        if inputs.empty:
            continue
        workflow.add_nodes([init_single_subject_wf(config, inputs)])
    return workflow


def subject_wf_name(inputs: SubjectInputs) -> str:
    ses = f"_ses_{inputs.session}" if inputs.session else ""
    return f"sub_{inputs.subject}{ses}_wf"


def init_single_subject_wf(config: RunConfig, inputs: SubjectInputs) -> pe.Workflow:
    """All processing of one participant (and session)."""
    workflow = pe.Workflow(name=subject_wf_name(inputs))
    workflow.__desc__ = (
        f"Results included in this manuscript come from processing with qmri-bids "
        f"{config.version}, which uses Nipype and PyBIDS.\n"
    )
    log_dir = config.log_dir(inputs.subject)
    for index, anat in enumerate(inputs.anat):
        workflow.add_nodes([init_anat_bias_wf(config, anat, name=f"anat_{index:02d}_"
                                              f"{anat.suffix}_bias_wf")])
    for index, collection in enumerate(inputs.collections):
        workflow.add_nodes([init_qmri_map_wf(config, collection,
                                             name=f"qmri_{index:02d}_{collection.suffix}_wf")])
    # Nipype merges only the top workflow's config into nodes (node settings win), so the
    # per-participant crash folder must be set on every node itself.
    for node in workflow._get_all_nodes():
        node.config = node.config or {}
        node.config.setdefault("execution", {}).update(
            {"crashdump_dir": str(log_dir), "crashfile_format": "txt"})
    return workflow


def planned_outputs(config: RunConfig, subjects: list[SubjectInputs]) -> dict[str, list[str]]:
    """For the summary table: what will run on each input (keys: paths or collection labels)."""
    plan: dict[str, list[str]] = {}
    for inputs in subjects:
        for anat in inputs.anat:
            plan[str(anat.path)] = [f"bias {m}" for m in config.bias_methods]
        for col in inputs.collections:
            plan[col.label] = _qmri_plan(config, col)
    return plan


def _qmri_plan(config: RunConfig, collection) -> list[str]:
    from qmri_bids.errors import BadDataError
    from qmri_bids.workflows.qmri import estimator_plan

    if collection.suffix in ("MTR", "MP2RAGE"):
        return ["map (closed form)"]
    try:
        name, _, found = estimator_plan(config, collection)
    except BadDataError as exc:
        return [f"map: protocol problem ({exc})"]
    ests = [e for e in config.qmri_estimators if e != "nn"]
    net = f"network {found.stem}" if found else f"train {name} network, then map"
    return [net, *ests]


def describe(workflow: pe.Workflow) -> str:
    """Collect ``__desc__`` boilerplate of every sub-workflow, in order."""
    parts: list[str] = []

    def walk(wf: pe.Workflow) -> None:
        desc = getattr(wf, "__desc__", None)
        if desc:
            parts.append(desc.strip())
        for name in sorted(wf.list_node_names()):
            node = wf.get_node(name.split(".")[0])
            if isinstance(node, pe.Workflow) and node is not wf:
                walk(node)

    walk(workflow)
    return "\n\n".join(dict.fromkeys(parts))


def graph_path(config: RunConfig) -> Path:
    return config.work_dir / f"qmri_bids_{version_tag()}_wf" / "graph.dot"
