"""Choosing the torch device, with the reason logged (``--device auto|cpu|cuda``)."""

from __future__ import annotations

import logging

from qmri_bids.errors import UsageError

LOGGER = logging.getLogger("qmri_bids")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def select_device(requested: str = "auto") -> tuple[str, str]:
    """Return (device, reason). ``cuda`` without a usable GPU is a usage error (exit 64)."""
    import torch

    if requested not in DEVICE_CHOICES:
        raise UsageError(f"--device must be one of {DEVICE_CHOICES}, got {requested!r}")
    if requested == "cpu":
        return "cpu", "--device cpu was requested"
    available = torch.cuda.is_available()
    if requested == "cuda":
        if not available:
            raise UsageError(
                "--device cuda was requested but no CUDA GPU is usable (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); in a "
                "container, pass --gpus all (Docker) or --nv (Apptainer), or use --device auto"
            )
        return "cuda", f"--device cuda was requested; using {torch.cuda.get_device_name(0)}"
    if available:
        return "cuda", f"auto: CUDA GPU found ({torch.cuda.get_device_name(0)})"
    why = ("this torch build has no CUDA support" if torch.version.cuda is None
           else "no CUDA device is visible")
    return "cpu", f"auto: {why}; running on CPU"
