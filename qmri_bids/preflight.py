"""Pre-flight checks: every selected input is read once before a workflow is built.

An unusable image (truncated, 4-D where 3-D is expected, all zero, all NaN) is removed from the
run with a logged reason naming the file; the run goes on with the rest and ends with exit code
65 so that the problem cannot go unnoticed.
"""

from __future__ import annotations

import logging

from qmri_bids.bids.discovery import Skipped, SubjectInputs
from qmri_bids.errors import BadDataError, MissingInputError
from qmri_bids.image_io import check_image_header
from qmri_bids.qmri.mapping import resolve_model

LOGGER = logging.getLogger("qmri_bids.preflight")


def preflight(subjects: list[SubjectInputs], config=None) -> list[str]:
    """Drop unusable inputs in place; return one message per dropped input.

    With the run's ``config``, qMRI collections are also checked against what mapping needs:
    a B1 map of the images' shape and an intact estimator when a shipped one is used.
    """
    problems: list[str] = []
    for inputs in subjects:
        kept = []
        for anat in inputs.anat:
            try:
                check_image_header(anat.path)
            except (BadDataError, MissingInputError) as exc:
                problems.append(str(exc))
                inputs.skipped.append(Skipped(anat.suffix, anat.path, str(exc)))
                LOGGER.error("skipping %s", exc)
                continue
            kept.append(anat)
        inputs.anat = kept
        kept_collections = []
        for col in inputs.collections:
            try:
                for member in col.members:
                    check_image_header(member.path, max_ndim=4 if col.suffix == "MRF" else 3)
                # The protocol must make sense before any estimator is looked up or trained.
                resolve_model(col)
                if col.b1map is not None:
                    _check_b1map(col)
                if config is not None and "nn" in config.qmri_estimators:
                    from qmri_bids.workflows.qmri import estimator_plan

                    estimator_plan(config, col)
            except (BadDataError, MissingInputError) as exc:
                problems.append(str(exc))
                inputs.skipped.append(Skipped(col.label, member.path, str(exc)))
                LOGGER.error("skipping collection %s: %s", col.label, exc)
                continue
            kept_collections.append(col)
        inputs.collections = kept_collections
    return problems


def _check_b1map(collection) -> None:
    """The B1 map must match the images (up to trailing singleton axes), read from headers."""
    import nibabel as nib

    from qmri_bids.qmri.protocols import load_b1map

    shape = tuple(nib.load(str(collection.members[0].path)).shape)
    if collection.suffix == "MRF":  # (x, y, z, time): the map covers the spatial axes
        shape = shape[:3] if len(shape) > 3 else shape[:2] + (1,)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    shape = shape + (1,) * (3 - len(shape))
    load_b1map(collection.b1map, shape)
