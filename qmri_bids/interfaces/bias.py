"""Nipype interfaces for bias-field correction: thin wrappers over ``qmri_bids.bias``."""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="anatomical image to correct")


class _BiasOutputSpec(TraitedSpec):
    out_corrected = File(exists=True, desc="bias-corrected image")
    out_field = File(exists=True, desc="estimated multiplicative bias field")
    method_meta = traits.Dict(desc="method and parameters, for the sidecars")


class N4BiasCorrection(SimpleInterface):
    """N4 (SimpleITK) with fMRIPrep-equivalent settings; writes corrected image and field."""

    input_spec = _N4InputSpec
    output_spec = _BiasOutputSpec

    def _run_interface(self, runtime):
        from qmri_bids.bias.n4 import N4Settings, n4_correct
        from qmri_bids.image_io import load_image

        loaded = load_image(self.inputs.in_file)
        settings = N4Settings()
        mask = None if loaded.finite_mask.all() else _finite_foreground(loaded)
        corrected, field = n4_correct(loaded.data, loaded.spacing, mask=mask, settings=settings)
        stem = _stem(self.inputs.in_file)
        out_corr = Path(runtime.cwd) / f"{stem}_n4.nii.gz"
        out_field = Path(runtime.cwd) / f"{stem}_n4field.nii.gz"
        _save_pair(loaded.image, (corrected, out_corr), (field, out_field))
        self._results["out_corrected"] = str(out_corr)
        self._results["out_field"] = str(out_field)
        self._results["method_meta"] = {
            "Method": "N4BiasFieldCorrection (SimpleITK)",
            "MethodReference": "Tustison et al., IEEE TMI 2010;29:1310-1320",
            "Parameters": {**settings.as_dict(), "mask": "Otsu foreground"},
        }
        return runtime


class _CNNInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="anatomical image to correct")
    model = traits.Str(desc="shipped model name or path to a .safetensors file (default: the "
                            "shipped model, qmri_bids.bias.weights.DEFAULT_MODEL)")
    device = traits.Enum("cpu", "cuda", usedefault=True, desc="torch device (chosen by the CLI)")
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tells MultiProc to give this node one of its GPU slots")
    n_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


class CNNBiasCorrection(SimpleInterface):
    """Bias-field correction with the implicitly trained CNN (Simkó et al., MIDL 2022)."""

    input_spec = _CNNInputSpec
    output_spec = _BiasOutputSpec

    def _run_interface(self, runtime):
        import torch
        from nipype.interfaces.base import isdefined

        from qmri_bids.bias.inference import correct_bias_cnn
        from qmri_bids.bias.weights import DEFAULT_MODEL, load_model
        from qmri_bids.errors import BadDataError
        from qmri_bids.image_io import load_image

        torch.set_num_threads(max(1, self.inputs.n_threads))
        loaded = load_image(self.inputs.in_file)
        model = load_model(self.inputs.model if isdefined(self.inputs.model) else DEFAULT_MODEL,
                           device=self.inputs.device)
        try:
            # Non-finite voxels are masked out by correct_bias_cnn itself (its own foreground
            # rule, the one the network was validated with).
            corrected, field = correct_bias_cnn(loaded.data, loaded.spacing, model,
                                                device=self.inputs.device)
        except BadDataError as exc:
            raise BadDataError(f"{self.inputs.in_file}: {exc}") from exc
        stem = _stem(self.inputs.in_file)
        out_corr = Path(runtime.cwd) / f"{stem}_cnn.nii.gz"
        out_field = Path(runtime.cwd) / f"{stem}_cnnfield.nii.gz"
        _save_pair(loaded.image, (corrected, out_corr), (field, out_field))
        self._results["out_corrected"] = str(out_corr)
        self._results["out_field"] = str(out_field)
        self._results["method_meta"] = {
            "Method": "CNN bias-field estimate (implicit training of Simkó et al. with explicit "
                      "terms on synthetic, bias-free MR-like images)",
            "MethodReference": ("Simkó A, Löfstedt T, Garpebring A, Nyholm T, Jonsson J. MRI "
                                "bias field correction with an implicitly trained CNN. MIDL 2022, "
                                "PMLR 172:1125-1138"),
            "Model": model.name,
            "ModelSHA256": model.sha256,
            "Device": self.inputs.device,
            "Parameters": {"fusion": model.card.get("inference", {}).get("fusion", {}),
                           "field_range": [0.5, 2.0]},
        }
        return runtime


def _save_pair(reference, *items) -> None:
    """Write the corrected image and the field at once: gzip compression dominates the node's
    time on large volumes and zlib releases the GIL, so two threads halve it."""
    from concurrent.futures import ThreadPoolExecutor

    from qmri_bids.bids.derivatives import save_like

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        for future in [pool.submit(save_like, data, reference, path) for data, path in items]:
            future.result()


