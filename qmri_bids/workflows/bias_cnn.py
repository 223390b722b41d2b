"""The CNN bias-correction node (implicitly trained network; Simkó et al., MIDL 2022)."""

from __future__ import annotations

from nipype.pipeline import engine as pe

from qmri_bids.interfaces.bias import CNNBiasCorrection


def cnn_available() -> tuple[bool, str]:
    """Whether the shipped CNN weights are installed (their integrity is checked at load)."""
    from qmri_bids.bias.weights import resolve_model_path

    path = resolve_model_path()
    if not path.exists():
        return False, f"the shipped CNN weights {path} are missing (reinstall qmri-bids)"
    return True, ""


def cnn_bias_node(*, device: str, omp_nthreads: int, mem_gb: float) -> pe.Node:
    """One CNN node; on a GPU it takes one of MultiProc's GPU slots (``use_gpu``)."""
    use_gpu = device == "cuda"
    return pe.Node(
        CNNBiasCorrection(device=device, use_gpu=use_gpu, n_threads=omp_nthreads),
        name="cnn",
        mem_gb=mem_gb,
        n_procs=1 if use_gpu else omp_nthreads,
    )
