"""Derivative naming and writing: the one module that decides where outputs go and how.

File names are built from pybids path patterns (as fMRIPrep's DerivativesDataSink does) so that
``sub-X[_ses-Y][_acq-Z]..._desc-n4_T1w.nii.gz`` and friends come out of one rule. Every file is
written to a temporary name in the destination folder and renamed, so an interrupted run never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from qmri_bids import __version__
from qmri_bids.errors import CannotWriteError

CODE_URL = "https://github.com/qmri-bids/qmri-bids"

# Entity order follows the BIDS entity table; qMRI grouping entities (flip, inv, mt, echo) are
# kept so that per-member derivatives stay unique.
PATH_PATTERNS = [
    "sub-{subject}[/ses-{session}]/{datatype<anat|fmap>|anat}/sub-{subject}[_ses-{session}]"
    "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}]"
    "[_flip-{flip}][_inv-{inv}][_mt-{mt}][_part-{part}][_space-{space}][_res-{resolution}]"
    "[_desc-{desc}]_{suffix}{extension<.nii|.nii.gz|.json|.tsv|.html|.svg|.png>|.nii.gz}",
]

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
    entities.update({"suffix": suffix, "extension": extension, "datatype": "anat", **extra})
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


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CannotWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
                             + "\n")


def atomic_copy(src: Path, dst: Path) -> Path:
    return _atomic_write(dst, lambda tmp: tmp.write_bytes(Path(src).read_bytes()))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


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

    return _atomic_write(path, write)


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
    atomic_write_text(Path(output_dir) / ".bidsignore", "logs/\n*/log/\n*.html\nfigures/\n"
                      "*_MRF.*\n")
    return out


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