def _finite_foreground(loaded):
    from qmri_bids.bias.n4 import otsu_foreground_mask

    return otsu_foreground_mask(loaded.data) & loaded.finite_mask


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class _MakeBiasDataInputSpec(BaseInterfaceInputSpec):
    config = traits.Dict(mandatory=True, desc="TrainConfig.to_dict()")


class _MakeBiasDataOutputSpec(TraitedSpec):
    pool_file = File(exists=True, desc="training images and masks (safetensors)")
    validation_file = File(exists=True, desc="held-out images, masks and fields (safetensors)")


class MakeBiasTrainingData(SimpleInterface):
    """Render the training pool (MR-like synthetic volumes, and/or the legacy dead leaves +
    bundled photos) and the held-out set."""

    input_spec = _MakeBiasDataInputSpec
    output_spec = _MakeBiasDataOutputSpec

    def _run_interface(self, runtime):
        from safetensors.torch import save_file

        from qmri_bids.bias.train import TrainConfig, build_pool, pool_tensors, validation_set

        cfg = TrainConfig.from_dict(self.inputs.config)
        pool = build_pool(cfg)
        vset = validation_set(cfg.net.in_size, length_scale=cfg.length_scale)
        pool_file = Path(runtime.cwd) / "pool.safetensors"
        val_file = Path(runtime.cwd) / "validation.safetensors"
        save_file(pool_tensors(pool), str(pool_file))
        save_file({k: v.contiguous() for k, v in vset.items()}, str(val_file))
        self._results.update(pool_file=str(pool_file), validation_file=str(val_file))
        return runtime


class _TrainBiasInputSpec(BaseInterfaceInputSpec):
    config = traits.Dict(mandatory=True)
    pool_file = File(exists=True, mandatory=True)
    validation_file = File(exists=True, mandatory=True)
    checkpoint_dir = traits.Str(mandatory=True, desc="checkpoints (resume from here)")
    max_wall_s = traits.Float(desc="training wall-time budget")
    n_threads = traits.Int(1, usedefault=True)


class _TrainBiasOutputSpec(TraitedSpec):
    weights = File(exists=True, desc="trained weights (safetensors, not yet a shipped model)")
    summary = traits.Dict()


class TrainBiasCNN(SimpleInterface):
    """Training with the implicit (Simkó et al.) and explicit terms, resumable from
    ``checkpoint_dir``."""

    input_spec = _TrainBiasInputSpec
    output_spec = _TrainBiasOutputSpec

    def _run_interface(self, runtime):
        import torch
        from safetensors.torch import load_file, save_file
        from traits.api import Undefined

        from qmri_bids.bias.train import TrainConfig, pool_from_tensors, train

        torch.set_num_threads(max(1, self.inputs.n_threads))
        cfg = TrainConfig.from_dict(self.inputs.config)
        pool = pool_from_tensors(load_file(self.inputs.pool_file), cfg)
        vset = load_file(self.inputs.validation_file)
        budget = None if self.inputs.max_wall_s is Undefined else self.inputs.max_wall_s
        net, summary = train(cfg, self.inputs.checkpoint_dir, resume=True, max_wall_s=budget,
                             pool=pool, vset=vset, validate_every=cfg.checkpoint_every)
        weights = Path(runtime.cwd) / "trained.safetensors"
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
                  str(weights))
        self._results.update(weights=str(weights), summary=summary)
        return runtime


class _ExportBiasInputSpec(BaseInterfaceInputSpec):
    config = traits.Dict(mandatory=True)
    weights = File(exists=True, mandatory=True)
    validation_file = File(exists=True, mandatory=True)
    summary = traits.Dict(mandatory=True)
    out_file = traits.Str(mandatory=True, desc="destination .safetensors (card written beside)")


class _ExportBiasOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    card = File(exists=True)
    validation = traits.Dict()


class ValidateExportBiasCNN(SimpleInterface):
    """Validate on held-out images, then write the safetensors weights and the model card."""

    input_spec = _ExportBiasInputSpec
    output_spec = _ExportBiasOutputSpec

    def _run_interface(self, runtime):
        from safetensors.torch import load_file

        from qmri_bids.bias.cnn import BiasNet, FusionConfig
        from qmri_bids.bias.train import TrainConfig, export_model, validate

        cfg = TrainConfig.from_dict(self.inputs.config)
        net = BiasNet(cfg.net)
        net.load_state_dict(load_file(self.inputs.weights))
        metrics = validate(net, load_file(self.inputs.validation_file))
        out = export_model(net, self.inputs.out_file, cfg, self.inputs.summary, metrics,
                           FusionConfig(), notes="trained by 'qmri-bids train bias'")
        self._results.update(out_file=str(out), card=str(Path(out).with_suffix(".json")),
                             validation=metrics)
        return runtime
