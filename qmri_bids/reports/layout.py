"""What a participant's derivatives folder holds, from file names and sidecars alone.

Names follow :mod:`qmri_bids.bids.derivatives`: bias outputs
``sub-X[_ses-Y][_acq-Z]..._desc-<method>_<suffix>`` (corrected) and
``..._desc-<method>field_<suffix>`` (field); qMRI maps
``sub-X[_ses-Y]_acq-<collection>[_run-N][_desc-<nlls|dict|crbsd>]_<map>``. Parsing is a split
on ``_`` and ``-`` (no pybids index: the group level reads thousands of participants).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NIFTI = (".nii.gz", ".nii")
BIAS_METHODS = ("cnn", "n4")
#: desc labels of qMRI maps besides the primary estimate, in display order
REFERENCE_DESCS = ("nlls", "dict")
CRBSD = "crbsd"
#: suffixes of qMRI maps (BIDS qMRI: ``*map`` plus the two without it)
EXTRA_MAP_SUFFIXES = ("MTsat", "UNIT1")
#: display order of maps: the estimated quantity first, reciprocals and scales after
MAP_ORDER = ("T1map", "T2map", "T2starmap", "MTsat", "MTRmap", "UNIT1", "R1map", "R2map",
             "R2starmap", "M0map", "S0map", "PDmap")


def split_name(name: str) -> tuple[dict[str, str], str, str] | None:
    """``(entities, suffix, extension)`` of a BIDS file name (None when it is not one)."""
    for ext in (*NIFTI, ".json", ".tsv"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        return None
    parts = stem.split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-"):
        return None
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not value:
            return None
        entities[key] = value
    return entities, parts[-1], ext


def is_map_suffix(suffix: str) -> bool:
    return suffix.endswith("map") or suffix in EXTRA_MAP_SUFFIXES


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def sidecar_of(path: Path) -> Path:
    name = Path(path).name
    for ext in NIFTI:
        if name.endswith(ext):
            return Path(path).with_name(name[: -len(ext)] + ".json")
    return Path(path).with_suffix(".json")


@dataclass
class BiasOutput:
    """One method's outputs for one anatomical image."""

    method: str
    corrected: Path
    field: Path | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnatDerivatives:
    """The bias outputs of one anatomical image (``key``: its name without ``desc``)."""

    key: str
    suffix: str
    entities: dict[str, str]
    methods: dict[str, BiasOutput] = field(default_factory=dict)


@dataclass
class MapFile:
    path: Path
    suffix: str
    desc: str | None
    meta: dict[str, Any]

    @property
    def units(self) -> str:
        return str(self.meta.get("Units", "") or "")


@dataclass
class CollectionDerivatives:
    """The maps of one qMRI collection (``acq``: its derivative acq label)."""

    key: str
    acq: str
    entities: dict[str, str]
    maps: list[MapFile] = field(default_factory=list)

    @property
    def collection(self) -> str:
        for m in self.maps:
            if m.meta.get("SourceCollection"):
                return str(m.meta["SourceCollection"])
        return self.acq.upper()

    def primary(self) -> list[MapFile]:
        return [m for m in self.maps if m.desc is None]

    def others(self) -> list[MapFile]:
        """Maps that are neither estimates, references nor CRB SDs (e.g. a receive field
        ``desc-cnn_RB1map``): shown as maps of their own."""
        return [m for m in self.maps if m.desc not in (None, CRBSD, *REFERENCE_DESCS)]

    def get(self, suffix: str, desc: str | None = None) -> MapFile | None:
        for m in self.maps:
            if m.suffix == suffix and m.desc == desc:
                return m
        return None

    def references(self) -> list[str]:
        """The reference estimators that wrote maps here (``nlls``, ``dict``)."""
        found = {m.desc for m in self.maps}
        return [d for d in REFERENCE_DESCS if d in found]

    @property
    def common_meta(self) -> dict[str, Any]:
        """The sidecar of the first primary map (protocol, noise and estimator are shared)."""
        primary = self.primary()
        return primary[0].meta if primary else (self.maps[0].meta if self.maps else {})


