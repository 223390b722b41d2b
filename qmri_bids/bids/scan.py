"""A bounded walk of the input dataset before pybids indexes it.

pybids follows every symlinked folder and parses every JSON file it indexes; a loop of symlinks
makes it walk forever, a folder linked to itself multiplies the images, a sidecar with a syntax
error or a file name that is not UTF-8 makes indexing fail with a library exception. This walk
sees the same tree first (the top-level folders pybids is told to skip, and the subjects not
selected, are not entered) and decides, with a reason for each:

* **symlinked folders** are followed only when they point outside the dataset folder and to a
  folder not seen yet; one that points back into the dataset (a loop, or a second path to
  files already indexed at their real place) is not followed;
* **files** are deduplicated by real path: of several paths to one file, the one that is not a
  symlink is kept (else the first in sorted order);
* **names that are not UTF-8** are not indexed (pybids stores paths as UTF-8 text): a NIfTI
  image named so is an unusable input (exit 65), anything else is a warning;
* **JSON files** must parse to an object (at most :data:`MAX_JSON_BYTES`); a broken one is not
  indexed and is reported with its line and column; the images it is a sidecar of (BIDS
  inheritance: same suffix, entities a subset, same folder or above) are unusable (exit 65).

The result is handed to pybids as an ``ignore`` pattern (:meth:`DatasetScan.ignore_pattern`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger("qmri_bids.discovery")

#: the top-level folders pybids is told not to index (plus hidden ones)
SKIPPED_TOP_LEVEL = ("code", "derivatives", "sourcedata", "stimuli", "models")
#: a JSON sidecar larger than this is refused rather than parsed (MRF schedules are ~100 kB)
MAX_JSON_BYTES = 32 * 1024**2
#: folder depth below the dataset root beyond which nothing is entered
MAX_DEPTH = 32
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _not_utf8(name: str) -> bool:
    """Undecodable bytes reach Python as lone surrogates (``os.fsdecode``'s surrogateescape)."""
    return any("\udc80" <= ch <= "\udcff" for ch in name)


def _shown(path: Path | str) -> str:
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _is_nifti(name: str) -> bool:
    return name.endswith(NIFTI_SUFFIXES)


def split_name(name: str) -> tuple[dict[str, str], str] | None:
    """``sub-01_flip-1_VFA.json`` -> ({"sub": "01", "flip": "1"}, "VFA"); None if not BIDS-like."""
    stem = name
    for ext in (".nii.gz", ".nii", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    parts = stem.split("_")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not key or not value:
            return None
        entities[key] = value
    return entities, parts[-1]


@dataclass
class ScanProblem:
    path: Path
    reason: str
    unusable: bool  # True: an input image cannot be used (exit 65); False: a warning

    def message(self) -> str:
        return f"{_shown(self.path)}: {self.reason}"


class _IgnoreSet:
    """What pybids must not index, as the object its indexer calls ``.search`` on (with the
    path relative to the root and a leading ``/``); a set lookup instead of thousands of
    regular expressions."""

    def __init__(self, relative: set[str]):
        self.relative = relative

    def search(self, path: str) -> bool:
        if _not_utf8(path):
            return True
        if path in self.relative:
            return True
        # a file below an ignored folder
        parent = path.rpartition("/")[0]
        while parent:
            if parent in self.relative:
                return True
            parent = parent.rpartition("/")[0]
        return False


@dataclass
class DatasetScan:
    root: Path
    ignored: set[str] = field(default_factory=set)  # "/relative/path" not to index
    broken_json: dict[Path, str] = field(default_factory=dict)  # absolute path -> reason
    problems: list[ScanProblem] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)  # the NIfTI files that will be indexed

    def ignore_pattern(self) -> _IgnoreSet:
        return _IgnoreSet(self.ignored)

    def broken_sidecars_of(self, image: Path) -> list[tuple[Path, str]]:
        """The broken JSON files that would be sidecars of ``image`` (BIDS inheritance)."""
        parsed = split_name(image.name)
        if parsed is None:
            return []
        entities, suffix = parsed
        image_dir = Path(os.path.abspath(image.parent))
        out = []
        for json_path, reason in self.broken_json.items():
            parsed_json = split_name(json_path.name)
            if parsed_json is None or parsed_json[1] != suffix:
                continue
            if any(entities.get(k) != v for k, v in parsed_json[0].items()):
                continue
            folder = json_path.parent
            if folder == image_dir or folder in image_dir.parents:
                out.append((json_path, reason))
        return sorted(out)

    def unusable_messages(self) -> list[str]:
        """One line per unusable input the scan found: an image whose name is not UTF-8, a
        broken JSON file that is the sidecar of at least one image."""
        lines = [p.message() for p in self.problems if p.unusable]
        applying: dict[Path, str] = {}
        for image in self.images:
            for path, reason in self.broken_sidecars_of(image):
                applying[path] = reason
        lines += [f"{_shown(path)} {reason}" for path, reason in sorted(applying.items())]
        return lines


def _json_problem(path: Path, size: int) -> str | None:
    """Why ``path`` is not a usable JSON sidecar (pybids' own reading: UTF-8, an object)."""
    if size > MAX_JSON_BYTES:
        return f"is {size / 1024**2:.0f} MiB, too large for a JSON sidecar"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start})"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
    except RecursionError:
        return "is not usable JSON: nested too deeply"
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        return f"is not usable JSON: {exc}"
    if not isinstance(value, dict):
        return f"is not a JSON object (it holds a {type(value).__name__})"
    return _index_problem(path, value)


