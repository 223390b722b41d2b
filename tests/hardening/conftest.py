"""Fixtures of the hardening tests: the foundation suite's isolated HOME and working folder."""

from __future__ import annotations

from tests.foundation.conftest import isolated_env  # noqa: F401 - a fixture, used by name
