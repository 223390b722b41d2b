"""Command-line parsing and the checks ``build_config`` makes before any processing starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmri_bids import __version__
from qmri_bids.cli.parser import build_parser, parse_mem
from qmri_bids.errors import (
    EXIT_CANNOT_WRITE,
    EXIT_MISSING_INPUT,
    EXIT_NOTHING_SELECTED,
    EXIT_OK,
    EXIT_USAGE,
)

from ._helpers import cli, make_tiny_bids


def _config(argv):
    from qmri_bids.cli.run import build_config

    return build_config(build_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bids(tmp_path_factory.mktemp("tiny") / "ds", subjects=("01", "02", "03"))


# --------------------------------------------------------------------------- labels, spellings
@pytest.mark.parametrize("labels, expected", [
    (["01"], ["01"]),
    (["sub-01"], ["01"]),
    (["sub-01", "02"], ["01", "02"]),
    (["03", "sub-01", "01"], ["03", "01"]),  # order kept, repeats dropped
])
def test_participant_labels_with_and_without_prefix(tiny, tmp_path, labels, expected):
    config = _config([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--participant-label", *labels])
    assert config.participant_labels == expected


@pytest.mark.parametrize("hyphen, underscore, value, attr", [
    ("--participant-label", "--participant_label", "01", "participant_label"),
    ("--session-label", "--session_label", "ses-1", "session_label"),
    ("--work-dir", "--work_dir", "/tmp/somewhere", "work_dir"),
    ("--bids-filter-file", "--bids_filter_file", "/tmp/f.json", "bids_filter_file"),
    ("--omp-nthreads", "--omp_nthreads", "2", "omp_nthreads"),
    ("--n-cpus", "--n_cpus", "2", "nprocs"),
    ("--bias-method", "--bias_method", "both", "bias_method"),
    ("--mem-mb", "--mem_mb", "2000", "mem_gb"),
    ("--use-plugin", "--use_plugin", "/tmp/p.yml", "use_plugin"),
])
def test_hyphen_and_underscore_spellings_agree(hyphen, underscore, value, attr):
    parser = build_parser()
    a = parser.parse_args(["in", "out", "participant", hyphen, value])
    b = parser.parse_args(["in", "out", "participant", underscore, value])
    assert getattr(a, attr) == getattr(b, attr)
    assert getattr(a, attr) is not None


@pytest.mark.parametrize("flag", ["--skip-bids-validation", "--skip_bids_validation",
                                  "--stop-on-first-crash", "--stop_on_first_crash",
                                  "--write-graph", "--write_graph"])
def test_boolean_flags_both_spellings(flag):
    args = build_parser().parse_args(["in", "out", "participant", flag])
    dest = flag.lstrip("-").replace("-", "_")
    assert getattr(args, dest) is True
    assert getattr(build_parser().parse_args(["in", "out", "participant"]), dest) is False


def test_short_work_dir_option():
    args = build_parser().parse_args(["in", "out", "participant", "-w", "/tmp/x"])
    assert args.work_dir == Path("/tmp/x")


def test_several_labels_after_one_flag():
    args = build_parser().parse_args(["in", "out", "participant", "--participant-label",
                                      "sub-01", "02", "sub-03"])
    assert args.participant_label == ["sub-01", "02", "sub-03"]


# ------------------------------------------------------------------------------------- --mem
@pytest.mark.parametrize("text, gb", [
    ("8000", 8000 / 1024),  # a bare number is megabytes
    ("8G", 8.0),
    ("8GB", 8.0),
    ("8g", 8.0),
    ("500M", 500 / 1024),
    ("1.5G", 1.5),
    ("1T", 1024.0),
])
def test_parse_mem(text, gb):
    assert parse_mem(text) == pytest.approx(gb)


def test_mem_reaches_the_plugin(tiny, tmp_path):
    for text, gb in (("8000", 8000 / 1024), ("8G", 8.0)):
        config = _config([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                          "--mem", text, "--nprocs", "1"])
        assert config.mem_gb == pytest.approx(gb)
        assert config.plugin_args["memory_gb"] == pytest.approx(gb)
        assert config.plugin_args["n_procs"] == 1


# ------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("extra", [
    ["--mem", "lots"],
    ["--mem", "0"],
    ["--mem", "-5G"],
    ["--nprocs", "0"],
    ["--nprocs", "two"],
    ["--omp-nthreads", "-1"],
    ["--bias-method", "magic"],
    ["--device", "tpu"],
    ["--no-such-option"],
    ["--participant-label"],  # needs at least one value
])
def test_bad_option_values_exit_64(tiny, tmp_path, extra):
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w", *extra])
    assert code == EXIT_USAGE
    assert "error" in err


def test_bad_analysis_level_exits_64(tiny, tmp_path):
    code, _, err = cli([tiny, tmp_path / "out", "subject"])
    assert code == EXIT_USAGE
    assert "analysis_level" in err


def test_missing_positional_exits_64():
    code, _, _err = cli(["only-one-argument"])
    assert code == EXIT_USAGE


@pytest.mark.parametrize("label", ["sub-", "0 1", "sub-01_x", "a/b"])
def test_invalid_label_exits_64(tiny, tmp_path, label):
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--participant-label", label, "--skip-bids-validation"])
    assert code == EXIT_USAGE, err
    assert "label" in err


def test_omp_threads_above_nprocs_exit_64(tiny, tmp_path):
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--nprocs", "1", "--omp-nthreads", "2"])
    assert code == EXIT_USAGE
    assert "--omp-nthreads" in err


def test_version_in_process(capsys):
    code, out, err = cli(["--version"])
    assert code == EXIT_OK
    assert f"qmri-bids {__version__}" in out + err


def test_version_python_m_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qmri_bids", "--version"], check=False,
                          capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qmri-bids {__version__}"


def test_version_console_script_subprocess(tmp_path):
    exe = shutil.which("qmri-bids")
    if exe is None:
        pytest.skip("the qmri-bids console script is not on PATH")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120,
                          check=False,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qmri-bids {__version__}"


def test_bad_option_console_script_exits_64(tmp_path):
    exe = shutil.which("qmri-bids")
    if exe is None:
        pytest.skip("the qmri-bids console script is not on PATH")
    proc = subprocess.run([exe, str(tmp_path), str(tmp_path / "o"), "participant", "--mem",
                           "lots"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          check=False)
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" not in proc.stderr
    assert "--mem" in proc.stderr


# --------------------------------------------------------------------- participants, filters
def test_unknown_participant_exits_18(tiny, tmp_path):
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--participant-label", "01", "nobody", "--skip-bids-validation"])
    assert code == EXIT_NOTHING_SELECTED
    assert "sub-nobody" in err
    assert not list((tmp_path / "out").glob("sub-*")), "nothing may be processed"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_filter_file_invalid_json_exits_64(tiny, tmp_path):
    bad = _write(tmp_path / "filters.json", '{"t1w": {"acquisition": nul')
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--bids-filter-file", bad, "--skip-bids-validation"])
    assert code == EXIT_USAGE
    assert "not valid JSON" in err


@pytest.mark.parametrize("content", ['["t1w"]', '{"t1w": "x"}', '{"bold": {"task": "rest"}}'])
def test_filter_file_wrong_structure_exits_64(tiny, tmp_path, content):
    bad = _write(tmp_path / "filters.json", content)
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--bids-filter-file", bad, "--skip-bids-validation"])
    assert code == EXIT_USAGE
    assert "--bids-filter-file" in err


def test_filter_file_missing_exits_64(tiny, tmp_path):
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--bids-filter-file", tmp_path / "nope.json", "--skip-bids-validation"])
    assert code == EXIT_USAGE
    assert "does not exist" in err


def test_filter_selecting_nothing_exits_18(tiny, tmp_path):
    filt = _write(tmp_path / "filters.json", json.dumps({"t1w": {"acquisition": "*"}}))
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--bids-filter-file", filt, "--skip-bids-validation"])
    assert code == EXIT_NOTHING_SELECTED
    assert "selected no image" in err
    assert not list((tmp_path / "out").glob("sub-*/anat"))


def test_filter_null_and_star(tiny, tmp_path):
    """``null`` = entity absent, ``"*"`` = any value (checked through discovery)."""
    from qmri_bids.bids.discovery import discover, load_filters

    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    anat = ds / "sub-01" / "anat"
    shutil.copy(anat / "sub-01_T1w.nii.gz", anat / "sub-01_acq-fast_T1w.nii.gz")
    shutil.copy(anat / "sub-01_T1w.json", anat / "sub-01_acq-fast_T1w.json")

    def names(filters: dict) -> list[str]:
        path = _write(tmp_path / "f.json", json.dumps(filters))
        subjects = discover(ds, tmp_path / "db", ["01"], None, load_filters(path))
        return sorted(a.path.name for a in subjects[0].anat)

    assert names({}) == ["sub-01_T1w.nii.gz", "sub-01_acq-fast_T1w.nii.gz"]
    assert names({"t1w": {"acquisition": None}}) == ["sub-01_T1w.nii.gz"]
    assert names({"t1w": {"acquisition": "*"}}) == ["sub-01_acq-fast_T1w.nii.gz"]
    assert names({"t1w": {"acquisition": "fast"}}) == ["sub-01_acq-fast_T1w.nii.gz"]
    assert names({"all": {"acquisition": None}}) == ["sub-01_T1w.nii.gz"]


# ------------------------------------------------------------------------ methods and device
def test_bias_method_cnn_unavailable_exits_64(tiny, tmp_path):
    from qmri_bids.workflows.bias_cnn import cnn_available

    if cnn_available()[0]:
        pytest.skip("the CNN is available in this installation")
    for method in ("cnn", "both"):
        code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                            "--bias-method", method, "--skip-bids-validation"])
        assert code == EXIT_USAGE
        assert "not available" in err
        assert "--bias-method n4" in err


def test_device_cuda_without_gpu_exits_64(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here")
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--device", "cuda", "--skip-bids-validation"])
    assert code == EXIT_USAGE
    assert "CUDA" in err


def test_device_cpu_is_recorded(tiny, tmp_path):
    config = _config([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--device", "cpu"])
    assert config.device == "cpu"


# ------------------------------------------------------------------------ folders and paths
def test_missing_bids_dir_exits_66(tmp_path):
    code, _, err = cli([tmp_path / "absent", tmp_path / "out", "participant", "-w",
                        tmp_path / "w"])
    assert code == EXIT_MISSING_INPUT
    assert "absent" in err


def test_work_dir_inside_bids_dir_exits_64(tmp_path, tiny):
    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    before = sorted(p.name for p in ds.iterdir())
    code, _, err = cli([ds, tmp_path / "out", "participant", "-w", ds / "work"])
    assert code == EXIT_USAGE
    assert "--work-dir" in err
    assert sorted(p.name for p in ds.iterdir()) == before


def test_work_dir_equal_to_bids_dir_exits_64(tmp_path, tiny):
    code, _, _err = cli([tiny, tmp_path / "out", "participant", "-w", tiny])
    assert code == EXIT_USAGE


def test_output_dir_inside_bids_dir_exits_64(tmp_path, tiny):
    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    for out in (ds, ds / "out", ds / "sub-01" / "out"):
        code, _, err = cli([ds, out, "participant", "-w", tmp_path / "w"])
        assert code == EXIT_USAGE, out
        assert "inside bids_dir" in err
    assert not (ds / "out").exists()


def test_output_under_bids_derivatives_is_accepted(tmp_path, tiny):
    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    config = _config([ds, ds / "derivatives" / "qmri-bids", "participant", "-w", tmp_path / "w"])
    assert config.output_dir == (ds / "derivatives" / "qmri-bids").resolve()


def test_work_and_output_nested_exits_64(tmp_path, tiny):
    code, _, _err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "out" / "work"])
    assert code == EXIT_USAGE


def test_output_dir_not_creatable_exits_73(tmp_path, tiny):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so nothing can be created below it\n")
    code, _, err = cli([tiny, blocker / "out", "participant", "-w", tmp_path / "w"])
    assert code == EXIT_CANNOT_WRITE
    assert "cannot be written" in err


def test_config_json_round_trip(tiny, tmp_path):
    config = _config([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--participant-label", "sub-02", "--mem", "4G", "--nprocs", "2"])
    payload = json.loads(config.to_json())
    assert payload["participant_labels"] == ["02"]
    assert payload["mem_gb"] == 4.0
    assert payload["bids_dir"] == str(tiny.resolve())
    assert payload["bias_methods"] == ["cnn"]  # the default method


# ---------------------------------------------------------------------- fMRIPrep-style options
def test_help_shows_each_default_once_and_only_real_ones(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: cnn)" in text  # a real default is still shown
    assert text.count("<work-dir>/models") == 1
    for flag in ("--reports-only", "--boilerplate-only", "--clean-workdir",
                 "--resource-monitor", "--config-file", "--notrack", "--roi-dseg"):
        assert flag in text


@pytest.mark.parametrize("flag", ["--reports-only", "--boilerplate-only", "--clean-workdir",
                                  "--resource-monitor", "--notrack"])
def test_fmriprep_flags_are_accepted(tiny, tmp_path, flag):
    args = build_parser().parse_args([str(tiny), str(tmp_path / "o"), "participant", flag])
    assert getattr(args, flag.lstrip("-").replace("-", "_")) is True


def test_config_file_supplies_defaults_and_flags_win(tiny, tmp_path):
    from qmri_bids.cli.run import _with_saved_config

    saved = _config([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                     "--participant-label", "02", "--bias-method", "both", "--nprocs", "2",
                     "--qmri-estimator", "nlls"])
    path = _write(tmp_path / "config.json", saved.to_json())
    argv = [str(tiny), str(tmp_path / "out2"), "participant", "--config-file", str(path),
            "--bias-method", "n4"]
    parser = build_parser()
    from qmri_bids.cli.run import build_config

    config = build_config(_with_saved_config(parser, argv, path))
    assert config.participant_labels == ["02"]  # from the file
    assert config.nprocs == 2 and config.qmri_estimators == ("nn", "nlls")
    assert config.bias_methods == ("n4",)  # the command line wins
    assert config.output_dir == (tmp_path / "out2").resolve()  # positionals are this command's


def test_config_file_unknown_key_exits_64(tiny, tmp_path):
    path = _write(tmp_path / "config.json", json.dumps({"bids_dir": str(tiny), "bogus": 1}))
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--config-file", path])
    assert code == EXIT_USAGE and "config.json" in err and "bogus" in err


def test_config_file_missing_exits_66(tiny, tmp_path):
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--config-file", tmp_path / "nope.json"])
    assert code == EXIT_MISSING_INPUT and "nope.json" in err


def test_roi_dseg_missing_exits_66(tiny, tmp_path):
    code, _, err = cli([tiny, tmp_path / "out", "participant", "-w", tmp_path / "w",
                        "--roi-dseg", tmp_path / "none_dseg.nii.gz"])
    assert code == EXIT_MISSING_INPUT and "none_dseg.nii.gz" in err


def test_reports_only_without_derivatives_exits_66(tiny, tmp_path):
    code, _, err = cli([tiny, tmp_path / "empty", "participant", "-w", tmp_path / "w",
                        "--reports-only"])
    assert code == EXIT_MISSING_INPUT and "run the participant level first" in err


def test_boilerplate_only_writes_methods_and_runs_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli([tiny, out, "participant", "-w", tmp_path / "w",
                             "--bias-method", "n4", "--boilerplate-only",
                             "--skip-bids-validation"])
    assert code == EXIT_OK, err
    text = (out / "logs" / "CITATION.md").read_text()
    assert "N4" in text and (out / "logs" / "CITATION.bib").is_file()
    assert not list(out.glob("sub-*/anat/*.nii.gz"))  # nothing was computed
    assert not list((tmp_path / "w").rglob("result_*.pklz"))  # no node ran
