"""Anatomical bias-field correction sub-workflow: the CNN and/or the N4 baseline, side by side."""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qmri_bids.interfaces.bias import N4BiasCorrection
from qmri_bids.workflows.bias_cnn import cnn_bias_node
from qmri_bids.workflows.outputs import bias_output_fields

#: voxels assumed for an image whose header was not read (a 256³ volume)
DEFAULT_VOXELS = 256**3

_METHOD_DESC = {
    "n4": "with N4 (SimpleITK; Tustison et al., 2010) using fMRIPrep-equivalent settings (Otsu "
          "foreground mask, shrink factor 4, 4x50 iterations, B-spline distance 200 mm)",
    "cnn": "with a CNN trained implicitly on non-medical images (Simkó et al., 2022)",
}


def image_mem_gb(n_voxels: int | None) -> float:
    """Memory a bias node needs: a few float64 copies of the image plus interpreter overhead
    (declared 0.40 GB against a measured peak of 0.36 GB for the demo's CNN node)."""
    return round(0.35 + 12 * 8 * (n_voxels or DEFAULT_VOXELS) / 1024**3, 2)


def init_anat_bias_wf(*, bias_methods: Sequence[str], mem_gb: float, omp_nthreads: int,
                      device: str, name: str) -> pe.Workflow:
    """Correct one anatomical image with each method in ``bias_methods`` (``"cnn"``, ``"n4"``).

    Inputs (``inputnode``): ``in_file``. Outputs (``outputnode``): ``<method>_corrected``,
    ``<method>_field`` and ``<method>_meta`` (the method and its parameters, for the sidecars).
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = ("Anatomical images were corrected for intensity non-uniformity "
                         + " and ".join(_METHOD_DESC[m] for m in bias_methods) + ".\n")
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=bias_output_fields(bias_methods)),
                         name="outputnode")
    for method in bias_methods:
        if method == "n4":
            corr = pe.Node(N4BiasCorrection(), name="n4", mem_gb=mem_gb, n_procs=1)
        else:
            corr = cnn_bias_node(device=device, omp_nthreads=omp_nthreads, mem_gb=mem_gb)
        workflow.connect([
            (inputnode, corr, [("in_file", "in_file")]),
            (corr, outputnode, [("out_corrected", f"{method}_corrected"),
                                ("out_field", f"{method}_field"),
                                ("method_meta", f"{method}_meta")]),
        ])
    return workflow
