"""Anatomical bias-field correction sub-workflow (N4 baseline; the CNN plugs in beside it)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qmri_bids.bids.discovery import AnatImage
from qmri_bids.config import RunConfig
from qmri_bids.interfaces.bias import N4BiasCorrection
from qmri_bids.interfaces.derivatives import DerivativesSink


def _image_mem_gb(path) -> float:
    """Memory a bias node needs: a few float64 copies of the image plus interpreter overhead."""
    import nibabel as nib
    import numpy as np

    try:
        n_vox = int(np.prod(nib.load(str(path)).shape))
    except Exception:  # noqa: BLE001 - pre-flight already rejected unreadable files
        n_vox = 256**3
    return round(0.5 + 12 * 8 * n_vox / 1024**3, 2)


def init_anat_bias_wf(config: RunConfig, anat: AnatImage, name: str) -> pe.Workflow:
    """Correct one anatomical image with each requested method and store image and field."""
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        "Anatomical images were corrected for intensity non-uniformity "
        + (" and ".join(
            {"n4": "with N4 (SimpleITK; Tustison et al., 2010) using fMRIPrep-equivalent "
                   "settings (Otsu foreground mask, shrink factor 4, 4x50 iterations, B-spline "
                   "distance 200 mm)",
             "cnn": "with a CNN trained implicitly on non-medical images (Simkó et al., 2022)"}[m]
            for m in config.bias_methods if m in ("n4", "cnn")))
        + ".\n"
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    inputnode.inputs.in_file = str(anat.path)
    mem_gb = _image_mem_gb(anat.path)

    for method in config.bias_methods:
        if method == "n4":
            corr = pe.Node(N4BiasCorrection(), name="n4", mem_gb=mem_gb, n_procs=1)
        else:
            from qmri_bids.workflows.bias_cnn import cnn_bias_node

            corr = cnn_bias_node(config, mem_gb)
        sinks = []
        for out, desc, text in (
            ("out_corrected", method, "bias-field corrected image (raw / field)"),
            ("out_field", f"{method}field", "multiplicative bias field, mean 1 in the "
             "foreground (raw = true x field)"),
        ):
            sink = pe.Node(
                DerivativesSink(
                    base_directory=str(config.output_dir),
                    bids_dir=str(config.bids_dir),
                    source_file=str(anat.path),
                    source_entities=anat.entities,
                    suffix=anat.suffix,
                    desc=desc,
                    extra_meta={"Description": text, "SkullStripped": False},
                ),
                name=f"ds_{desc}",
                run_without_submitting=True,
                mem_gb=0.1,
                n_procs=1,
            )
            workflow.connect([
                (corr, sink, [(out, "in_file"), ("method_meta", "meta_dict")]),
            ])
            sinks.append(sink)
        workflow.connect(inputnode, "in_file", corr, "in_file")
    return workflow
