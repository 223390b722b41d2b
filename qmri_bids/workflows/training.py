"""Training sub-workflows: a CRB-trained qMRI estimator for one protocol (and the bias CNN)."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qmri_bids.interfaces.qmri import TrainQmriEstimator


def init_qmri_training_wf(*, model_name: str, protocol: dict, cache_dir: Path,
                          omp_nthreads: int = 1, seed: int = 0, loss: str = "crb",
                          time_budget_s: float | None = None, force: bool = False,
                          name: str = "train_estimator_wf") -> pe.Workflow:
    """Simulate → train (CRB loss, online noise) → validate → export into ``cache_dir``.

    Inputs (``inputnode``): ``model_name``, ``protocol`` (the model's ``to_protocol()``), set
    from the arguments. Outputs (``outputnode``): ``estimator_file``, ``card``. The export is
    atomic and locked per protocol hash, so parallel participants with the same protocol train
    it once; the result is found by later runs (and by ``--model-dir``). ``force``: train even
    when an estimator exists for the protocol (``qmri-bids train qmri --force``).
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"No pretrained estimator matched the {model_name} protocol, so one was trained for it "
        "on simulated signals (parameters drawn from documented priors, noise drawn anew at each "
        "step over a range of SNRs, CRB-normalised loss) and validated before use.\n"
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=["model_name", "protocol"]),
                        name="inputnode")
    inputnode.inputs.model_name = model_name
    inputnode.inputs.protocol = dict(protocol)
    train = pe.Node(TrainQmriEstimator(cache_dir=str(cache_dir), seed=seed, loss=loss,
                                       force=force, n_threads=omp_nthreads),
                    name="train", mem_gb=2.0, n_procs=omp_nthreads)
    if time_budget_s is not None:
        train.inputs.time_budget_s = time_budget_s
    outputnode = pe.Node(niu.IdentityInterface(fields=["estimator_file", "card"]),
                         name="outputnode")
    workflow.connect([
        (inputnode, train, [("model_name", "model_name"), ("protocol", "protocol")]),
        (train, outputnode, [("estimator_file", "estimator_file"), ("card", "card")]),
    ])
    return workflow


def init_bias_training_wf(*, config: dict, out_file: Path, checkpoint_dir: Path,
                          max_wall_s: float | None = None, n_threads: int = 1,
                          name: str = "bias_training_wf") -> pe.Workflow:
    """Make data → train (implicit loss, resumable) → validate → export safetensors + card."""
    from qmri_bids.interfaces.bias import (
        MakeBiasTrainingData,
        TrainBiasCNN,
        ValidateExportBiasCNN,
    )

    workflow = pe.Workflow(name=name)
    make_data = pe.Node(MakeBiasTrainingData(config=config), name="make_data", mem_gb=2.0)
    train = pe.Node(TrainBiasCNN(config=config, checkpoint_dir=str(checkpoint_dir),
                                 n_threads=n_threads), name="train", mem_gb=4.0,
                    n_procs=n_threads)
    if max_wall_s is not None:
        train.inputs.max_wall_s = max_wall_s
    export = pe.Node(ValidateExportBiasCNN(config=config, out_file=str(out_file)),
                     name="validate_export", mem_gb=2.0)
    workflow.connect([
        (make_data, train, [("pool_file", "pool_file"), ("validation_file", "validation_file")]),
        (make_data, export, [("validation_file", "validation_file")]),
        (train, export, [("weights", "weights"), ("summary", "summary")]),
    ])
    return workflow
