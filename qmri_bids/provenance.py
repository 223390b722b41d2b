"""What model cards record about where a file came from: its hash and the hardware used."""

from __future__ import annotations

import platform
from pathlib import Path

# The digest lives with the model cards (qmri_bids.artifacts); re-exported for existing callers.
from qmri_bids.artifacts import sha256_file

__all__ = ["hardware_string", "sha256_file"]


def hardware_string(device: str = "cpu") -> str:
    """CPU model (or GPU name), torch threads and version, OS: enough to compare timings."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return (f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda}); "
                f"torch {torch.__version__}")
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu or platform.machine()}; {torch.get_num_threads()} torch threads; "
            f"torch {torch.__version__}; {platform.system()} {platform.release()}")
