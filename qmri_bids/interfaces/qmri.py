"""Nipype interfaces for qMRI mapping and estimator training: thin wrappers over the cores."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
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
    plan = traits.Dict(mandatory=True, desc="its plan (qmri_bids.qmri.plan.CollectionPlan)")
    estimator_file = File(exists=True, desc="network trained after the plan was made")
    b1map = File(exists=True, desc="B1+ map on the collection's grid provided by another "
                                   "collection (plan.b1_provider); a TB1map from fmap/ wins")
    device = traits.Enum("cpu", "cuda", usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="take one of MultiProc's GPU slots")
    n_threads = traits.Int(1, usedefault=True)


class _MapOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="one NIfTI per map")
    suffixes = traits.List(traits.Str)
    descs = traits.List(traits.Str, desc="desc entity per map ('' for the primary map)")
    metas = traits.List(traits.Dict, desc="sidecar metadata per map")
    provided = File(exists=True, desc="the primary map the model provides to other collections "
                                      "(its ``provides`` suffix), when it provides one")


class QmriMapping(SimpleInterface):
    """Maps of one qMRI collection as its plan says (network or closed form primary;
    NLLS/dictionary; CRB SD)."""

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
        from qmri_bids.qmri.plan import CollectionPlan

        torch.set_num_threads(max(1, self.inputs.n_threads))
        collection = collection_from_dict(self.inputs.collection)
        plan = CollectionPlan.from_dict(self.inputs.plan)
        est_file = (None if self.inputs.estimator_file is Undefined
                    else Path(self.inputs.estimator_file))
        b1map = None if self.inputs.b1map is Undefined else Path(self.inputs.b1map)
        result = map_collection(collection, plan, estimator_file=est_file,
                                device=self.inputs.device, b1map=b1map)
        reference = nib.load(str(collection.members[0].path))
        ref = nib.Nifti1Image(np.zeros(result.shape, np.float32), result.affine, reference.header)
        acquisition = _acquisition_metadata(collection, plan)
        files, suffixes, descs, metas = [], [], [], []
        for index, pmap in enumerate(result.maps):
            path = Path(runtime.cwd) / f"map{index:02d}_{pmap.desc or 'main'}_{pmap.suffix}.nii.gz"
            save_like(np.where(np.isfinite(pmap.data), pmap.data, 0.0), ref, path)
            files.append(str(path))
            suffixes.append(pmap.suffix)
            descs.append(pmap.desc or "")
            meta = {
                "Units": pmap.units,
                "Description": _map_description(pmap, collection.suffix),
                "SkullStripped": False,
                **pmap.meta,
                "SourceCollection": collection.suffix,
                **acquisition,
                **{k: v for k, v in result.metadata.items() if v not in (None, [])},
            }
            # Zhang 2022 is the reference of the network and of the CRB maps, not of NLLS,
            # dictionary matching or closed-form maps.
            algorithm = str(pmap.meta.get("EstimationAlgorithm", ""))
            if "neural network" in algorithm or "Cramér-Rao" in algorithm:
                meta["EstimationReference"] = ZHANG_2022
            metas.append(meta)
        self._results.update(out_files=files, suffixes=suffixes, descs=descs, metas=metas)
        if plan.provides is not None:
            primary = [f for f, s, d in zip(files, suffixes, descs, strict=True)
                       if s == plan.provides and not d]
            if not primary:
                raise ValueError(f"{collection.members[0].path.name}: the {plan.model_name} "
                                 f"model provides a {plan.provides} but made none")
            self._results["provided"] = primary[0]
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="B1+ map (another collection's grid)")
    reference = File(exists=True, mandatory=True, desc="a member of the collection it is for")
    shape = traits.List(traits.Int, mandatory=True, desc="spatial shape of that collection")
    target = traits.Str("the images", usedefault=True, desc="that collection, for messages")
    source = traits.Str(desc="how messages name the map (default: its file name)")


class _ResampleOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the B1+ map on the reference's grid")


class ResampleB1Map(SimpleInterface):
    """A B1+ map resampled to the grid of the collection it is for (by the affines, linear;
    :func:`qmri_bids.qmri.protocols.resample_b1map`); the same values when the grids are the
    same."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import nibabel as nib
        import numpy as np

        from qmri_bids.bids.derivatives import save_like
        from qmri_bids.qmri.protocols import resample_b1map

        shape = tuple(self.inputs.shape)
        affine = nib.load(self.inputs.reference).affine
        source = self.inputs.source if isdefined(self.inputs.source) else None
        b1 = resample_b1map(self.inputs.in_file, shape, affine, target=self.inputs.target,
                            source=source)
        ref = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
        out = Path(runtime.cwd) / "b1map_on_grid.nii.gz"
        save_like(b1, ref, out)
        self._results["out_file"] = str(out)
        return runtime


