"""``qmri-bids train bias|qmri``: the training sub-workflows run end to end on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmri_bids.cli.run import main


def test_train_bias_writes_a_loadable_model_and_resumes(tmp_path: Path) -> None:
    from qmri_bids.bias.weights import load_model

    out = tmp_path / "tiny.safetensors"
    work = tmp_path / "work"
    argv = ["train", "bias", str(out), "--steps", "20", "--n-volumes", "4", "--n-images", "16",
            "-w", str(work)]
    assert main(argv) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["steps"] == 20 and card["training"]["seed"] == 0
    assert set(card["validation"]) >= {"dead_leaves_consistency_mae", "photos_consistency_mae"}
    model = load_model(out)  # sha256 checked against the card
    assert model.sha256 == card["sha256"]
    state = json.loads((work / "checkpoints" / "state.json").read_text())
    assert state["step"] == 20
    # More steps with the same work dir resume from the checkpoint instead of starting over.
    assert main([*argv[:3], "--steps", "30", "--n-volumes", "4", "--n-images", "16",
                 "-w", str(work)]) == 0
    history = json.loads((work / "checkpoints" / "state.json").read_text())["history"]
    assert history[-1]["step"] == 30
    assert json.loads(out.with_suffix(".json").read_text())["training"]["steps"] == 30


def _vfa_sidecars(folder: Path, flips: tuple[float, float]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, flip in enumerate(flips, start=1):
        path = folder / f"sub-x_flip-{index}_VFA.json"
        path.write_text(json.dumps({"FlipAngle": flip, "RepetitionTimeExcitation": 0.015}))
        paths.append(path)
    return paths


def test_train_qmri_reuses_shipped_model_and_trains_a_new_protocol(tmp_path: Path, capsys
                                                                   ) -> None:
    from qmri_bids.qmri.model_store import load_estimator

    shipped = _vfa_sidecars(tmp_path / "shipped", (3.0, 20.0))
    models = tmp_path / "models"
    base = ["train", "qmri", "--collection", "VFA", "--model-dir", str(models), "-w",
            str(tmp_path / "w")]
    assert main([*base, "--protocol", *map(str, shipped)]) == 0
    assert "exists" in capsys.readouterr().out
    assert not list(models.glob("*.safetensors"))

    other = _vfa_sidecars(tmp_path / "other", (4.0, 18.0))
    assert main([*base, "--protocol", *map(str, other), "--budget-s", "8"]) == 0
    (weights,) = models.glob("vfa-*.safetensors")
    _, card = load_estimator(weights)
    assert card["protocol"]["flip_angle_deg"] == [4.0, 18.0]
    assert card["loss"] == "crb"


def test_train_qmri_bad_protocol_is_a_clear_error(tmp_path: Path, capsys) -> None:
    same = _vfa_sidecars(tmp_path / "same", (10.0, 10.0))
    code = main(["train", "qmri", "--collection", "VFA", "--protocol", *map(str, same),
                 "--model-dir", str(tmp_path / "m"), "-w", str(tmp_path / "w")])
    assert code == 65
    assert "FlipAngle" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train"], ["train", "nonsense"],
                                  ["train", "bias", "model.pt"]])
def test_train_usage_errors(argv, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 64


def test_train_help_explains_every_option(capsys) -> None:
    expected = {"bias": ("seed of the training content", "torch CPU threads"),
                "qmri": ("seed of the simulated training signals", "torch CPU threads",
                         "divided by its Cramér-Rao", "plain squared error")}
    for what, phrases in expected.items():
        with pytest.raises(SystemExit):
            main(["train", what, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for phrase in phrases:
            assert phrase in text, (what, phrase)
