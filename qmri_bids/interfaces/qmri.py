"""Nipype interfaces for qMRI mapping and estimator training: thin wrappers over the cores."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


def collection_to_dict(collection) -> dict:
    """A discovery ``Collection`` as plain data (Nipype hashes and pickles node inputs)."""
    return {
        "suffix": collection.suffix,
        "subject": collection.subject,
        "session": collection.session,
        "entities": dict(collection.entities),
        "members": [{"path": str(m.path), "entities": dict(m.entities),
                     "metadata": dict(m.metadata)} for m in collection.members],
        "b1map": str(collection.b1map) if collection.b1map else None,
    }


def collection_from_dict(payload: dict):
    from pathlib import Path

    from qmri_bids.bids.discovery import Collection, Member

    return Collection(
        suffix=payload["suffix"], subject=payload["subject"], session=payload["session"],
        entities=dict(payload["entities"]),
        members=[Member(Path(m["path"]), dict(m["entities"]), dict(m["metadata"]))
                 for m in payload["members"]],
        b1map=Path(payload["b1map"]) if payload.get("b1map") else None,
    )


class _MapInputSpec(BaseInterfaceInputSpec):
    collection = traits.Dict(mandatory=True, desc="the collection (collection_to_dict)")
    estimators = traits.List(traits.Enum("nn", "nlls", "dict"), value=["nn"], usedefault=True)
    estimator_file = File(exists=True, desc="trained network (.safetensors) for this protocol")
    device = traits.Enum("cpu", "cuda", usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="take one of MultiProc's GPU slots")
    n_threads = traits.Int(1, usedefault=True)


class _MapOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="one NIfTI per map")
    suffixes = traits.List(traits.Str)
    descs = traits.List(traits.Str, desc="desc entity per map ('' for the primary map)")
    metas = traits.List(traits.Dict, desc="sidecar metadata per map")


class QmriMapping(SimpleInterface):
    """Maps of one qMRI collection (network primary; NLLS/dictionary; CRB SD)."""

    input_spec = _MapInputSpec
    output_spec = _MapOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import nibabel as nib
        import numpy as np
        import torch
        from traits.api import Undefined

        from qmri_bids.bids.derivatives import save_like
        from qmri_bids.qmri.mapping import ZHANG_2022, map_collection

        torch.set_num_threads(max(1, self.inputs.n_threads))
        collection = collection_from_dict(self.inputs.collection)
        est_file = (None if self.inputs.estimator_file is Undefined
                    else Path(self.inputs.estimator_file))
        result = map_collection(collection, self.inputs.estimators, estimator_file=est_file,
                                device=self.inputs.device)
        reference = nib.load(str(collection.members[0].path))
        ref = nib.Nifti1Image(np.zeros(result.shape, np.float32), result.affine, reference.header)
        acquisition = _acquisition_metadata(collection)
        files, suffixes, descs, metas = [], [], [], []
        for index, pmap in enumerate(result.maps):
            path = Path(runtime.cwd) / f"map{index:02d}_{pmap.desc or 'main'}_{pmap.suffix}.nii.gz"
            save_like(np.where(np.isfinite(pmap.data), pmap.data, 0.0), ref, path)
            files.append(str(path))
            suffixes.append(pmap.suffix)
            descs.append(pmap.desc or "")
            metas.append({
                "Units": pmap.units,
                **pmap.meta,
                "EstimationReference": ZHANG_2022,
                "SourceCollection": collection.suffix,
                **acquisition,
                **{k: v for k, v in result.metadata.items() if v not in (None, [])},
            })
        self._results.update(out_files=files, suffixes=suffixes, descs=descs, metas=metas)
        return runtime


def _acquisition_metadata(collection) -> dict:
    """Acquisition parameters of the members that were fitted (excluded ones left out), as
    arrays where they vary (BIDS qMRI style)."""
    from qmri_bids.qmri.protocols import select_consistent_members

    members = (collection.members if collection.suffix == "MRF"
               else select_consistent_members(collection)[0])
    keys = ("FlipAngle", "RepetitionTimeExcitation", "RepetitionTime", "InversionTime",
            "EchoTime", "MTState", "MagneticFieldStrength", "RefocusingFlipAngle")
    out = {}
    for key in keys:
        values = [m.metadata.get(key) for m in members if key in m.metadata]
        if not values:
            continue
        flat = [v for v in values if not isinstance(v, list)]
        if flat and len(flat) == len(values) and len(set(map(str, flat))) == 1:
            out[key] = flat[0]
        else:
            out[key] = values
    return out


class _TrainInputSpec(BaseInterfaceInputSpec):
    model_name = traits.Str(mandatory=True)
    protocol = traits.Dict(mandatory=True, desc="protocol dict (model_store.protocol_dict)")
    cache_dir = traits.Str(mandatory=True, desc="user model cache (--model-dir)")
    seed = traits.Int(0, usedefault=True)
    loss = traits.Enum("crb", "mse", usedefault=True)
    time_budget_s = traits.Float(desc="stop training after this many seconds")
    force = traits.Bool(False, usedefault=True,
                        desc="train into cache_dir even if an estimator exists for the protocol")
    n_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


class _TrainOutputSpec(TraitedSpec):
    estimator_file = File(exists=True)
    card = traits.Dict()


class TrainQmriEstimator(SimpleInterface):
    """Simulate → train with the CRB loss → validate → export to the cache (atomic, locked).

    If another process trained the same protocol meanwhile, its result is reused.
    """

    input_spec = _TrainInputSpec
    output_spec = _TrainOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        from traits.api import Undefined

        import torch

        from qmri_bids.qmri.model_store import find_or_train, model_from_protocol

        # Set in the worker itself: a forked MultiProc worker must not inherit the parent's
        # OpenMP pool (it deadlocks in the first parallel region).
        torch.set_num_threads(max(1, self.inputs.n_threads))
        model = model_from_protocol(self.inputs.model_name, self.inputs.protocol)
        kwargs = {"seed": self.inputs.seed, "loss": self.inputs.loss}
        if self.inputs.time_budget_s is not Undefined:
            kwargs["time_budget_s"] = self.inputs.time_budget_s
        if self.inputs.force:
            from qmri_bids.qmri.model_store import (
                estimator_stem,
                export_estimator,
                recommended_train_kwargs,
                train_and_card,
            )

            net, card = train_and_card(model, self.inputs.protocol,
                                       **{**recommended_train_kwargs(model), **kwargs})
            stem = Path(self.inputs.cache_dir) / estimator_stem(self.inputs.model_name,
                                                                 self.inputs.protocol)
            weights, _ = export_estimator(net, stem, card)
        else:
            _, card, weights, _ = find_or_train(self.inputs.model_name, model,
                                                self.inputs.protocol, None,
                                                Path(self.inputs.cache_dir), kwargs)
        self._results["estimator_file"] = str(weights)
        self._results["card"] = card
        return runtime
