"""Seeded fuzzing of the JSON sidecars that discovery and the protocols read.

A base dataset holds one participant with a T1w image and one collection of every kind qmri-bids
maps (VFA with a TB1map, IRT1, MESE, MRF with its schedule and TB1map, from the demo writer;
MEGRE, MTS, MTR and MP2RAGE written here). A *case* corrupts one field of one sidecar (or the
whole file): a string, a numeric string, a list, an empty list, a negative, zero, NaN,
Infinity, a huge float, a huge integer, a boolean, null, an object, the field missing; or the
file a syntax error or not an object. The CLI then runs in-process up to the workflow (discovery,
header checks, pre-flight and the plan of every collection: what the nodes are given), and the
outcome must be exit 0 or 65, with no traceback and no internal error, and with exit 65 the
corrupted file (or its image) named in the final error message.

Used by ``tests/hardening/test_fuzz_sidecars.py`` (a bounded, seeded number of cases) and by
``benchmarks/fuzz_sidecars.py`` (as many as asked).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmri_bids.errors import EXIT_BAD_DATA, EXIT_OK
from tests.foundation._helpers import blob_image, cli, save_nifti

#: every sidecar field that discovery, the signal models' protocol readers, the B1-map
#: attachment and the Philips scaling read
FIELDS = ("FlipAngle", "RepetitionTimeExcitation", "RepetitionTime", "EchoTime",
          "InversionTime", "MTState", "RepetitionTimePreparation", "NumberShots",
          "EchoTrainLength", "PartialFourier", "RefocusingFlipAngle", "RFPhase",
          "PhilipsRescaleSlope", "PhilipsScaleSlope", "IntendedFor", "Units",
          "MagneticFieldStrength")
MISSING = object()


def _corruptions(value: Any) -> dict[str, Any]:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0
    return {
        "string": "abc",
        "numeric-string": str(number),
        "list": [number, number],
        "empty-list": [],
        "negative": -abs(number) if number else -1.0,
        "zero": 0,
        "nan": math.nan,
        "infinity": math.inf,
        "huge": 1e308,
        "huge-int": 10**30,
        "bool": True,
        "null": None,
        "object": {"value": number},
        "missing": MISSING,
    }


FILE_CORRUPTIONS = ("syntax-error", "not-an-object")


@dataclass(frozen=True)
class Case:
    sidecar: str  # path relative to the dataset
    field: str | None  # None: the whole file
    corruption: str

    @property
    def id(self) -> str:
        return f"{Path(self.sidecar).name}:{self.field or '<file>'}:{self.corruption}"


def _extra_collections(ds: Path) -> None:
    """MEGRE, MTS, MTR and MP2RAGE collections (not in the demo), with valid sidecars."""
    anat = ds / "sub-01" / "anat"
    shape = (12, 12, 4)

    def member(name: str, meta: dict, seed: int) -> None:
        save_nifti(anat / f"{name}.nii.gz", blob_image(shape, seed=seed) + 10)
        (anat / f"{name}.json").write_text(json.dumps(meta))

    for echo in (1, 2, 3):
        member(f"sub-01_echo-{echo}_MEGRE", {"EchoTime": 0.005 * echo, "FlipAngle": 15,
                                             "RepetitionTime": 0.05}, echo)
    for flip, mt, fa in ((1, "off", 6), (1, "on", 6), (2, "off", 20)):
        member(f"sub-01_flip-{flip}_mt-{mt}_MTS", {"FlipAngle": fa, "MTState": mt == "on",
                                                   "RepetitionTimeExcitation": 0.025}, 10 + flip)
    for mt in ("on", "off"):
        member(f"sub-01_mt-{mt}_MTR", {"MTState": mt == "on"}, 20)
    for inv, ti, fa in ((1, 0.7, 4), (2, 2.5, 5)):
        member(f"sub-01_inv-{inv}_MP2RAGE",
               {"InversionTime": ti, "FlipAngle": fa, "RepetitionTimeExcitation": 0.0072,
                "RepetitionTimePreparation": 5.0, "NumberShots": 160, "EchoTime": 0.003},
               30 + inv)


def make_base_dataset(root: Path) -> Path:
    """The base dataset (about 6 s to write)."""
    from qmri_bids.demo.dataset import DemoSettings, write_demo_dataset

    write_demo_dataset(root, DemoSettings(n_subjects=1, shape=(20, 24, 18),
                                          spacing=(8.8, 8.8, 8.8), qmri_slices=2))
    shutil.rmtree(root / "derivatives", ignore_errors=True)
    for extra in (root / "sub-01" / "anat").glob("sub-01_T2w.*"):
        extra.unlink()  # one anatomical image is enough
    _extra_collections(root)
    return root


def sidecars(ds: Path) -> list[str]:
    return sorted(p.relative_to(ds).as_posix() for p in ds.glob("sub-01/*/*.json"))


def make_cases(ds: Path, seed: int, n: int) -> list[Case]:
    """``n`` distinct cases drawn with ``seed`` (the same dataset gives the same cases)."""
    rng = random.Random(seed)
    files = sidecars(ds)
    seen: set[Case] = set()
    out: list[Case] = []
    while len(out) < n:
        sidecar = rng.choice(files)
        if rng.random() < 0.06:
            case = Case(sidecar, None, rng.choice(FILE_CORRUPTIONS))
        else:
            meta = json.loads((ds / sidecar).read_text())
            # Mostly fields the file has; sometimes one it lacks (added with a bad value).
            present = [f for f in FIELDS if f in meta]
            field = rng.choice(present) if present and rng.random() < 0.8 else rng.choice(FIELDS)
            corruption = rng.choice(sorted(_corruptions(meta.get(field))))
            case = Case(sidecar, field, corruption)
        if case not in seen:
            seen.add(case)
            out.append(case)
    return out


def apply_case(ds: Path, case: Case) -> None:
    path = ds / case.sidecar
    if case.field is None:
        path.write_text('{"EchoTime": 0.01,\n  "FlipAngle" 20}' if case.corruption ==
                        "syntax-error" else "[1, 2, 3]")
        return
    meta = json.loads(path.read_text())
    value = _corruptions(meta.get(case.field))[case.corruption]
    if value is MISSING:
        meta.pop(case.field, None)
    else:
        meta[case.field] = value
    path.write_text(json.dumps(meta))  # NaN and Infinity as Python writes them


def error_lines(stderr: str, ds: Path) -> set[str]:
    """The lines of the final error message, with the case's dataset path made generic (so
    that the outcomes of different copies compare)."""
    if "qmri-bids: error:" not in stderr:
        return set()
    final = stderr.split("qmri-bids: error:")[-1]
    return {ln.strip().replace(str(ds), "<ds>") for ln in final.splitlines() if ln.strip()}


@dataclass
class Outcome:
    case: Case | None  # None: the base dataset itself
    code: int
    stdout: str
    stderr: str
    lines: set[str]  # error_lines of stderr

    def problems(self, baseline: Outcome | None = None) -> list[str]:
        """What is wrong with this outcome (empty: as required). With the ``baseline`` (the
        base dataset's outcome), only what the corruption added must name the file: a shipped
        model missing at the moment, say, is not the case's doing."""
        out = []
        if self.code not in (EXIT_OK, EXIT_BAD_DATA):
            out.append(f"exit {self.code}, expected 0 or 65")
        text = self.stdout + self.stderr
        if "Traceback" in text:
            out.append("a traceback was printed")
        if "internal error" in self.stderr:
            out.append("an internal error")
        if self.code == EXIT_BAD_DATA and self.case is not None:
            new = self.lines - (baseline.lines if baseline is not None else set())
            new = {ln for ln in new if not ln.startswith("some inputs were unusable")}
            name = Path(self.case.sidecar).name
            stem = name[: -len(".json")]
            if new and not any(name in ln or stem in ln for ln in new):
                out.append(f"exit 65 without naming {name} or its image: {sorted(new)}")
            if not new and (baseline is None or baseline.code != EXIT_BAD_DATA):
                out.append(f"exit 65 without naming {name} or its image")
        return out


def _run(ds: Path, work: Path) -> tuple[int, str, str]:
    from qmri_bids.cli import run as cli_run

    original = cli_run._execute
    cli_run._execute = lambda workflow, config, subjects, execution=None: None  # no node runs
    try:
        return cli([ds, work / "out", "participant", "-w", work / "w", "--skip-bids-validation",
                    "--bias-method", "n4", "--nprocs", "1"])
    finally:
        cli_run._execute = original


def run_case(base: Path, work: Path, case: Case | None) -> Outcome:
    """Copy ``base``, corrupt it (``case`` None: as it is), run the CLI up to the workflow;
    ``work``: a fresh folder."""
    ds = work / "ds"
    shutil.copytree(base, ds)
    if case is not None:
        apply_case(ds, case)
    code, stdout, stderr = _run(ds, work)
    return Outcome(case, code, stdout, stderr, error_lines(stderr, ds))