_DESCRIPTIONS = {"crbsd": "Cramér-Rao bound standard deviation of the {suffix}",
                 "nlls": "{suffix} by non-linear least squares",
                 "dict": "{suffix} by dictionary matching",
                 "nn": "{suffix} by the CRB-trained network (kept beside the NLLS primary map)"}


def _map_description(pmap, collection_suffix: str) -> str:
    """Every sidecar has a Description (the schema validator warns otherwise); a map's own
    (PD, receive field, CRB SD) wins over this generic one."""
    text = _DESCRIPTIONS.get(pmap.desc or "", "{suffix} (primary estimate)")
    return text.format(suffix=pmap.suffix) + f" of the {collection_suffix} collection"


# Metadata that BIDS admits as an array in a parametric map's sidecar (one value per source
# image); any other varying parameter goes into SourceParameters, as the schema requires a
# single number (InversionTime, RepetitionTimeExcitation) or a boolean (MTState) there.
_ARRAY_METADATA = frozenset({"FlipAngle", "EchoTime", "RepetitionTimePreparation"})


def _acquisition_metadata(collection, plan) -> dict:
    """Acquisition parameters of the members that were fitted (excluded ones left out), in the
    collection's order: a single value when all members share it; otherwise an array where
    BIDS admits one, else under ``SourceParameters`` (one value per source, same order)."""
    excluded = {name for name, _ in plan.excluded}
    members = [m for m in collection.members if m.path.name not in excluded]
    keys = ("FlipAngle", "RepetitionTimeExcitation", "RepetitionTime", "InversionTime",
            "EchoTime", "MTState", "MagneticFieldStrength", "RefocusingFlipAngle")
    out: dict = {}
    varying: dict = {}
    for key in keys:
        values = [m.metadata.get(key) for m in members if key in m.metadata]
        if not values:
            continue
        flat = [v for v in values if not isinstance(v, list)]
        if flat and len(flat) == len(values) and len(set(map(str, flat))) == 1:
            out[key] = flat[0]
        elif key in _ARRAY_METADATA:
            out[key] = values
        else:
            varying[key] = values
    if varying:
        out["SourceParameters"] = varying
    return out


class _TrainInputSpec(BaseInterfaceInputSpec):
    model_name = traits.Str(mandatory=True)
    protocol = traits.Dict(mandatory=True, desc="the model's to_protocol()")
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

        import torch
        from traits.api import Undefined

        from qmri_bids.qmri.model_store import find_or_train
        from qmri_bids.qmri.models import model_class

        # Set in the worker itself: a forked MultiProc worker must not inherit the parent's
        # OpenMP pool (it deadlocks in the first parallel region).
        torch.set_num_threads(max(1, self.inputs.n_threads))
        model = model_class(self.inputs.model_name).from_protocol(self.inputs.protocol)
        kwargs = {"seed": self.inputs.seed, "loss": self.inputs.loss}
        if self.inputs.time_budget_s is not Undefined:
            kwargs["time_budget_s"] = self.inputs.time_budget_s
        _, card, weights, _ = find_or_train(model, cache_dir=Path(self.inputs.cache_dir),
                                            train_kwargs=kwargs, force=self.inputs.force)
        self._results["estimator_file"] = str(weights)
        self._results["card"] = card
        return runtime
