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
        from qmri_bids.bids.derivatives import save_like
        from qmri_bids.image_io import load_image

        loaded = load_image(self.inputs.in_file)
        settings = N4Settings()
        mask = None if loaded.finite_mask.all() else _finite_foreground(loaded)
        corrected, field = n4_correct(loaded.data, loaded.spacing, mask=mask, settings=settings)
        stem = _stem(self.inputs.in_file)
        out_corr = Path(runtime.cwd) / f"{stem}_n4.nii.gz"
        out_field = Path(runtime.cwd) / f"{stem}_n4field.nii.gz"
        save_like(corrected, loaded.image, out_corr)
        save_like(field, loaded.image, out_field)
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
    model = traits.Str("bias_cnn_v1", usedefault=True,
                       desc="shipped model name or path to a .safetensors file")
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

        from qmri_bids.bias.inference import correct_bias_cnn
        from qmri_bids.bias.weights import load_model
        from qmri_bids.bids.derivatives import save_like
        from qmri_bids.errors import BadDataError
        from qmri_bids.image_io import load_image

        torch.set_num_threads(max(1, self.inputs.n_threads))
        loaded = load_image(self.inputs.in_file)
        model = load_model(self.inputs.model, device=self.inputs.device)
        try:
            corrected, field = correct_bias_cnn(
                loaded.data, loaded.spacing, model, device=self.inputs.device,
                mask=None if loaded.finite_mask.all() else _finite_foreground(loaded))
        except BadDataError as exc:
            raise BadDataError(f"{self.inputs.in_file}: {exc}") from exc
        stem = _stem(self.inputs.in_file)
        out_corr = Path(runtime.cwd) / f"{stem}_cnn.nii.gz"
        out_field = Path(runtime.cwd) / f"{stem}_cnnfield.nii.gz"
        save_like(corrected, loaded.image, out_corr)
        save_like(field, loaded.image, out_field)
        self._results["out_corrected"] = str(out_corr)
        self._results["out_field"] = str(out_field)
        self._results["method_meta"] = {
            "Method": "implicitly trained CNN bias-field estimate",
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


def _finite_foreground(loaded):
    from qmri_bids.bias.n4 import otsu_foreground_mask

    return otsu_foreground_mask(loaded.data) & loaded.finite_mask


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
