"""Derivative naming and writing: the one module that decides where outputs go and how.

File names are built from pybids path patterns (as fMRIPrep's DerivativesDataSink does) so that
``sub-X[_ses-Y][_acq-Z]..._desc-n4_T1w.nii.gz`` and friends come out of one rule. Every file is
written through :mod:`qmri_bids.artifacts` (a temporary name in the destination folder, then a
rename), so an interrupted run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from qmri_bids import __version__

# The project's one set of atomic writers; imported here because derivative writers (and the
# CLI, group level and validation, which import them from this module) use them.
from qmri_bids.artifacts import (
    atomic_copy,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
)

__all__ = ["atomic_copy", "atomic_write_json", "atomic_write_text", "bids_uri", "container_info",
           "derivative_path", "save_like", "sidecar_for", "write_dataset_description"]

CODE_URL = "https://github.com/qmri-bids/qmri-bids"

# Entity order follows the BIDS entity table; qMRI grouping entities (flip, inv, mt, echo) are
# kept so that per-member derivatives stay unique.
PATH_PATTERNS = [
    ("sub-{subject}[/ses-{session}]/{datatype<anat|fmap>|anat}/sub-{subject}[_ses-{session}]"
     "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}]"
     "[_flip-{flip}][_inv-{inv}][_mt-{mt}][_part-{part}][_space-{space}][_res-{resolution}]"
     "[_desc-{desc}]_{suffix}{extension<.nii|.nii.gz|.json|.tsv|.html|.svg|.png>|.nii.gz}"),
]

# B1 maps go to fmap/ (BIDS: TB1map and RB1map are field-map suffixes; anat/ admits neither).
FMAP_SUFFIXES = frozenset({"TB1map", "RB1map"})

# Entities of the source file that derivative names inherit.
INHERITED_ENTITIES = ("subject", "session", "acquisition", "ceagent", "reconstruction", "run",
                      "echo", "flip", "inv", "mt", "part")


def derivative_path(
    output_dir: Path,
    source_entities: Mapping[str, Any],
    suffix: str,
    desc: str | None = None,
    extension: str = ".nii.gz",
    drop: tuple[str, ...] = (),
    **extra: str,
) -> Path:
    """Path of a derivative of ``source_entities`` (pybids entities of the raw file)."""
    from bids.layout.writing import build_path

    entities = {k: v for k, v in source_entities.items()
                if k in INHERITED_ENTITIES and k not in drop and v is not None}
    datatype = "fmap" if suffix in FMAP_SUFFIXES else "anat"
    entities.update({"suffix": suffix, "extension": extension, "datatype": datatype, **extra})
    if desc:
        entities["desc"] = desc
    rel = build_path(entities, PATH_PATTERNS, strict=False)
    if rel is None:
        raise ValueError(f"cannot build a derivative name from {entities}")
    return Path(output_dir) / rel


def bids_uri(bids_dir: Path, path: Path, dataset: str = "raw") -> str:
    """``bids:raw:sub-X/anat/...`` for a file inside the raw dataset (BIDS URI)."""
    rel = Path(path).resolve().relative_to(Path(bids_dir).resolve())
    return f"bids:{dataset}:{rel.as_posix()}"


def save_like(data: np.ndarray, reference: nib.spatialimages.SpatialImage, path: Path,
              dtype: Any = np.float32) -> Path:
    """Save ``data`` with the geometry of ``reference``: affine, qform/sform and their codes."""
    data = np.asarray(data).astype(dtype)
    if data.shape != reference.shape[: data.ndim] or data.ndim != len(reference.shape):
        data = data.reshape(reference.shape)
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(data, reference.affine, header)
    qform, qcode = reference.header.get_qform(coded=True)
    sform, scode = reference.header.get_sform(coded=True)
    img.set_qform(qform if qform is not None else reference.affine, int(qcode or 0))
    img.set_sform(sform if sform is not None else reference.affine, int(scode or 0))
    # Float outputs must not be rescaled by the raw file's slope/intercept.
    img.header.set_slope_inter(1.0, 0.0)

    def write(tmp: Path) -> None:
        # nibabel picks the compression from the extension: save under the right one, then move.
        ext = ".nii.gz" if str(path).endswith(".nii.gz") else Path(path).suffix
        named = Path(str(tmp) + ext)
        nib.save(img, str(named))
        os.replace(named, tmp)

    return atomic_write(path, write)


def write_dataset_description(output_dir: Path, bids_dir: Path,
                              container: Mapping[str, str] | None = None) -> Path:
    """fMRIPrep-style ``dataset_description.json`` and ``.bidsignore`` of the derivatives."""
    raw_desc: dict[str, Any] = {}
    try:
        raw_desc = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    generated: dict[str, Any] = {"Name": "qmri-bids", "Version": __version__, "CodeURL": CODE_URL}
    if container:
        generated["Container"] = dict(container)
    desc: dict[str, Any] = {
        "Name": "qmri-bids derivatives: bias-corrected images and quantitative maps",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "HowToAcknowledge": (
            "Please cite Simkó et al., MIDL 2022 (PMLR 172:1125-1138) for the implicitly trained "
            "bias-field CNN and Zhang et al., MRM 2022;88:436-448 for CRB-informed training."
        ),
        "DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()},
    }
    for key in ("License", "SourceDatasets"):
        if key in raw_desc:
            desc[key] = raw_desc[key]
    if "SourceDatasets" not in desc:
        source: dict[str, str] = {"URL": Path(bids_dir).resolve().as_uri()}
        if raw_desc.get("DatasetDOI"):
            source["DOI"] = raw_desc["DatasetDOI"]
        desc["SourceDatasets"] = [source]
    out = atomic_write_json(Path(output_dir) / "dataset_description.json", desc)
    # gitignore syntax as bids-validator-deno applies it: "*/log" matches the folder sub-X/log
    # ("*/log/" does not); qc/ holds the participant IQM tables, group_*.tsv the group tables.
    atomic_write_text(Path(output_dir) / ".bidsignore", "logs/\n*/log\n*/qc\n*.html\n"
                      "figures/\n*_MRF.*\ngroup_*.tsv\n")
    readme = Path(output_dir) / "README.md"
    if not readme.exists() and not (Path(output_dir) / "README").exists():
        # BIDS recommends one (the validator warns without it); a user's own is kept.
        atomic_write_text(readme, DERIVATIVES_README.format(version=__version__, url=CODE_URL))
    return out


DERIVATIVES_README = """# qmri-bids derivatives

