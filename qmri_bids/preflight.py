"""Pre-flight checks and plans: every selected input is read once before a workflow is built.

An unusable image (truncated, 4-D where 3-D is expected, all zero, all NaN) or collection (a
sidecar field of the wrong type or range, an impossible protocol, a B1 map of another shape, a
corrupt shipped estimator) is removed from the run with a logged reason naming the file; the run
goes on with the rest and ends with exit code 65 so that the problem cannot go unnoticed. The
collections discovery already skipped for such reasons count the same way.

What survives gets what the workflow factories need, so that they read no file: the voxel count
of each anatomical image, and the plan of each collection (:mod:`qmri_bids.qmri.plan`: its model,
the estimators to run, the network to use or to train, the image shape), stored on it. Then the
collections of each participant that use B1 are linked to a collection that provides a B1+ map
(:func:`qmri_bids.qmri.plan.link_b1_providers`; a TB1map in ``fmap/`` wins), among those that
survived: a provider skipped here provides nothing.
"""

from __future__ import annotations

import logging

import numpy as np

from qmri_bids.bids.discovery import Collection, Skipped, SubjectInputs
from qmri_bids.config import RunConfig
from qmri_bids.errors import BadDataError, MissingInputError
from qmri_bids.image_io import check_header, check_image_header
from qmri_bids.qmri.plan import (
    CollectionPlan,
    link_b1_providers,
    plan_collection,
    spatial_shape,
)

LOGGER = logging.getLogger("qmri_bids.preflight")


def preflight(subjects: list[SubjectInputs], config: RunConfig) -> list[str]:
    """Drop unusable inputs in place, plan the rest; return one message per unusable input."""
    problems = [f"{skip.path}: {skip.reason}" for inputs in subjects for skip in inputs.skipped
                if skip.unusable]
    for inputs in subjects:
        kept = []
        for anat in inputs.anat:
            try:
                anat.n_voxels = int(np.prod(check_image_header(anat.path)))
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
                col.plan = _plan(col, config)
            except (BadDataError, MissingInputError) as exc:
                problems.append(str(exc))
                inputs.skipped.append(Skipped(col.label, col.members[0].path, str(exc)))
                LOGGER.error("skipping collection %s: %s", col.label, exc)
                continue
            kept_collections.append(col)
        inputs.collections = kept_collections
        where = f"sub-{inputs.subject}" + (f" ses-{inputs.session}" if inputs.session else "")
        link_b1_providers(inputs.collections, where, model_dir=config.model_dir)
    return problems


def _plan(collection: Collection, config: RunConfig) -> CollectionPlan:
    """Headers of every member, then the protocol and the network (the plan), then the B1 map
    against the images' shape."""
    spec = collection.spec
    shapes = [check_image_header(m.path, max_ndim=spec.image_ndim) for m in collection.members]
    shape = spatial_shape(shapes[0], spec)
    plan = plan_collection(collection, estimators=config.qmri_estimators,
                           model_dir=config.model_dir, shape=shape)
    if collection.b1map is not None:
        from qmri_bids.qmri.protocols import load_b1map

        check_header(collection.b1map)  # the header rules before any voxel is read
        load_b1map(collection.b1map, shape)
    return plan
