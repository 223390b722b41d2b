"""qMRI mapping sub-workflow: (train the protocol's estimator if needed) → map → derivatives."""

from __future__ import annotations

from pathlib import Path

import logging

from nipype.pipeline import engine as pe

from qmri_bids.bids.discovery import Collection
from qmri_bids.config import RunConfig
from qmri_bids.errors import BadDataError
from qmri_bids.interfaces.derivatives import DerivativesSink
from qmri_bids.interfaces.qmri import QmriMapping, collection_to_dict
from qmri_bids.workflows.training import init_qmri_training_wf

LOGGER = logging.getLogger("qmri_bids.qmri")
GROUPING_ENTITIES = ("flip", "inv", "echo", "mt", "part")


def derivative_acquisition(collection: Collection) -> str:
    """``acq`` label of the maps: the collection name first, so that T1 maps from VFA and from
    IRT1 never share a name (``acq-vfa_T1map`` vs ``acq-irt1_T1map``); a raw ``acq`` label is
    kept after it (``acq-vfafast``)."""
    return collection.suffix.lower() + collection.entities.get("acquisition", "")


def estimator_plan(config: RunConfig, collection: Collection) -> tuple[str, dict, Path | None]:
    """(model name, protocol dict, estimator file or None when it must be trained first)."""
    from qmri_bids.qmri.mapping import resolve_model
    from qmri_bids.qmri.model_store import SHIPPED_DIR, estimator_stem

    resolved = resolve_model(collection)
    if resolved is None:
        return "", {}, None
    model, protocol = resolved
    stem = estimator_stem(model.name, protocol)
    shipped = Path(SHIPPED_DIR) / f"{stem}.safetensors"
    if shipped.is_file():
        verify_estimator(shipped)  # a corrupt shipped model is an error, never a fallback
        return model.name, protocol, shipped
    cached = Path(config.model_dir) / f"{stem}.safetensors"
    if cached.is_file():
        try:
            verify_estimator(cached)
            return model.name, protocol, cached
        except BadDataError as exc:
            LOGGER.warning("%s; it will be retrained", exc)
    return model.name, protocol, None


def verify_estimator(weights: Path) -> None:
    """sha256 of an estimator against its model card (BadDataError naming the file)."""
    from qmri_bids.provenance import sha256_file
    from qmri_bids.qmri.model_store import read_card

    card = read_card(weights.with_suffix(".json"))
    if sha256_file(weights) != card.get("weights_sha256"):
        raise BadDataError(f"estimator {weights} does not match the sha256 in its card "
                           f"{weights.with_suffix('.json').name} (corrupt or replaced file)")


def init_qmri_map_wf(config: RunConfig, collection: Collection, name: str) -> pe.Workflow:
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"Quantitative maps of the {collection.suffix} collection were estimated with a neural "
        "network trained on signals simulated from the acquisition protocol, with a loss "
        "normalised by the Cramér-Rao bound (Zhang et al., 2022)"
        + ("; non-linear least squares" if "nlls" in config.qmri_estimators else "")
        + ("; dictionary matching" if "dict" in config.qmri_estimators else "")
        + ". Per-voxel Cramér-Rao standard deviations were computed at the estimates and the "
          "noise level measured in the background.\n"
    )
    mapper = pe.Node(
        QmriMapping(collection=collection_to_dict(collection),
                    estimators=list(config.qmri_estimators), device=config.device,
                    use_gpu=config.use_gpu, n_threads=config.omp_nthreads),
        name="map", mem_gb=_collection_mem_gb(collection),
        n_procs=1 if config.use_gpu else config.omp_nthreads)
    if collection.suffix not in ("MTR", "MP2RAGE") and "nn" in config.qmri_estimators:
        model_name, protocol, found = estimator_plan(config, collection)
        if found is not None:
            mapper.inputs.estimator_file = str(found)
        else:
            train_wf = init_qmri_training_wf(model_name, protocol, config.model_dir,
                                             name="train_estimator_wf",
                                             n_threads=config.omp_nthreads)
            workflow.connect(train_wf, "outputnode.estimator_file", mapper, "estimator_file")

    first = collection.members[0]
    entities = {k: v for k, v in first.entities.items() if k not in GROUPING_ENTITIES}
    entities["acquisition"] = derivative_acquisition(collection)
    sources = [str(m.path) for m in collection.members[1:]]
    if collection.b1map:
        sources.append(str(collection.b1map))
    sink = pe.MapNode(
        DerivativesSink(base_directory=str(config.output_dir), bids_dir=str(config.bids_dir),
                        source_file=str(first.path), source_entities=entities,
                        drop_entities=list(GROUPING_ENTITIES), extra_sources=sources),
        iterfield=["in_file", "suffix", "desc", "meta_dict"],
        name="ds_maps", run_without_submitting=True, mem_gb=0.1)
    workflow.connect(mapper, "out_files", sink, "in_file")
    workflow.connect(mapper, "suffixes", sink, "suffix")
    workflow.connect(mapper, "descs", sink, "desc")
    workflow.connect(mapper, "metas", sink, "meta_dict")
    return workflow


def _collection_mem_gb(collection: Collection) -> float:
    import nibabel as nib
    import numpy as np

    try:
        n = int(np.prod(nib.load(str(collection.members[0].path)).shape))
    except Exception:  # noqa: BLE001 - pre-flight already rejected unreadable files
        n = 256**3
    n_members = len(collection.members)
    if collection.suffix == "MRF":
        n_members = max(n_members, 1000)
    return round(1.0 + 16 * 8 * n * n_members / 1024**3, 2)
