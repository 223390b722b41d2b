"""Running ``bids-validator`` on the selected participants only (as fMRIPrep does).

Subjects that were not selected are listed in the validator's ``ignoredFiles`` configuration, so
that problems in other subjects never stop a run. Its report goes to
``<output_dir>/logs/``. Without the validator installed the run warns and goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from qmri_bids.errors import ValidationError
from qmri_bids.runner import kill_with_parent

LOGGER = logging.getLogger("qmri_bids.validation")
VALIDATOR_TIMEOUT_S = 600


def _validator_config(bids_dir: Path, participants: list[str], path: Path) -> Path:
    """A validator config that ignores every subject not selected (fMRIPrep's approach)."""
    others = [p.name for p in bids_dir.glob("sub-*") if p.name[4:] not in participants]
    config: dict = {"ignoredFiles": [f"/{name}/**" for name in others]}
    user = bids_dir / ".bids-validator-config.json"
    if user.is_file():
        try:
            extra = json.loads(user.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            LOGGER.warning("%s is not valid JSON (%s): ignored", user, exc)
        else:
            ignored = extra.get("ignoredFiles", []) if isinstance(extra, dict) else None
            if not isinstance(ignored, list):
                LOGGER.warning("%s is not a bids-validator configuration (an object whose "
                               "ignoredFiles is a list): ignored", user)
            else:
                config = {**extra, "ignoredFiles": ignored + config["ignoredFiles"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def validate_dataset(bids_dir: Path, participants: list[str], work_dir: Path, output_dir: Path,
                     run_id: str) -> None:
    """Raise ``ValidationError`` (exit 16) when bids-validator reports errors."""
    exe = shutil.which("bids-validator")
    if exe is None:
        LOGGER.warning("bids-validator is not installed: the dataset is not validated "
                       "(install it with 'npm install -g bids-validator')")
        return
    config = _validator_config(bids_dir, participants,
                               work_dir / "validation" / f"validator-config_{run_id}.json")
    cmd = [exe, str(bids_dir), "--json", "--ignoreSubjectConsistency", "-c", str(config)]
    env = {**os.environ, "NO_COLOR": "1"}
    try:
        # errors="replace": the report quotes file names, which need not be UTF-8
        # kill_with_parent: the validator must not outlive a qmri-bids killed with -9
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              timeout=VALIDATOR_TIMEOUT_S, env=env, check=False,
                              preexec_fn=kill_with_parent)
    except subprocess.TimeoutExpired:
        LOGGER.warning("bids-validator did not finish in %d s: validation skipped",
                       VALIDATOR_TIMEOUT_S)
        return
    except OSError as exc:
        LOGGER.warning("bids-validator could not be run (%s): validation skipped",
                       exc.strerror or exc)
        return
    log_path = output_dir / "logs" / f"bids-validator_{run_id}.json"
    from qmri_bids.bids.derivatives import atomic_write_text

    atomic_write_text(log_path, proc.stdout or proc.stderr)
    try:
        report = json.loads(proc.stdout)
        errors = report.get("issues", {}).get("errors", []) if isinstance(report, dict) else []
    except json.JSONDecodeError:
        errors = [{"reason": (proc.stderr or proc.stdout).strip()[:500]}] if proc.returncode else []
    errors = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    if errors:
        lines = []
        for err in errors[:10]:
            files = [(f.get("file") or {}).get("relativePath", "")
                     for f in err.get("files", []) if isinstance(f, dict)][:3]
            lines.append(f"{err.get('key', 'ERROR')}: {err.get('reason', '')} "
                         f"{' '.join(f for f in files if f)}".strip())
        raise ValidationError(
            f"bids-validator found {len(errors)} error(s) in {bids_dir} (full report: "
            f"{log_path}; use --skip-bids-validation to go on anyway):\n  " + "\n  ".join(lines)
        )
    LOGGER.info("bids-validator: no errors (report: %s)", log_path)
