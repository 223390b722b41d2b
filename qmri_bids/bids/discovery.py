"""BIDS input discovery: the one module that reads the input dataset's layout.

It indexes the raw dataset with pybids (a per-run SQLite index inside the work directory, so that
parallel runs never share a locked database, and with unselected subjects excluded from the
index), then collects, per participant and session:

* anatomical images (``T1w``, ``T2w``, ``PDw``, ``T2starw``, ``FLAIR``) for bias-field correction;
* qMRI file collections (BIDS specification, appendix "Quantitative MRI"), each declared once by
  the signal model that maps it (``COLLECTION_SPECS``, from the registry in
  :mod:`qmri_bids.qmri.models`); a collection whose member or required field is missing or
  invalid (:mod:`qmri_bids.qmri.sidecar`, the one sidecar validator) is skipped with a logged
  reason naming the file and the field, and counts as unusable input (exit 65);
* ``TB1map`` field maps under ``fmap/``, attached to the collections their ``IntendedFor`` names;
  a collection's own ``IntendedFor`` (``Collection.intended_for``) is kept for collections whose
  maps serve others (a ``TB1DAM`` B1+ map, linked in pre-flight by
  :func:`qmri_bids.qmri.plan.link_b1_providers`).
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmri_bids.errors import BadDataError, MissingInputError, NothingSelectedError, UsageError
from qmri_bids.qmri.base import CollectionSpec
from qmri_bids.qmri.models import collection_model, collection_specs
from qmri_bids.qmri.sidecar import field_problem, missing_field

if TYPE_CHECKING:
    from qmri_bids.qmri.plan import CollectionPlan

LOGGER = logging.getLogger("qmri_bids.discovery")

ANAT_SUFFIXES: tuple[str, ...] = ("T1w", "T2w", "PDw", "T2starw", "FLAIR")
NIFTI_EXTENSIONS = [".nii.gz", ".nii"]


# The BIDS qMRI appendix (and this project's MRF convention), declared by the signal models.
COLLECTION_SPECS: dict[str, CollectionSpec] = collection_specs()

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
    #: what will be done with it, decided once in pre-flight (qmri_bids.qmri.plan)
    plan: CollectionPlan | None = None
    #: resolved ``IntendedFor`` of its members: the images its maps are meant for (empty: not
    #: given); read for collections that provide a map to others
    intended_for: frozenset[Path] = frozenset()

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
    #: voxels of the image, from its header in pre-flight (sizes the correction nodes)
    n_voxels: int | None = None


@dataclass
class Skipped:
    what: str
    path: Path | None
    reason: str
    #: an unusable input (the run ends with exit 65); False: only a warning
    unusable: bool = True


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
    """Labels of the ``sub-<label>`` folders; a folder whose label is not alphanumeric (BIDS
    labels are; a name that is not UTF-8 is not) is not a subject: ignored with a warning."""
    from qmri_bids.bids.scan import valid_label

    labels = []
    for folder in sorted(bids_dir.glob("sub-*")):
        if not folder.is_dir():
            continue
        if not valid_label(folder.name[4:]):
            shown = str(folder).encode("utf-8", "backslashreplace").decode("utf-8")
            LOGGER.warning("%s: not a subject folder (BIDS labels are alphanumeric): ignored",
                           shown)
            continue
        labels.append(folder.name[4:])
    return labels


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
    for key, query in raw.items():
        for entity, value in query.items():
            problem = _filter_problem(entity, value)
            if problem:
                raise UsageError(f"--bids-filter-file {path}: in {key!r}: {problem}")
    return raw


# A pybids query value: null (entity absent), "*" (any value), a string, a number or a list
# of strings/numbers (any of them).
_FILTER_SCALARS = (str, int, float)


def _filter_entities() -> frozenset[str]:
    """The entities pybids knows in file names (its 'bids' configuration), read once."""
    global _FILTER_ENTITIES
    if _FILTER_ENTITIES is None:
        from bids.layout.models import Config

        _FILTER_ENTITIES = frozenset(Config.load("bids").entities)
    return _FILTER_ENTITIES


_FILTER_ENTITIES: frozenset[str] | None = None


def _filter_problem(entity: Any, value: Any) -> str | None:
    """Why ``entity: value`` is not a usable filter (checked before pybids sees it, whose
    errors would otherwise stop the run as an internal error)."""
    import math

    known = _filter_entities()
    # CamelCase keys are sidecar fields, which pybids can also filter on (``EchoTime``).
    if not isinstance(entity, str) or (entity not in known
                                       and not re.fullmatch(r"[A-Z][A-Za-z0-9]*", entity)):
        return (f"unknown entity {entity!r}; entities are {', '.join(sorted(known))} "
                "(or a sidecar field such as EchoTime)")
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        return f"entity {entity!r}: an empty list matches nothing"
    for item in values:
        if item is None and not isinstance(value, list):
            continue
        if isinstance(item, bool) or not isinstance(item, _FILTER_SCALARS) or (
                isinstance(item, float) and not math.isfinite(item)):
            return (f"entity {entity!r}: {item!r} is not a usable value (use a string, a number, "
                    'a list of them, null for "absent" or "*" for "any")')
    return None


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

    from qmri_bids.bids.scan import SKIPPED_TOP_LEVEL, scan_dataset

    keep = "|".join(re.escape(s) for s in subjects)
    # What pybids must not walk into or parse (symlink loops, duplicate paths, broken JSON,
    # names that are not UTF-8): decided by a bounded walk first (qmri_bids.bids.scan).
    scan = scan_dataset(bids_dir, subjects)
    ignore = [
        re.compile(rf"^/({'|'.join(SKIPPED_TOP_LEVEL)})(/|$)"),
        re.compile(r"^/\."),
        re.compile(rf"^/sub-(?!({keep})(/|$))"),
        scan.ignore_pattern(),
    ]
    database_dir.mkdir(parents=True, exist_ok=True)
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    layout = BIDSLayout(
        str(bids_dir),
        validate=False,
        database_path=str(database_dir),
        reset_database=True,
        indexer=indexer,
    )
    _LAYOUT_SCANS[layout] = scan
    return layout


# The scan behind each layout built here, so that metadata reads can name a broken sidecar
# that was kept out of the index (weak: it goes with its layout).
_LAYOUT_SCANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _read_metadata(layout, path: Path) -> dict[str, Any]:
    """Merged sidecar metadata (BIDS inheritance), with a clear message for broken JSON.

    A sidecar that is not valid JSON was kept out of the index (``build_layout``): the
    metadata returned then lacks its fields, and the warning names it, its line and column.
    The CLI skips such an image as unusable (exit 65).
    """
    scan = _LAYOUT_SCANS.get(layout)
    if scan is not None:
        for json_path, reason in scan.broken_sidecars_of(path):
            LOGGER.warning("%s: its JSON sidecar %s %s", path, json_path, reason)
    try:
        return dict(layout.get_metadata(str(path)))
    except (json.JSONDecodeError, ValueError, OSError) as exc:
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
    # the parts of one member (MP2RAGE inv-1 part-mag/part-phase) in a fixed order
    return (*key, member.entities.get("part", ""))


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


def _check_member_metadata(spec: CollectionSpec, member: Member) -> str | None:
    model_cls = collection_model(spec.suffix)
    for key in spec.required_metadata:
        if key not in member.metadata and key in _METADATA_FROM_ENTITY:
            ent, mapping = _METADATA_FROM_ENTITY[key]
            if member.entities.get(ent) in mapping:
                member.metadata[key] = mapping[member.entities[ent]]
        if key not in member.metadata:
            if model_cls.field_supplied_elsewhere(member, key):
                continue
            return missing_field(key)
        problem = field_problem(key, member.metadata[key], array=key in spec.array_fields)
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
                                         "belongs to", unusable=False))
            continue
        b1maps.append((Path(bf.path), set(targets)))

    for spec in COLLECTION_SPECS.values():
        # companion files (MP2RAGE's UNIT1) are collected with the members, by the same filters
        suffixes = [spec.suffix, *spec.companion_suffixes]
        query = {**base, "suffix": suffixes if len(suffixes) > 1 else spec.suffix,
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
            collection.intended_for = frozenset(
                target for m in members
                for target in _resolve_intended_for(m.metadata.get("IntendedFor", []), bids_dir,
                                                    subject))
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
        if member.entities.get("suffix", spec.suffix) != spec.suffix:
            continue  # a companion (MP2RAGE's UNIT1): its model checks it
        missing_entity = [e for e in spec.grouping if e not in member.entities]
        if missing_entity:
            return member.path, f"file name lacks the {'/'.join(missing_entity)} entity"
        problem = _check_member_metadata(spec, member)
        if problem:
            return member.path, problem
    seen: dict[tuple, Path] = {}
    for member in members:
        # the parts of one member (part-mag/part-phase) and companions are not duplicates
        key = (*(member.entities.get(e) for e in spec.grouping), member.entities.get("part"),
               member.entities.get("suffix"))
        if key in seen:
            return member.path, f"duplicates the member {seen[key].name}"
        seen[key] = member.path
    # roles of the members (mt-on/mt-off, part pairs): the collection's model knows them
    return collection_model(spec.suffix).members_problem(members)


class NoUsableInputError(BadDataError, NothingSelectedError):
    """The selection found inputs, but every one of them was unusable: nothing is left to
    process (a NothingSelectedError), because of bad input data, so the exit code is that of
    bad data (65), and the message names each file and field."""

    exit_code = BadDataError.exit_code


def discover(
    bids_dir: Path,
    database_dir: Path,
    participants: list[str],
    sessions: list[str] | None = None,
    filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[SubjectInputs]:
    """Discover inputs of every selected participant (and session); raise if nothing is left
    (:class:`NoUsableInputError` when inputs were found but all were unusable)."""
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
        unusable = [f"{s.path}: {s.reason}" for r in results for s in r.skipped if s.unusable]
        if unusable:
            raise NoUsableInputError("nothing left to process; unusable inputs were skipped:\n  "
                                     + "\n  ".join(unusable))
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
            steps = col.plan.summary() if col.plan is not None else planned.get(col.label, [])
            rows.append((col.label, found, ", ".join(steps) or "-"))
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
