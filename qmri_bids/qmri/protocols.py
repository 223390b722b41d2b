"""Collections → validated signal models, and their data: the qMRI side's input layer.

A *collection* (from discovery) is duck-typed: ``collection.suffix`` ("VFA", "IRT1", ...),
``collection.members`` (each with ``path``, ``entities`` and ``metadata``) and
``collection.b1map`` (Path or None). :func:`resolve_collection` drops inconsistent members,
orders the rest the way the collection's model wants them and builds the model from their
sidecars (the model class's ``from_sidecars``; the registry in :mod:`qmri_bids.qmri.models` says
which class maps which suffix). Problems are :class:`~qmri_bids.errors.BadDataError` naming file
and field.

Real-data quirks handled here (each logged on the ``qmri_bids.qmri`` logger):

* Philips per-series display scaling: stored values are divided by
  ``PhilipsRescaleSlope × PhilipsScaleSlope`` of each member (:func:`philips_scale_factors`).
* Members acquired with different fixed parameters (e.g. another EchoTime/bandwidth for one TI)
  are not on the same signal curve and are excluded (:func:`select_consistent_members`).

The foreground of the qMRI side is :func:`foreground_mask`, the one mask policy of mapping,
noise estimation and the reference fits.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np

from qmri_bids.errors import BadDataError
from qmri_bids.qmri.base import SignalModel
from qmri_bids.qmri.models import collection_model
from qmri_bids.qmri.sidecar import Member, get_number, member_name

LOG = logging.getLogger("qmri_bids.qmri")


class Collection(Protocol):
    suffix: str
    members: list[Member]
    b1map: Path | None


# ----------------------------------------------------------------------------- consistency

CONSISTENCY_FIELDS = ("EchoTime", "PixelBandwidth", "RepetitionTime", "RepetitionTimeExcitation",
                      "InversionTime", "FlipAngle", "SliceThickness", "EchoTrainLength",
                      "MagneticFieldStrength", "RefocusingFlipAngle")


def select_consistent_members(collection: Collection) -> tuple[list[Member], list[tuple[Path, str]]]:
    """Drop members whose fixed acquisition parameters differ from the majority.

    Returns (kept members, [(path, reason), ...]). Only a strict majority decides; a field
    absent from a member is not held against it. Which fields vary by design, and whether a
    disagreeing member is dropped or only reported (members with fixed roles), is the
    collection's model's knowledge (``varying_fields``, ``fixed_roles``).
    """
    model_cls = collection_model(collection.suffix)
    suffix = collection.suffix
    members = list(collection.members)
    if not model_cls.compare_members:
        return members, []
    bad: dict[int, list[str]] = {}
    for key in CONSISTENCY_FIELDS:
        if key in model_cls.varying_fields:
            continue
        vals = {i: (m.metadata or {})[key] for i, m in enumerate(members)
                if isinstance((m.metadata or {}).get(key), (int, float))
                and not isinstance((m.metadata or {})[key], bool)}
        if len(vals) < 2:
            continue
        rounded = {i: float(f"{float(v):.4g}") for i, v in vals.items()}
        common, count = Counter(rounded.values()).most_common(1)[0]
        odd = [i for i, v in rounded.items() if v != common]
        if not odd:
            continue
        if count * 2 <= len(vals):
            LOG.warning("%s collection: members disagree on %s (%s) and no majority decides; "
                        "keeping all", suffix, key,
                        ", ".join(f"{member_name(members[i])}={vals[i]:g}" for i in vals))
            continue
        for i in odd:
            bad.setdefault(i, []).append(f"{key} = {vals[i]:g} (others {common:g})")
    excluded = []
    for i, reasons in sorted(bad.items()):
        reason = "fixed acquisition parameters differ from the other members: " + "; ".join(reasons)
        if model_cls.fixed_roles:
            LOG.warning("%s: %s; kept because the %s members play fixed roles",
                        member_name(members[i]), reason, suffix)
            continue
        LOG.warning("excluding %s from the %s fit: %s", member_name(members[i]), suffix, reason)
        excluded.append((Path(members[i].path), reason))
    drop = {p for p, _ in excluded}
    return [m for m in members if Path(m.path) not in drop], excluded


# ----------------------------------------------------------------------------- resolution


@dataclass
class ResolvedCollection:
    """A collection's model and the members it describes, in the model's member order."""

    model: SignalModel
    members: list[Member]
    excluded: list[tuple[Path, str]]  # (path, reason) of members left out of the fit


def resolve_collection(collection: Collection) -> ResolvedCollection:
    """The validated model of a collection, from its sidecars only (no image is read).

    Members are sorted by the model's ``order_field`` (flip angle, TI, TE) so that the same
    protocol listed in another member order is the same protocol: same hash, same network.
    """
    model_cls = collection_model(collection.suffix)
    kept, excluded = select_consistent_members(collection)
    if model_cls.order_field is not None:
        keys = [get_number(m, model_cls.order_field) for m in kept]
        kept = [kept[i] for i in np.argsort(keys, kind="stable")]
    return ResolvedCollection(model_cls.from_sidecars(kept), kept, excluded)


# ----------------------------------------------------------------------------- data loading


def stack_member_images(members: Sequence[Member]) -> tuple[np.ndarray, np.ndarray]:
    """(data float64 ``[X, Y, Z, N]``, affine) of 3-D member images, in the given order.

    Philips display scaling is undone; all members must share one image shape; non-finite
    voxels are set to 0 (with a warning).
    """
    factors = philips_scale_factors(list(members))
    volumes, affine, shape0 = [], None, None
    for i, m in enumerate(members):
        try:
            img = nib.load(str(m.path))
            vol = np.asarray(img.get_fdata(dtype=np.float64))
        except Exception as exc:
            raise BadDataError(f"{member_name(m)}: cannot read the image ({exc})") from exc
        if vol.ndim > 3:
            if any(s != 1 for s in vol.shape[3:]):
                raise BadDataError(f"{member_name(m)}: expected one 3-D volume per member, got "
                                   f"shape {vol.shape}")
            vol = vol.reshape(vol.shape[:3])
        while vol.ndim < 3:
            vol = vol[..., None]
        if shape0 is None:
            shape0, affine = vol.shape, img.affine
        elif vol.shape != shape0:
            raise BadDataError(f"{member_name(m)}: image shape {vol.shape} differs from "
                               f"{member_name(members[0])} {shape0}")
        elif not np.allclose(img.affine, affine, atol=1e-3):
            LOG.warning("%s: affine differs from %s; using the first member's", member_name(m),
                        member_name(members[0]))
        nonfinite = ~np.isfinite(vol)
        if nonfinite.any():
            LOG.warning("%s: %d non-finite voxels set to 0", member_name(m), int(nonfinite.sum()))
            vol = np.where(nonfinite, 0.0, vol)
        if factors is not None:
            vol = vol * factors[i]
        volumes.append(vol)
    return np.stack(volumes, axis=-1), np.asarray(affine)


@dataclass
class LoadedCollection(ResolvedCollection):
    """A resolved collection with its data ``[X, Y, Z, N]`` (members in the model's order)."""

    data: np.ndarray
    affine: np.ndarray


def load_collection_data(collection: Collection) -> LoadedCollection:
    """Resolve a collection and read its images (see :func:`resolve_collection`)."""
    resolved = resolve_collection(collection)
    data, affine = type(resolved.model).read_images(resolved.members)
    return LoadedCollection(resolved.model, resolved.members, resolved.excluded, data, affine)


def foreground_mask(data: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Voxels inside the object: mean magnitude over members above ``fraction`` × its 99th
    percentile (crude but robust for fitting, noise estimation and summary statistics).
    BadDataError when no voxel qualifies (an empty or constant collection)."""
    mean = np.abs(data).mean(-1)
    thr = fraction * np.percentile(mean[mean > 0], 99) if (mean > 0).any() else np.inf
    mask = mean > thr
    if not mask.any():
        raise BadDataError("no voxel of the collection is above the background level")
    return mask


def philips_scale_factors(members: list[Member]) -> np.ndarray | None:
    """Per-member factor 1/(PhilipsRescaleSlope × PhilipsScaleSlope) turning Philips display values
    into floating-point values comparable across series; None when no member has the fields."""
    has = ["PhilipsRescaleSlope" in (m.metadata or {}) and "PhilipsScaleSlope" in (m.metadata or {})
           for m in members]
    if not any(has):
        return None
    if not all(has):
        missing = [member_name(m) for m, h in zip(members, has, strict=True) if not h]
        raise BadDataError("Philips scaling fields (PhilipsRescaleSlope, PhilipsScaleSlope) are "
                           f"missing from {', '.join(missing)} but present in other members: the "
                           "images cannot be put on a common scale")
    factors = []
    for m in members:
        rs, ss = get_number(m, "PhilipsRescaleSlope"), get_number(m, "PhilipsScaleSlope")
        if rs <= 0 or ss <= 0:
            raise BadDataError(f"{member_name(m)}: non-positive Philips scaling slope ({rs}, {ss})")
        factors.append(1.0 / (rs * ss))
    factors = np.array(factors)
    LOG.info("Philips scaling: dividing each member by PhilipsRescaleSlope×PhilipsScaleSlope "
             "(factors %s; spread %.2f-fold)", ", ".join(f"{f:.4g}" for f in factors),
             factors.max() / factors.min())
    return factors


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _relative_b1(b1: np.ndarray, name: str) -> np.ndarray:
    """A B1+ map as a relative factor: a percent map (median of its valid values > 10) is
    divided by 100."""
    valid = b1[np.isfinite(b1) & (b1 > 0)]
    if valid.size and np.median(valid) > 10:
        LOG.info("%s: B1 map looks like percent (median %.1f); dividing by 100", name,
                 np.median(valid))
        return b1 / 100.0
    return b1


def load_b1map(path: Path | str, ref_shape: tuple[int, ...]) -> np.ndarray:
    """Relative B1+ map (1 = nominal) shaped like ``ref_shape``.

    Accepts maps that differ only by trailing singleton dimensions (a 2-D 128×128 map for
    128×128×1 images); percent maps (median > 10) are divided by 100. Non-finite or non-positive
    values are set to 1 (nominal) with a warning.
    """
    path = Path(path)
    try:
        b1 = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise BadDataError(f"{path.name}: cannot read the B1 map ({exc})") from exc
    ref_shape = tuple(ref_shape)
    if b1.shape != ref_shape:
        if _squeeze_trailing(b1.shape) != _squeeze_trailing(ref_shape):
            raise BadDataError(f"{path.name}: B1 map shape {b1.shape} does not match the images "
                               f"{ref_shape}")
        LOG.info("%s: B1 map shape %s reshaped to the images' %s", path.name, b1.shape, ref_shape)
        b1 = b1.reshape(ref_shape)
    b1 = _relative_b1(b1, path.name)
    bad = ~np.isfinite(b1) | (b1 <= 0)
    if bad.any():
        LOG.warning("%s: %d non-finite or non-positive B1 values set to 1 (nominal)", path.name,
                    int(bad.sum()))
        b1 = np.where(bad, 1.0, b1)
    return b1


def resample_b1map(path: Path | str, shape: Sequence[int], affine: np.ndarray,
                   target: str = "the images", source: str | None = None) -> np.ndarray:
    """The relative B1+ map (1 = nominal; a percent map is converted) at ``path`` on another
    grid (``shape``, ``affine``: the images it is for), matched by world coordinates, with
    linear interpolation (B1+ is a smooth field).

    Only the map's valid voxels (finite, > 0) are interpolated, with normalised weights, so the
    edge of its object is not pulled towards the zeros outside it. Grid voxels with no valid
    neighbour, or outside the map's field of view (half a voxel beyond its outer centres), get
    the nominal 1: outside the map's object is mostly outside the images' object too, and their
    count is logged. BadDataError naming the file (``source``: how messages name it, default its
    file name) when no voxel of the grid lies in the map's field of view.
    """
    from scipy import ndimage

    path = Path(path)
    source = source or path.name
    try:
        img = nib.load(str(path))
        b1 = np.asarray(img.get_fdata(dtype=np.float64))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise BadDataError(f"{source}: cannot read the B1 map ({exc})") from exc
    b1 = _relative_b1(b1.reshape(_squeeze_trailing(b1.shape)), source)
    while b1.ndim < 3:
        b1 = b1[..., None]
    if b1.ndim != 3:
        raise BadDataError(f"{source}: a B1 map must be one 3-D volume, got shape {b1.shape}")
    shape = tuple(int(n) for n in shape)
    # grid voxel (i, j, k) -> world -> voxel coordinates of the map
    to_map = np.linalg.inv(np.asarray(img.affine, np.float64)) @ np.asarray(affine, np.float64)
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = to_map[:3, :3] @ grid + to_map[:3, 3:4]
    extent = np.asarray(b1.shape, np.float64)[:, None]
    inside = np.all((coords >= -0.5) & (coords <= extent - 0.5), axis=0)
    if not inside.any():
        raise BadDataError(f"{source}: the B1 map's field of view contains no voxel of "
                           f"{target} (compare the affines of the two)")
    valid = np.isfinite(b1) & (b1 > 0)
    # mode="nearest": an axis of one voxel (a single slice) is constant across its thickness
    weight = ndimage.map_coordinates(valid.astype(np.float64), coords, order=1, mode="nearest")
    total = ndimage.map_coordinates(np.where(valid, b1, 0.0), coords, order=1, mode="nearest")
    ok = inside & (weight > 1e-6)
    out = np.ones(coords.shape[1])
    out[ok] = total[ok] / weight[ok]
    LOG.info("%s: B1 map resampled from %s to the %s grid of %s (linear, by the affines); "
             "%d of its %d voxels lie outside the map's object or field of view: nominal B1 (1) "
             "there", source, "x".join(map(str, b1.shape)), "x".join(map(str, shape)), target,
             int((~ok).sum()), ok.size)
    return out.reshape(shape)


def collection_from_paths(
    paths: list[Path], suffix: str, b1map: Path | None = None
) -> Any:
    """A duck-typed collection from NIfTI paths (sidecars read next to them), in the given order.

    For tests, benchmarks and debugging; the pipeline gets its collections from discovery.
    """
    from types import SimpleNamespace

    members = []
    for p in map(Path, paths):
        sidecar = p.with_name(p.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
        md = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        ents = {}
        for part in p.name.split("_")[:-1]:
            key, _, value = part.partition("-")
            ents[{"sub": "subject", "ses": "session"}.get(key, key)] = value
        members.append(SimpleNamespace(path=p, entities=ents, metadata=md))
    return SimpleNamespace(suffix=suffix, members=members, b1map=b1map)