Written by qmri-bids {version} ({url}).

- `sub-<label>/anat/`: bias-field corrected images (`desc-cnn`, `desc-n4`) with their fields
  (`desc-cnnfield`, `desc-n4field`), and quantitative maps per collection
  (`acq-<collection>_<map>`; `desc-nlls`/`desc-dict`: reference estimates; `desc-crbsd`:
  Cramér-Rao standard deviations).
- `sub-<label>.html`: participant reports; `group_report.html` and `group_*.tsv`: group level.
- `sub-<label>/log/<run>/`: run records, configuration, logs and crash files;
  `sub-<label>/qc/`: image quality metrics read by the group level.
- `logs/`: run summaries and the methods text (`CITATION.md`, `.bib`, `.html`).
"""


def container_info() -> dict[str, str] | None:
    """The ``Container`` block of GeneratedBy when running inside our Docker or Apptainer image.

    The image sets ``QMRI_BIDS_CONTAINER`` (``/.dockerenv`` is not used: CI sandboxes have it).
    """
    kind = os.environ.get("QMRI_BIDS_CONTAINER")
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        tag = os.environ.get("APPTAINER_NAME") or os.environ.get("SINGULARITY_NAME") or ""
        return {"Type": "apptainer", "Tag": tag or f"qmri-bids:{__version__}"}
    if kind:
        return {"Type": kind, "Tag": os.environ.get("QMRI_BIDS_IMAGE", f"qmri-bids:{__version__}")}
    return None


def sidecar_for(nifti_path: Path) -> Path:
    name = str(nifti_path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return Path(name[: -len(ext)] + ".json")
    return Path(name + ".json")
