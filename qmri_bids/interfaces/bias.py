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
        mask = None
        if not loaded.finite_mask.all():
            from qmri_bids.bias.n4 import otsu_foreground_mask

            mask = otsu_foreground_mask(loaded.data) & loaded.finite_mask
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


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
