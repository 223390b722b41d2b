"""BIDS input discovery: the one module that reads the input dataset's layout.

It indexes the raw dataset with pybids (a per-run SQLite index inside the work directory, so that
parallel runs never share a locked database, and with unselected subjects excluded from the
index), then collects, per participant and session:

* anatomical images (``T1w``, ``T2w``, ``PDw``, ``T2starw``, ``FLAIR``) for bias-field correction;
* qMRI file collections (BIDS specification, appendix "Quantitative MRI"), each declared once in
  ``COLLECTION_SPECS``; a collection whose member or required field is missing is skipped with a
  logged reason naming the file and the field;
* ``TB1map`` field maps under ``fmap/``, attached to the collections their ``IntendedFor`` names.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmri_bids.errors import MissingInputError, NothingSelectedError, UsageError

LOGGER = logging.getLogger("qmri_bids.discovery")

ANAT_SUFFIXES: tuple[str, ...] = ("T1w", "T2w", "PDw", "T2starw", "FLAIR")
NIFTI_EXTENSIONS = [".nii.gz", ".nii"]


@dataclass(frozen=True)
class CollectionSpec:
    """How one qMRI file collection is recognised and what it must carry."""

    suffix: str
    grouping: tuple[str, ...]  # entities that distinguish the members (flip, inv, echo, mt)
    required_metadata: tuple[str, ...]
    min_members: int = 2
    description: str = ""


# The BIDS qMRI appendix, declared once. MRF is this project's own convention (see the README).
COLLECTION_SPECS: dict[str, CollectionSpec] = {
    spec.suffix: spec
    for spec in (
        CollectionSpec("VFA", ("flip",), ("FlipAngle", "RepetitionTimeExcitation"),
                       description="variable flip angle SPGR (T1, M0)"),
        CollectionSpec("IRT1", ("inv",), ("InversionTime",),
                       description="inversion recovery (T1)"),
        CollectionSpec("MESE", ("echo",), ("EchoTime",),
                       description="multi-echo spin echo (T2)"),
        CollectionSpec("MEGRE", ("echo",), ("EchoTime",),
                       description="multi-echo gradient echo (T2*)"),
        CollectionSpec("MTS", ("flip", "mt"), ("FlipAngle", "MTState", "RepetitionTimeExcitation"),
                       min_members=3, description="MT saturation (MTsat, T1)"),
        CollectionSpec("MTR", ("mt",), ("MTState",), description="MT ratio"),
        CollectionSpec("MP2RAGE", ("inv",),
                       ("InversionTime", "FlipAngle", "RepetitionTimeExcitation",
                        "RepetitionTimePreparation", "NumberShots"),
                       description="MP2RAGE (T1, UNIT1)"),
        CollectionSpec("MRF", ("part",), ("FlipAngle", "RepetitionTimeExcitation", "EchoTime"),
                       min_members=2, description="MR fingerprinting (T1, T2, M0)"),
    )
}

# Which grouping entities may be *absent* from a member (BIDS lets MTR omit nothing, but
# MTState can be deduced from the ``mt`` entity, so we accept it from either place).
_METADATA_FROM_ENTITY = {"MTState": ("mt", {"on": True, "off": False})}


@dataclass
class Member:
    """One file of a collection: its path, pybids entities and merged JSON sidecar."""

    path: Path
    entities: dict[str, str]
    metadata: dict[str, Any]


@dataclass
class Collection:
    suffix: str
    subject: str
    session: str | None
    entities: dict[str, str]  # entities shared by all members (acq, run, ...), not grouping ones
    members: list[Member]
    b1map: Path | None = None

    @property
    def spec(self) -> CollectionSpec:
        return COLLECTION_SPECS[self.suffix]

    @property
    def label(self) -> str:
        extra = "".join(f"_{k}-{v}" for k, v in sorted(self.entities.items()))
        return f"{self.suffix}{extra}"


@dataclass
class AnatImage:
    path: Path
    suffix: str
    entities: dict[str, str]
    metadata: dict[str, Any]


@dataclass
class Skipped:
    what: str
    path: Path | None
    reason: str


@dataclass
class SubjectInputs:
    subject: str
    session: str | None
    anat: list[AnatImage] = field(default_factory=list)
    collections: list[Collection] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.anat and not self.collections


def normalise_labels(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    """Strip an optional BIDS prefix (``sub-``/``ses-``) from labels; keep order, drop repeats."""
    if not labels:
        return None
    out: list[str] = []
    for raw in labels:
        label = raw.strip()
        label = label.removeprefix(prefix)
        if not label or not re.fullmatch(r"[A-Za-z0-9]+", label):
            raise UsageError(f"invalid {prefix.rstrip('-')} label {raw!r}: must be alphanumeric")
        if label not in out:
            out.append(label)
    return out


def list_subjects_on_disk(bids_dir: Path) -> list[str]:
    return sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())


def select_participants(bids_dir: Path, labels: list[str] | None) -> list[str]:
    """The participants to process; unknown labels are a usage error naming the ones missing."""
    available = list_subjects_on_disk(bids_dir)
    if not available:
        raise MissingInputError(f"{bids_dir} holds no sub-* folder: is it a BIDS dataset?")
    if labels is None:
        return available
    missing = [lab for lab in labels if lab not in available]
    if missing:
        raise NothingSelectedError(
            f"participant(s) {', '.join('sub-' + m for m in missing)} not found in {bids_dir}; "
            f"available: {', '.join('sub-' + a for a in available)}"
        )
    return labels


def load_filters(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file``: ``{"t1w": {"acquisition": null}, "vfa": {...}}``.

    Keys are lower-case suffixes (``t1w``, ``vfa``, ``tb1map``...) or ``"all"``; values are pybids
    queries in which ``null`` means "entity absent" and ``"*"`` means "any value".
    """
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"--bids-filter-file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise UsageError(
            f"--bids-filter-file {path}: expected an object of objects, e.g. "
            '{"t1w": {"acquisition": null}}'
        )
    known = {s.lower() for s in ANAT_SUFFIXES} | {s.lower() for s in COLLECTION_SPECS} | {
        "tb1map", "all"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(
            f"--bids-filter-file {path}: unknown key(s) {unknown}; use one of {sorted(known)}"
        )
    return raw


def _pybids_query(filters: Mapping[str, Any]) -> dict[str, Any]:
    from bids.layout import Query

    query: dict[str, Any] = {}
    for key, value in filters.items():
        if value is None:
            query[key] = Query.NONE
        elif value == "*":
            query[key] = Query.ANY
        else:
            query[key] = value
    return query


def build_layout(bids_dir: Path, database_dir: Path, subjects: list[str]):
    """Index ``bids_dir`` with pybids, only the selected subjects, into ``database_dir``."""
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    keep = "|".join(re.escape(s) for s in subjects)
    ignore = [
        re.compile(r"^/(code|derivatives|sourcedata|stimuli|models)(/|$)"),
        re.compile(r"^/\."),
        re.compile(rf"^/sub-(?!({keep})(/|$))"),
    ]
    database_dir.mkdir(parents=True, exist_ok=True)
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    return BIDSLayout(
        str(bids_dir),
        validate=False,
        database_path=str(database_dir),
        reset_database=True,
        indexer=indexer,
    )


def _read_metadata(layout, path: Path) -> dict[str, Any]:
    """Merged sidecar metadata (BIDS inheritance), with a clear message for broken JSON."""
    try:
        return dict(layout.get_metadata(str(path)))
    except (json.JSONDecodeError, ValueError) as exc:
        LOGGER.warning("%s: its JSON sidecar cannot be read (%s); using no metadata", path, exc)
        return {}


def _group_key(entities: Mapping[str, Any], grouping: tuple[str, ...]) -> tuple:
    ignore = set(grouping) | {"suffix", "extension", "datatype", "subject", "session", "part"}
    return tuple(sorted((k, str(v)) for k, v in entities.items() if k not in ignore))


def _member_sort_key(member: Member, grouping: tuple[str, ...]) -> tuple:
    key = []
    for ent in grouping:
        value = member.entities.get(ent, "")
        key.append((0, int(value), "") if value.isdigit() else (1, 0, value))
    return tuple(key)


def _resolve_intended_for(value: Any, bids_dir: Path, subject: str) -> list[Path]:
    """``IntendedFor`` entries as absolute paths; accepts BIDS URIs and subject-relative paths."""
    entries = value if isinstance(value, list) else [value]
    out = []
    for entry in entries:
        if not isinstance(entry, str):
            continue
        if entry.startswith("bids::"):
            out.append(bids_dir / entry[len("bids::"):])
        elif entry.startswith("bids:"):
            continue  # another dataset: not ours to resolve
        else:
            out.append(bids_dir / f"sub-{subject}" / entry)
    return [p.resolve() for p in out]


# What a required field must hold: "bool" or a number with a lower bound (strict or not).
# Units follow BIDS (seconds, degrees). A value of the wrong type (``"FlipAngle": "20"``) is a
# problem of the sidecar, reported like a missing field rather than failing later in a model.
_FIELD_RULES: dict[str, tuple[str, float | None, bool]] = {
    "FlipAngle": ("number", 0.0, True),
    "RepetitionTimeExcitation": ("number", 0.0, True),
    "RepetitionTimePreparation": ("number", 0.0, True),
    "EchoTime": ("number", 0.0, True),
    "InversionTime": ("number", 0.0, False),
    "NumberShots": ("number", 0.0, True),
    "MTState": ("bool", None, False),
}


def _is_number(value: Any) -> bool:
    import math

    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


# Fields that may hold one value per member *or* a list: NumberShots (BIDS: per segment) and the
# MR fingerprinting schedule (one value per time point; see MRF_CONVENTION.md).
_LIST_FIELDS = {("MP2RAGE", "NumberShots"), ("MRF", "FlipAngle"),
                ("MRF", "RepetitionTimeExcitation"), ("MRF", "EchoTime")}


def _field_problem(key: str, value: Any, suffix: str = "") -> str | None:
    kind, bound, strict = _FIELD_RULES.get(key, ("any", None, False))
    if kind == "bool":
        if not isinstance(value, bool):
            return f"metadata field {key!r} must be true or false, got {value!r}"
        return None
    if kind == "number":
        listed = (suffix, key) in _LIST_FIELDS and isinstance(value, list) and value
        values = value if listed else [value]
        if not all(_is_number(v) for v in values):
            return f"metadata field {key!r} must be a number, got {value!r}"
        if bound is not None and any((v <= bound) if strict else (v < bound) for v in values):
            return (f"metadata field {key!r} must be {'>' if strict else '>='} {bound:g}, "
                    f"got {value!r}")
    return None


def _mrf_schedule_tsv(member: Member) -> bool:
    """An MRF series may keep its schedule in ``<prefix>_mrfschedule.tsv`` instead of arrays in
    the sidecar (``qmri_bids.qmri.models.mrf.read_mrf_schedule``)."""
    try:
        from qmri_bids.qmri.models.mrf import schedule_tsv_path
    except ImportError:
        return False
    return Path(schedule_tsv_path(member.path)).is_file()


def _check_member_metadata(spec: CollectionSpec, member: Member) -> str | None:
    for key in spec.required_metadata:
        if key not in member.metadata and key in _METADATA_FROM_ENTITY:
            ent, mapping = _METADATA_FROM_ENTITY[key]
            if member.entities.get(ent) in mapping:
                member.metadata[key] = mapping[member.entities[ent]]
        if key not in member.metadata:
            if (spec.suffix == "MRF" and key in ("FlipAngle", "RepetitionTimeExcitation", "EchoTime")
                    and _mrf_schedule_tsv(member)):
                continue
            return f"required metadata field {key!r} is missing from its sidecar"
        problem = _field_problem(key, member.metadata[key], spec.suffix)
        if problem:
            return problem
    return None


def discover_subject(
    layout,
    bids_dir: Path,
    subject: str,
    session: str | None,
    filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> SubjectInputs:
    """Everything qmri-bids can process for one participant (and session)."""
    filters = filters or {}
    base: dict[str, Any] = {"subject": subject, "extension": NIFTI_EXTENSIONS}
    if session is not None:
        base["session"] = session
    found = SubjectInputs(subject=subject, session=session)
    common = dict(filters.get("all", {}))

    for suffix in ANAT_SUFFIXES:
        query = {**base, "suffix": suffix, **_pybids_query({**common,
                                                            **filters.get(suffix.lower(), {})})}
        for bf in layout.get(**query):
            ents = {k: str(v) for k, v in bf.get_entities().items()}
            found.anat.append(
                AnatImage(Path(bf.path), suffix, ents, _read_metadata(layout, Path(bf.path)))
            )

    b1maps = []
    query = {**base, "suffix": "TB1map", "datatype": "fmap",
             **_pybids_query({**common, **filters.get("tb1map", {})})}
    for bf in layout.get(**query):
        meta = _read_metadata(layout, Path(bf.path))
        targets = _resolve_intended_for(meta.get("IntendedFor", []), bids_dir, subject)
        if not targets:
            found.skipped.append(Skipped("TB1map", Path(bf.path),
                                         "no IntendedFor field: cannot tell which images it "
                                         "belongs to"))
            continue
        b1maps.append((Path(bf.path), set(targets)))

    for spec in COLLECTION_SPECS.values():
        query = {**base, "suffix": spec.suffix,
                 **_pybids_query({**common, **filters.get(spec.suffix.lower(), {})})}
        groups: dict[tuple, list[Member]] = {}
        for bf in layout.get(**query):
            ents = {k: str(v) for k, v in bf.get_entities().items()}
            path = Path(bf.path)
            groups.setdefault(_group_key(ents, spec.grouping), []).append(
                Member(path, ents, _read_metadata(layout, path))
            )
        for key, members in groups.items():
            members.sort(key=lambda m: _member_sort_key(m, spec.grouping))
            collection = Collection(spec.suffix, subject, session, dict(key), members)
            reason = _collection_problem(spec, collection)
            if reason:
                path, why = reason
                found.skipped.append(Skipped(collection.label, path, why))
                LOGGER.warning("sub-%s: skipping %s: %s: %s", subject, collection.label,
                               path if path else "", why)
                continue
            member_paths = {m.path.resolve() for m in members}
            for b1_path, targets in b1maps:
                if member_paths & targets:
                    collection.b1map = b1_path
                    break
            found.collections.append(collection)
    for skip in found.skipped:
        if skip.what == "TB1map":
            LOGGER.warning("sub-%s: ignoring %s: %s", subject, skip.path, skip.reason)
    return found


def _collection_problem(spec: CollectionSpec, collection: Collection) -> tuple[Path | None, str] | None:
    members = collection.members
    if len(members) < spec.min_members:
        path = members[0].path if members else None
        return path, (f"a {spec.suffix} collection needs at least {spec.min_members} members, "
                      f"found {len(members)}")
    for member in members:
        missing_entity = [e for e in spec.grouping if e not in member.entities]
        if missing_entity:
            return member.path, f"file name lacks the {'/'.join(missing_entity)} entity"
        problem = _check_member_metadata(spec, member)
        if problem:
            return member.path, problem
    seen: dict[tuple, Path] = {}
    for member in members:
        key = tuple(member.entities.get(e) for e in spec.grouping)
        if key in seen:
            return member.path, f"duplicates the member {seen[key].name}"
        seen[key] = member.path
    if spec.suffix == "MTS":
        states = {(m.entities.get("mt")) for m in members}
        if not {"on", "off"} <= states:
            return members[0].path, "an MTS collection needs mt-on and mt-off members"
    if spec.suffix == "MRF":
        parts = {m.entities.get("part") for m in members}
        if parts not in ({"mag", "phase"}, {"real", "imag"}):
            return members[0].path, ("an MRF series needs a part-mag/part-phase (or "
                                     f"part-real/part-imag) pair, found parts {sorted(parts)}")
    if spec.suffix == "MTR":
        states = {m.entities.get("mt") for m in members}
        if states != {"on", "off"}:
            return members[0].path, "an MTR collection needs exactly one mt-on and one mt-off"
    return None


def discover(
    bids_dir: Path,
    database_dir: Path,
    participants: list[str],
    sessions: list[str] | None = None,
    filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[SubjectInputs]:
    """Discover inputs of every selected participant (and session); raise if nothing is left."""
    layout = build_layout(bids_dir, database_dir, participants)
    results: list[SubjectInputs] = []
    for subject in participants:
        subject_sessions = layout.get_sessions(subject=subject) or [None]
        if sessions:
            subject_sessions = [s for s in subject_sessions if s in sessions]
            if not subject_sessions:
                LOGGER.warning("sub-%s has none of the sessions %s", subject, sessions)
        for session in subject_sessions:
            inputs = discover_subject(layout, bids_dir, subject, session, filters)
            if inputs.empty:
                LOGGER.warning("sub-%s%s: nothing to process", subject,
                               f" ses-{session}" if session else "")
            results.append(inputs)
    if all(r.empty for r in results):
        raise NothingSelectedError(
            "the participant/session labels and BIDS filters selected no image that qmri-bids "
            f"can process in {bids_dir}"
        )
    return results


def summary_table(results: list[SubjectInputs], planned: Mapping[str, list[str]] | None = None
                  ) -> str:
    """A per-participant plain-text table of what was found and what will run."""
    planned = planned or {}
    rows: list[tuple[str, str, str]] = []
    lines = []
    for res in results:
        rows = []
        for img in res.anat:
            rows.append(("anat", img.path.name, ", ".join(planned.get(str(img.path), [])) or "-"))
        for col in res.collections:
            found = f"{len(col.members)} files" + (f" + {col.b1map.name}" if col.b1map else "")
            rows.append((col.label, found, ", ".join(planned.get(col.label, [])) or "-"))
        for skip in res.skipped:
            where = skip.path.name if skip.path else ""
            rows.append(("skipped", f"{skip.what} {where}".strip(), skip.reason))
        name = f"sub-{res.subject}" + (f" ses-{res.session}" if res.session else "")
        lines.append(name if rows else f"{name}: nothing to process")
        if rows:
            w0 = max(len(r[0]) for r in rows)
            w1 = max(len(r[1]) for r in rows)
            lines.extend(f"  {a:<{w0}}  {b:<{w1}}  -> {c}" for a, b, c in rows)
    return "\n".join(lines)