# pybids' entity names and the keys that stand for them in file names
_ENTITY_KEYS = {"subject": "sub", "session": "ses", "task": "task", "acquisition": "acq",
                "ceagent": "ce", "reconstruction": "rec", "direction": "dir", "run": "run",
                "modality": "mod", "echo": "echo", "flip": "flip", "inv": "inv", "mt": "mt",
                "part": "part", "proc": "proc", "space": "space", "recording": "recording",
                "chunk": "chunk", "tracer": "trc", "sample": "sample", "staining": "stain",
                "nucleus": "nuc", "volume": "voi", "tracksys": "tracksys"}
_ALWAYS_CONFLICT = ("suffix", "extension", "datatype", "fmap", "scans")


def _index_problem(path: Path, meta: dict) -> str | None:
    """What in a parsed sidecar makes pybids' indexer fail (it stops the whole index): an
    ``IntendedFor`` that is not text, or a field named like a file-name entity whose value
    differs from the one in the file name."""
    if "IntendedFor" in meta:
        intended = meta["IntendedFor"]
        entries = intended if isinstance(intended, list) else [intended]
        if not all(isinstance(e, str) for e in entries):
            return ("is not usable: field 'IntendedFor' must be a path or a list of paths, got "
                    f"{intended!r}"[:300])
    parsed = split_name(path.name)
    own = parsed[0] if parsed else {}
    for key, value in meta.items():
        if key in _ALWAYS_CONFLICT or (key in _ENTITY_KEYS and value is not None
                                       and str(value) != own.get(_ENTITY_KEYS[key])):
            return (f"is not usable: field {key!r} is a file-name entity, and its value "
                    f"{value!r} contradicts the file names it applies to"[:300])
    return None


def scan_dataset(bids_dir: Path, subjects: list[str] | None) -> DatasetScan:
    """Walk ``bids_dir`` as pybids would (``subjects``: the selected labels, None = all)."""
    root = Path(os.path.abspath(bids_dir))
    real_root = Path(os.path.realpath(root))
    scan = DatasetScan(root=root)
    keep = None if subjects is None else {f"sub-{s}" for s in subjects}
    visited_dirs = {str(real_root)}
    # (shown path, real path, is a symlink) of every file, for the deduplication
    files: dict[str, list[tuple[Path, bool]]] = {}
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            scan.problems.append(ScanProblem(folder, f"cannot be listed ({exc.strerror})", False))
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = "/" + path.relative_to(root).as_posix()
            if depth == 0 and (entry.name.startswith(".") or entry.name in SKIPPED_TOP_LEVEL or (
                    keep is not None and entry.name.startswith("sub-")
                    and entry.name not in keep)):
                continue
            if _not_utf8(entry.name):
                scan.ignored.add(rel)
                image = _is_nifti(entry.name)
                scan.problems.append(ScanProblem(
                    path, "the name is not valid UTF-8 and cannot be indexed: rename it"
                    + (" (the image is skipped)" if image else " (ignored)"), image))
                continue
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                continue
            if is_dir:
                real = os.path.realpath(path)
                if is_link and (real == str(real_root) or real.startswith(str(real_root) + os.sep)):
                    scan.ignored.add(rel)
                    scan.problems.append(ScanProblem(
                        path, f"symlinked folder not followed: it points to {_shown(real)} "
                        "inside the dataset (a loop, or a second path to files indexed at "
                        "their real place)", False))
                    continue
                if real in visited_dirs:
                    scan.ignored.add(rel)
                    scan.problems.append(ScanProblem(
                        path, f"folder not followed: {_shown(real)} was already walked "
                        "(symlink loop)", False))
                    continue
                if depth + 1 > MAX_DEPTH:
                    scan.ignored.add(rel)
                    scan.problems.append(ScanProblem(
                        path, f"folder not entered: deeper than {MAX_DEPTH} levels", False))
                    continue
                visited_dirs.add(real)
                stack.append((path, depth + 1))
                continue
            real_file = os.path.realpath(path)
            files.setdefault(real_file, []).append((path, is_link))

    for real_file, paths in files.items():
        # Keep the real location if it is among the paths, else the first path.
        paths.sort(key=lambda item: (item[1], str(item[0])))
        kept, _ = paths[0]
        for other, _ in paths[1:]:
            scan.ignored.add("/" + other.relative_to(root).as_posix())
            scan.problems.append(ScanProblem(
                other, f"the same file as {_shown(kept.relative_to(root))} (by real path): "
                "indexed once", False))
        if _is_nifti(kept.name):
            scan.images.append(Path(os.path.abspath(kept)))
        if kept.name.endswith(".json"):
            try:
                size = kept.stat().st_size
            except OSError:
                continue  # a broken symlink: pybids cannot read it either; nothing to parse
            problem = _json_problem(kept, size)
            if problem:
                scan.ignored.add("/" + kept.relative_to(root).as_posix())
                scan.broken_json[Path(os.path.abspath(kept))] = problem
    return scan


def unusable_images(scan: DatasetScan) -> list[ScanProblem]:
    """The images the scan found unusable by name alone (not UTF-8)."""
    return [p for p in scan.problems if p.unusable]


_LABEL = re.compile(r"[A-Za-z0-9]+")


def valid_label(label: str) -> bool:
    """BIDS labels are alphanumeric (this is also what keeps them safe in paths and node names)."""
    return bool(_LABEL.fullmatch(label))
