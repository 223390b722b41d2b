"""Derivative sinks (fMRIPrep style): workflows that store what the processing workflows made.

Processing workflows end in an ``outputnode``; the subject workflow connects it to one of these,
so processing never knows where or under which name its results are written. Every sink is a
``DerivativesSink`` node named ``ds_*`` (they always run, see the interface), inside a workflow
named ``ds_*``; their ``inputnode`` fields match the processing workflow's ``outputnode``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qmri_bids.bids.derivatives import derivative_path
from qmri_bids.interfaces.derivatives import DerivativesSink
from qmri_bids.qmri.base import B1_MAP

#: entities that tell the members of a collection apart; a collection's maps drop them
GROUPING_ENTITIES = ("flip", "inv", "echo", "mt", "part")

_BIAS_OUTPUTS = (
    ("corrected", "", "bias-field corrected image (raw / field)"),
    ("field", "field", "multiplicative bias field, mean 1 in the foreground (raw = true x field)"),
)


def bias_output_fields(methods: Sequence[str]) -> list[str]:
    """``outputnode`` fields of a bias-correction workflow: ``<method>_<output>`` and
    ``<method>_meta`` (the method's sidecar fields) per method."""
    return [f"{m}_{out}" for m in methods for out in (*(o for o, _, _ in _BIAS_OUTPUTS), "meta")]


def init_ds_bias_wf(*, output_dir: Path, bids_dir: Path, source_file: Path,
                    source_entities: Mapping[str, str], suffix: str, methods: Sequence[str],
                    name: str) -> pe.Workflow:
    """Store the corrected image and the field of each method:
    ``..._desc-<method>_<suffix>`` and ``..._desc-<method>field_<suffix>``."""
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=bias_output_fields(methods)),
                        name="inputnode")
    for method in methods:
        for output, desc_suffix, description in _BIAS_OUTPUTS:
            desc = f"{method}{desc_suffix}"
            sink = pe.Node(
                DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir),
                                source_file=str(source_file), source_entities=dict(source_entities),
                                suffix=suffix, desc=desc,
                                extra_meta={"Description": description, "SkullStripped": False}),
                name=f"ds_{desc}", run_without_submitting=True, mem_gb=0.1, n_procs=1)
            workflow.connect([(inputnode, sink, [(f"{method}_{output}", "in_file"),
                                                 (f"{method}_meta", "meta_dict")])])
    return workflow


def derivative_acquisition(suffix: str, entities: Mapping[str, str]) -> str:
    """``acq`` label of a collection's maps: the collection name first, so that T1 maps from VFA
    and from IRT1 never share a name (``acq-vfa_T1map`` vs ``acq-irt1_T1map``); a raw ``acq``
    label is kept after it (``acq-vfafast``)."""
    return suffix.lower() + entities.get("acquisition", "")


QMRI_OUTPUT_FIELDS = ("out_files", "suffixes", "descs", "metas")


def collection_source_entities(suffix: str, first_entities: Mapping[str, str]) -> dict[str, str]:
    """The entities a collection's maps are named from: its first member's, without the
    grouping entities, with the collection in ``acq``."""
    entities = {k: v for k, v in first_entities.items() if k not in GROUPING_ENTITIES}
    entities["acquisition"] = derivative_acquisition(suffix, first_entities)
    return entities


def collection_map_path(output_dir: Path, suffix: str, first_entities: Mapping[str, str],
                        map_suffix: str) -> Path:
    """Where :func:`init_ds_qmri_wf` stores the primary ``map_suffix`` map of a collection."""
    return derivative_path(Path(output_dir), collection_source_entities(suffix, first_entities),
                           map_suffix, drop=GROUPING_ENTITIES)


def b1_provenance(collection, provider, output_dir: Path) -> tuple[dict[str, str], list[str]]:
    """(sidecar fields, extra ``Sources``) of a collection's maps that say where their B1+ map
    came from when another collection (``provider``) provides one (``plan.b1_provider``):
    the provider's stored TB1map, or, when a TB1map given in fmap/ won, that it was not used.
    ({}, []) for a collection that no provider is linked to."""
    link = collection.plan.b1_provider if collection.plan is not None else None
    if link is None:
        return {}, []
    path = collection_map_path(output_dir, provider.suffix, provider.members[0].entities, B1_MAP)
    if link.used:
        return ({"B1Map": path.name,
                 "B1MapSource": f"computed by qmri-bids from the {link.suffix} collection of this "
                                f"participant ({link.label}), resampled to this collection's "
                                "grid where the grids differ (linear, by the affines)"},
                [f"bids::{path.relative_to(output_dir).as_posix()}"])
    return ({"B1MapSource": f"{B1_MAP} given in fmap/ ({Path(collection.b1map).name}); it wins "
                            f"over the {B1_MAP} that the {link.suffix} collection "
                            f"({link.label}) provides ({path.name}), which was not used"}, [])


def init_ds_qmri_wf(*, output_dir: Path, bids_dir: Path, suffix: str, members: Sequence[Path],
                    first_entities: Mapping[str, str], b1map: Path | None,
                    name: str, extra_meta: Mapping[str, str] | None = None,
                    source_uris: Sequence[str] = ()) -> pe.Workflow:
    """Store every map of one collection under ``..._acq-<collection>[_desc-<d>]_<map>``, named
    after its first member (``first_entities``: that member's entities), with the members (and
    the B1 map; ``source_uris``: maps of this run it used, such as another collection's TB1map)
    as its ``Sources``; ``extra_meta``: sidecar fields of every map (:func:`b1_provenance`)."""
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(QMRI_OUTPUT_FIELDS)), name="inputnode")
    first = members[0]
    source_entities = collection_source_entities(suffix, first_entities)
    sources = [str(m) for m in members[1:]] + ([str(b1map)] if b1map else [])
    sink = pe.MapNode(
        DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir),
                        source_file=str(first), source_entities=source_entities,
                        drop_entities=list(GROUPING_ENTITIES), extra_sources=sources,
                        source_uris=list(source_uris), extra_meta=dict(extra_meta or {})),
        iterfield=["in_file", "suffix", "desc", "meta_dict"],
        name="ds_maps", run_without_submitting=True, mem_gb=0.1)
    workflow.connect([(inputnode, sink, [("out_files", "in_file"), ("suffixes", "suffix"),
                                         ("descs", "desc"), ("metas", "meta_dict")])])
    return workflow
