"""The one validator of the sidecar fields that qMRI collections are built from.

Discovery (which collections are usable) and the signal models (``from_sidecars``: which protocol a
collection has) read fields through this module, so a value is accepted or rejected the same way
everywhere, and every message names the file and the field. Units are BIDS units (seconds,
degrees); each range's hint explains the usual mistake (milliseconds instead of seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qmri_bids.errors import BadDataError


class Member(Protocol):
    """What the validator needs of a collection member (discovery's ``Member`` or a stand-in)."""

    path: Path
    entities: dict[str, str]
    metadata: dict[str, Any]


# (lower exclusive, upper inclusive, hint) in BIDS units.
RANGES: dict[str, tuple[float, float, str]] = {
    "EchoTime": (0.0, 1.0, "BIDS times are in seconds (35 ms is 0.035)"),
    "InversionTime": (0.0, 30.0, "BIDS times are in seconds (900 ms is 0.9)"),
    "RepetitionTime": (0.0, 100.0, "BIDS times are in seconds"),
    "RepetitionTimeExcitation": (0.0, 1.0, "BIDS times are in seconds (15 ms is 0.015)"),
    "RepetitionTimePreparation": (0.0, 100.0, "BIDS times are in seconds"),
    "FlipAngle": (0.0, 180.0, "flip angles are in degrees, in (0, 180]"),
    "RefocusingFlipAngle": (0.0, 360.0, "flip angles are in degrees"),
    "NumberShots": (0.0, 1e5, "number of excitations per readout"),
    "EchoTrainLength": (0.0, 1e5, "number of echoes/excitations"),
    "PartialFourier": (0.5, 1.0, "fraction of k-space sampled"),
}
#: fields that must be JSON booleans
BOOLEAN_FIELDS = frozenset({"MTState"})


def member_name(member: Member) -> str:
    return Path(member.path).name


def _number_problem(key: str, value: Any) -> tuple[str | None, float | None]:
    """(problem, value as float); a one-element list counts as its element."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"field '{key}' must be a number, got {type(value).__name__} {value!r}", None
    number = float(value)
    if not math.isfinite(number):
        return f"field '{key}' is not finite ({number})", None
    if key in RANGES:
        lo, hi, hint = RANGES[key]
        if not lo < number <= hi:
            return f"{key} = {number:g} is outside ({lo:g}, {hi:g}]; {hint}", None
    return None, number


def field_problem(key: str, value: Any, *, array: bool = False) -> str | None:
    """What is wrong with ``value`` for field ``key`` (None when it is usable).

    Fields in ``BOOLEAN_FIELDS`` must be booleans, every other field a finite number (inside its
    ``RANGES`` entry, if any). ``array``: the field may hold one value per time point (MR
    fingerprinting schedules); every element is then checked like a single value.
    """
    if key in BOOLEAN_FIELDS:
        if not isinstance(value, bool):
            return f"field '{key}' must be true or false, got {type(value).__name__} {value!r}"
        return None
    values = value if array and isinstance(value, list) and len(value) > 1 else [value]
    for item in values:
        problem, _ = _number_problem(key, item)
        if problem:
            return problem
    return None


def missing_field(key: str) -> str:
    return f"required field '{key}' is missing from its JSON sidecar"


def get_number(member: Member, key: str, required: bool = True) -> float | None:
    """A numeric sidecar field, range-checked; BadDataError naming file and field otherwise."""
    metadata = member.metadata or {}
    if key not in metadata or metadata[key] is None:
        if required:
            raise BadDataError(f"{member_name(member)}: {missing_field(key)}")
        return None
    problem, number = _number_problem(key, metadata[key])
    if problem:
        raise BadDataError(f"{member_name(member)}: {problem}")
    return number


def numbers(members: Sequence[Member], key: str) -> np.ndarray:
    """The field ``key`` of every member (required, range-checked)."""
    return np.array([get_number(m, key) for m in members], dtype=np.float64)


def repetition_time(member: Member, prefer_excitation: bool, required: bool) -> float | None:
    """``RepetitionTimeExcitation`` or ``RepetitionTime``, whichever the model prefers first."""
    keys = ("RepetitionTimeExcitation", "RepetitionTime")
    for key in keys if prefer_excitation else keys[::-1]:
        value = get_number(member, key, required=False)
        if value is not None:
            return value
    if required:
        raise BadDataError(f"{member_name(member)}: required field 'RepetitionTimeExcitation' "
                           "(or 'RepetitionTime') is missing from its JSON sidecar")
    return None


def mt_state(member: Member) -> bool:
    """Whether MT saturation is on: the boolean ``MTState`` or else the ``mt`` entity."""
    value = (member.metadata or {}).get("MTState")
    if value is not None:
        problem = field_problem("MTState", value)
        if problem:
            raise BadDataError(f"{member_name(member)}: {problem}")
        return bool(value)
    entity = (member.entities or {}).get("mt")
    if entity in ("on", "off"):
        return entity == "on"
    raise BadDataError(f"{member_name(member)}: cannot tell whether MT is on: no boolean "
                       "'MTState' in the sidecar and no mt-on/mt-off entity")


def require_variation(members: Sequence[Member], key: str, values: np.ndarray) -> None:
    """The fit needs distinct values of the varying parameter: no duplicates, not all equal."""
    uniq, counts = np.unique(np.round(values, 9), return_counts=True)
    if len(uniq) < 2:
        raise BadDataError(f"{key} is {values[0]:g} for all members "
                           f"({', '.join(member_name(m) for m in members)}); the fit needs it "
                           "to vary")
    for u in uniq[counts > 1]:
        dups = [member_name(m) for m, v in zip(members, values, strict=True) if round(v, 9) == u]
        raise BadDataError(f"{key} = {u:g} appears in several members ({', '.join(dups)}); "
                           "each member must have its own value")


def require_members(members: Sequence[Member], n: int, suffix: str,
                    exactly: bool = False) -> None:
    """At least (or, with ``exactly``, exactly) ``n`` members in a ``suffix`` collection."""
    if len(members) < n or (exactly and len(members) != n):
        names = ", ".join(member_name(m) for m in members) or "none"
        need = "exactly" if exactly else "at least"
        raise BadDataError(f"{suffix} collection needs {need} {n} members, got {len(members)} "
                           f"({names})")
