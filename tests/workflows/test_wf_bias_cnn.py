"""The bias-field CNN in participant runs: ``--bias-method both`` on ds-real brain01 (T1w
only, copied to a private dataset so that its MTS collection is not mapped), a default run on
neck01 + balls01 (every anatomical image corrected by the CNN), and ``--device cuda`` without a
GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_bids.bias.weights import DEFAULT_MODEL
from qmri_bids.errors import EXIT_OK, EXIT_USAGE
from tests.workflows._wf_helpers import copy_subject, participant_run, sidecar

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

MODELS = Path(__import__("qmri_bids").__file__).parent / "models"
ANAT_RE = re.compile(r"^sub-(?P<sub>[^_]+)_(?P<suffix>T1w|T2w|T2starw|PDw|FLAIR)\.nii\.gz$")


@pytest.fixture(scope="module")
def both_run(ds_real, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("wf_bias_both")
    bids = base / "ds"
    copy_subject(ds_real, bids, "brain01", "brain01", ("anat/*_T1w.*",))
    return participant_run(bids, base, "--bias-method", "both", "--skip-bids-validation")


@pytest.fixture(scope="module")
def default_run(ds_real, tmp_path_factory) -> dict:
    return participant_run(ds_real, tmp_path_factory.mktemp("wf_bias_default"),
                           "--participant-label", "neck01", "balls01", "--skip-bids-validation")


def test_both_writes_four_outputs_with_model_provenance(both_run):
    assert both_run["code"] == EXIT_OK, both_run["stderr"][-3000:]
    anat = both_run["out"] / "sub-brain01" / "anat"
    raw = nib.load(str(both_run["bids"] / "sub-brain01" / "anat" / "sub-brain01_T1w.nii.gz"))
    shipped = json.loads((MODELS / f"{DEFAULT_MODEL}.json").read_text())
    for desc in ("cnn", "cnnfield", "n4", "n4field"):
        path = anat / f"sub-brain01_desc-{desc}_T1w.nii.gz"
        assert path.is_file(), path.name
        img = nib.load(str(path))
        assert img.shape == raw.shape
        np.testing.assert_allclose(img.affine, raw.affine, atol=1e-4)
        data = np.asarray(img.dataobj, dtype=np.float64)
        assert np.isfinite(data).all(), path.name
        meta = sidecar(path)
        assert meta["Sources"] == ["bids:raw:sub-brain01/anat/sub-brain01_T1w.nii.gz"]
        if desc.startswith("cnn"):
            assert meta["Model"] == DEFAULT_MODEL, path.name
            assert meta["ModelSHA256"] == shipped["sha256"], path.name
    field = np.asarray(nib.load(str(anat / "sub-brain01_desc-cnnfield_T1w.nii.gz")).dataobj)
    lo, hi = sidecar(anat / "sub-brain01_desc-cnn_T1w.nii.gz")["Parameters"]["field_range"]
    positive = field[field > 0]
    assert positive.size and lo - 1e-6 <= positive.min() and positive.max() <= hi + 1e-6


def test_shipped_weights_match_their_card():
    from qmri_bids.artifacts import sha256_file

    card = json.loads((MODELS / f"{DEFAULT_MODEL}.json").read_text())
    assert sha256_file(MODELS / card["weights_file"]) == card["sha256"]


def test_default_run_corrects_every_anatomical_image_with_the_cnn(default_run):
    assert default_run["code"] == EXIT_OK, default_run["stderr"][-3000:]
    anatomical = [p for sub in ("neck01", "balls01")
                  for p in sorted((default_run["bids"] / f"sub-{sub}" / "anat").glob("*.nii.gz"))
                  if ANAT_RE.match(p.name)]
    assert len(anatomical) >= 5  # neck01: T1w, T2w, T2starw; balls01: T1w, T2w
    missing = []
    for raw in anatomical:
        m = ANAT_RE.match(raw.name)
        anat = default_run["out"] / f"sub-{m['sub']}" / "anat"
        for desc in ("cnn", "cnnfield"):
            path = anat / f"sub-{m['sub']}_desc-{desc}_{m['suffix']}.nii.gz"
            if not path.is_file():
                missing.append(path.name)
                continue
            assert sidecar(path)["Model"] == DEFAULT_MODEL
            assert nib.load(str(path)).shape == nib.load(str(raw)).shape
        # default: the CNN only, no N4
        assert not list(anat.glob(f"*desc-n4*_{m['suffix']}.nii.gz"))
    assert not missing, f"anatomical images without CNN correction: {missing}"


def test_device_cuda_without_gpu_is_a_usage_error(wf_demo, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    run = participant_run(wf_demo, tmp_path, "--device", "cuda")
    assert run["code"] == EXIT_USAGE, run["stderr"][-2000:]
    assert "cuda" in run["stderr"].lower()
    assert not list((tmp_path / "out").rglob("*desc-cnn*"))
