"""qMRI mapping sub-workflow: (train the protocol's network if the plan says so; bring another
collection's B1+ map to this grid if the plan links one) → map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qmri_bids.interfaces.qmri import QmriMapping, ResampleB1Map
from qmri_bids.qmri.base import B1_MAP
from qmri_bids.qmri.plan import CollectionPlan
from qmri_bids.workflows.outputs import QMRI_OUTPUT_FIELDS
from qmri_bids.workflows.training import init_qmri_training_wf


def init_qmri_map_wf(*, plan: CollectionPlan, omp_nthreads: int, device: str, model_dir: Path,
                     name: str) -> pe.Workflow:
    """Map one collection as ``plan`` decided (estimators, network; no file is read here).

    Inputs (``inputnode``): ``collection`` (``collection_to_dict``). Outputs (``outputnode``):
    ``out_files``, ``suffixes``, ``descs`` (``""`` for the primary maps) and ``metas`` (sidecar
    fields), one entry per map. When the plan has no network for the protocol, the training
    sub-workflow runs first and hands its file to the mapping node.

    Maps shared between collections: when the plan takes its B1+ map from another collection
    (``plan.b1_from_provider``), ``inputnode`` also has ``b1map`` (that collection's
    ``provided``, on its grid), which ``b1_to_grid`` resamples to this collection's grid for the
    mapping node. When the model provides a map (``plan.provides``), ``outputnode`` also has
    ``provided``: that primary map, for the collections that use it.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = plan.describe()
    use_gpu = device == "cuda"
    in_fields = ["collection"] + (["b1map"] if plan.b1_from_provider else [])
    out_fields = list(QMRI_OUTPUT_FIELDS) + (["provided"] if plan.provides else [])
    inputnode = pe.Node(niu.IdentityInterface(fields=in_fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=out_fields), name="outputnode")
    mapper = pe.Node(QmriMapping(plan=plan.to_dict(), device=device, use_gpu=use_gpu,
                                 n_threads=omp_nthreads),
                     name="map", mem_gb=plan.mem_gb, n_procs=1 if use_gpu else omp_nthreads)
    workflow.connect([
        (inputnode, mapper, [("collection", "collection")]),
        (mapper, outputnode, [(f, f) for f in out_fields]),
    ])
    if plan.b1_from_provider:
        # ~10 float64 arrays of the grid (coordinates, weights, values) beside the interpreter
        mem_gb = round(0.3 + 80 * int(np.prod(plan.shape)) / 1024**3, 2)
        to_grid = pe.Node(ResampleB1Map(reference=plan.members[0], shape=list(plan.shape),
                                        target=f"the {plan.suffix} collection",
                                        source=f"the {B1_MAP} of {plan.b1_provider.label}"),
                          name="b1_to_grid", mem_gb=mem_gb, n_procs=1)
        workflow.connect([(inputnode, to_grid, [("b1map", "in_file")]),
                          (to_grid, mapper, [("out_file", "b1map")])])
    if plan.network is not None and plan.network.train_on_demand:
        train_wf = init_qmri_training_wf(model_name=plan.network.model_name,
                                         protocol=plan.network.protocol, cache_dir=model_dir,
                                         omp_nthreads=omp_nthreads, name="train_estimator_wf")
        workflow.connect(train_wf, "outputnode.estimator_file", mapper, "estimator_file")
    return workflow