@dataclass
class ParticipantDerivatives:
    subject: str
    session: str | None
    anat: list[AnatDerivatives] = field(default_factory=list)
    collections: list[CollectionDerivatives] = field(default_factory=list)
    dsegs: list[Path] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.anat and not self.collections


def _key(entities: dict[str, str], suffix: str, drop: tuple[str, ...] = ("desc",)) -> str:
    return "_".join([f"{k}-{v}" for k, v in entities.items() if k not in drop] + [suffix])


def participant_folder(output_dir: Path, subject: str, session: str | None = None) -> Path:
    base = Path(output_dir) / f"sub-{subject}"
    return base / f"ses-{session}" if session else base


def _niftis(folder: Path) -> Iterator[Path]:
    for sub in ("anat", "fmap"):
        d = folder / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.name.endswith(NIFTI) and not p.name.startswith("."):
                    yield p


def scan_participant(output_dir: Path, subject: str,
                     session: str | None = None) -> ParticipantDerivatives:
    """The bias outputs, qMRI collections and segmentations of one participant."""
    result = ParticipantDerivatives(subject, session)
    anat: dict[str, AnatDerivatives] = {}
    collections: dict[str, CollectionDerivatives] = {}
    for path in _niftis(participant_folder(output_dir, subject, session)):
        parsed = split_name(path.name)
        if parsed is None:
            continue
        entities, suffix, _ = parsed
        if entities.get("sub") != subject or entities.get("ses") != session:
            continue
        desc = entities.get("desc")
        if suffix == "dseg":
            result.dsegs.append(path)
            continue
        if is_map_suffix(suffix):
            key = _key(entities, "", ("desc",))
            col = collections.setdefault(key, CollectionDerivatives(
                key, entities.get("acq", ""), {k: v for k, v in entities.items()
                                               if k != "desc"}))
            col.maps.append(MapFile(path, suffix, desc, read_json(sidecar_of(path))))
            continue
        method = next((m for m in BIAS_METHODS if desc in (m, f"{m}field")), None)
        if method is None:
            continue
        key = _key(entities, suffix)
        item = anat.setdefault(key, AnatDerivatives(key, suffix, {k: v for k, v in
                                                                  entities.items()
                                                                  if k != "desc"}))
        out = item.methods.get(method)
        if desc == method:
            item.methods[method] = BiasOutput(method, path, out.field if out else None,
                                              read_json(sidecar_of(path)))
        elif out is None:
            item.methods[method] = BiasOutput(method, Path(), path)
        else:
            out.field = path
    for item in anat.values():
        item.methods = {m: o for m, o in sorted(item.methods.items(),
                                                key=lambda kv: BIAS_METHODS.index(kv[0]))
                        if o.corrected != Path()}
    result.anat = [a for a in anat.values() if a.methods]
    order = {"": 0, **{d: i + 1 for i, d in enumerate(REFERENCE_DESCS)}, CRBSD: 9}
    rank = {s: i for i, s in enumerate(MAP_ORDER)}
    for col in collections.values():
        col.maps.sort(key=lambda m: (order.get(m.desc or "", 5), rank.get(m.suffix, 50),
                                     m.path.name))
    result.collections = list(collections.values())
    return result


def participants(output_dir: Path) -> list[tuple[str, str | None]]:
    """(subject, session) of every participant folder with derivatives in ``output_dir``."""
    out: list[tuple[str, str | None]] = []
    for sub in sorted(Path(output_dir).glob("sub-*")):
        if not sub.is_dir():
            continue
        label = sub.name[4:]
        sessions = sorted(p.name[4:] for p in sub.glob("ses-*") if p.is_dir())
        if (sub / "anat").is_dir() or (sub / "fmap").is_dir() or not sessions:
            out.append((label, None))
        out.extend((label, s) for s in sessions)
    return out
