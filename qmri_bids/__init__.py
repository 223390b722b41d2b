"""qmri-bids: bias-field correction and quantitative MRI mapping as a BIDS App."""

import os as _os

# Nipype phones home for version checks unless told not to; the App never uses the network.
_os.environ.setdefault("NIPYPE_NO_ET", "1")

try:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _pkg_version

    __version__ = _pkg_version("qmri-bids")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
