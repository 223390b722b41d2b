"""Bias tests run torch single-threaded: on the shared, oversubscribed CI/dev CPUs two OpenMP
threads were measured ~9x slower than one (workers spin-waiting for a busy core)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch() -> None:
    torch.set_num_threads(1)
