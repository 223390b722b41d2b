"""The CNN bias-correction node (implicitly trained network; Simkó et al., MIDL 2022)."""

from __future__ import annotations


def cnn_available() -> tuple[bool, str]:
    """Whether the CNN core and its shipped weights are installed."""
    try:
        from qmri_bids.bias import inference  # noqa: F401
        from qmri_bids.bias.weights import shipped_model_path
    except ImportError as exc:
        return False, f"the CNN bias-field model is not part of this installation ({exc})"
    path = shipped_model_path()
    if not path.exists():
        return False, f"the shipped CNN weights {path} are missing"
    return True, ""
