"""Validation of an output folder with the schema-based BIDS validator (``bids-validator-deno``).

The PyPI package ``bids-validator-deno`` bundles the validator and its schema, and its
dependency ``deno`` (also from PyPI) is the runtime: nothing is downloaded when it runs (a test
runs it in a network namespace without network). Derivatives are validated as such
(``--datasetTypes derivative``); the JSON report is parsed into :class:`ValidationResult`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VALIDATOR = "bids-validator-deno"


@dataclass(frozen=True)
class Issue:
    """One finding: its code (``SIDECAR_KEY_REQUIRED``...), sub-code (the key), severity,
    the file (dataset-relative, leading ``/``) and the validator's explanation."""

    code: str
    severity: str
    location: str
    sub_code: str = ""
    message: str = ""


@dataclass
class ValidationResult:
    """What the validator said about one folder. ``available`` is False (and ``reason`` says
    why) when the validator is not installed or could not run; then there are no issues."""

    path: Path
    available: bool
    issues: list[Issue] = field(default_factory=list)
    returncode: int | None = None
    version: str = ""
    reason: str = ""
    command: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return self.available and not self.errors

    def counts(self, severity: str = "error") -> Counter:
        """``(code, sub_code) -> number of files`` for one severity."""
        return Counter((i.code, i.sub_code) for i in self.issues if i.severity == severity)

    def summary(self) -> str:
        """A few lines for a log or a test failure: counts per code and up to three files."""
        if not self.available:
            return f"{VALIDATOR} did not run on {self.path}: {self.reason}"
        lines = [(f"{VALIDATOR} {self.version}: {len(self.errors)} error(s), "
                  f"{len(self.warnings)} warning(s) in {self.path}")]
        for severity in ("error", "warning"):
            for (code, sub), n in sorted(self.counts(severity).items()):
                where = [i.location for i in self.issues
                         if (i.code, i.sub_code, i.severity) == (code, sub, severity)][:3]
                lines.append(f"  {severity} {code}{f' ({sub})' if sub else ''} x{n}: "
                             + ", ".join(where))
        return "\n".join(lines)


def validator_command() -> list[str] | None:
    """How to start the validator: its console script, else this Python's copy of it."""
    exe = shutil.which(VALIDATOR)
    if exe:
        return [exe]
    try:
        import bids_validator_deno  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-c", "import bids_validator_deno; bids_validator_deno.cli()"]


def validate_derivatives(output_dir: Path, *, timeout_s: float = 600.0,
                         extra_args: tuple[str, ...] = ()) -> ValidationResult:
    """Validate ``output_dir`` (a derivatives dataset) and parse what the validator reports.

    Never raises for validator problems: a missing validator, a crash or a timeout give
    ``available=False`` with the reason, so a caller can log it and carry on.
    """
    path = Path(output_dir)
    base = validator_command()
    if base is None:
        return ValidationResult(path, False, reason=f"{VALIDATOR} is not installed "
                                "(pip install bids-validator-deno)")
    cmd = [*base, str(path), "--format", "json", "--datasetTypes", "derivative", *extra_args]
    env = dict(os.environ)
    # deno caches compiled code under DENO_DIR (default ~/.cache/deno); keep it out of a
    # read-only or shared HOME.
    env.setdefault("DENO_DIR", str(Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                   / "qmri-bids-deno"))
    env["NO_COLOR"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              check=False, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ValidationResult(path, False, reason=f"{VALIDATOR} could not run: {exc}",
                                command=cmd)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return ValidationResult(path, False, returncode=proc.returncode, command=cmd,
                                reason=f"{VALIDATOR} printed no JSON report (exit "
                                       f"{proc.returncode}): {' | '.join(tail)}")
    return ValidationResult(path, True, issues=parse_issues(report),
                            returncode=proc.returncode, command=cmd,
                            version=_version())


def parse_issues(report: dict[str, Any]) -> list[Issue]:
    """The issues of a ``--format json`` report (schema validator 2.x/3.x layout)."""
    issues = report.get("issues", {})
    items = issues.get("issues", []) if isinstance(issues, dict) else issues
    out = []
    for item in items or []:
        out.append(Issue(code=str(item.get("code", "")),
                         severity=str(item.get("severity", "error")),
                         location=str(item.get("location", "")),
                         sub_code=str(item.get("subCode", "") or ""),
                         message=str(item.get("issueMessage", "") or "").strip()))
    return out


def _version() -> str:
    try:
        from importlib import metadata

        return metadata.version(VALIDATOR)
    except Exception:  # noqa: BLE001 - the version is information only
        return ""
