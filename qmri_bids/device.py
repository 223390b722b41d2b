"""Choosing the torch device, with the reason logged (``--device auto|cpu|cuda``).

The one place that decides: the CLI calls it once and hands the result to every node.
"""

from __future__ import annotations

import logging

from qmri_bids.errors import UsageError

LOGGER = logging.getLogger("qmri_bids")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def select_device(requested: str = "auto") -> tuple[str, str]:
    """Return (device, reason) for ``auto|cpu|cuda[:N]``.

    ``auto`` falls back to the CPU with the reason; an explicit ``cuda`` without a usable GPU is
    a usage error (exit 64), never a silent CPU fallback: the user asked for something specific.
    """
    import torch

    req = (requested or "auto").strip().lower()
    available = torch.cuda.is_available()
    if req == "cpu":
        return "cpu", "--device cpu was requested"
    if req == "auto":
        if available:
            return "cuda", f"auto: CUDA GPU found ({torch.cuda.get_device_name(0)})"
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        return "cpu", f"auto: {why} (torch {torch.__version__}); running on CPU"
    if req == "cuda" or req.startswith("cuda:"):
        if not available:
            build = ("this torch build has no CUDA support" if torch.version.cuda is None
                     else f"torch is built for CUDA {torch.version.cuda} but sees no GPU")
            raise UsageError(
                f"--device {requested} was requested but no CUDA GPU is usable ({build}); in a "
                "container pass --gpus all (Docker) or --nv (Apptainer), or use --device auto")
        index = int(req.split(":", 1)[1]) if ":" in req else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA "
                             "device(s) exist")
        return req, f"--device {req} was requested; using {torch.cuda.get_device_name(index)}"
    raise UsageError(f"unknown device {requested!r}: choose one of {DEVICE_CHOICES}")
