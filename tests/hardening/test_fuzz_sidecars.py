"""Seeded fuzzing of the sidecars (see ``sidecar_fuzz``): a bounded number of random cases,
plus the cases of the sidecar-validator rows of issue 13 (IRT1 ``InversionTime`` as a string or
a list, VFA ``FlipAngle`` as a string, an IRT1 member without ``InversionTime``). Every case
must end with exit 0 or 65, no traceback, and with 65 the corrupted file named. More cases:
``python benchmarks/fuzz_sidecars.py --cases 500``."""

from __future__ import annotations

from pathlib import Path

import pytest

from .sidecar_fuzz import Case, Outcome, make_base_dataset, make_cases, run_case

SEED = 20260113
N_RANDOM = 12
TARGETED = [
    Case("sub-01/anat/sub-01_inv-3_IRT1.json", "InversionTime", "numeric-string"),
    Case("sub-01/anat/sub-01_inv-3_IRT1.json", "InversionTime", "list"),
    Case("sub-01/anat/sub-01_flip-2_VFA.json", "FlipAngle", "numeric-string"),
    Case("sub-01/anat/sub-01_inv-3_IRT1.json", "InversionTime", "missing"),
    Case("sub-01/fmap/sub-01_TB1map.json", "IntendedFor", "null"),
    Case("sub-01/anat/sub-01_part-mag_MRF.json", None, "syntax-error"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base_dataset(tmp_path_factory.mktemp("fuzz") / "base")


@pytest.fixture(scope="module")
def baseline(base, tmp_path_factory) -> Outcome:
    return run_case(base, tmp_path_factory.mktemp("fuzz_baseline"), None)


def test_base_dataset_is_clean(baseline):
    """Every collection of the base dataset is usable (else the cases test less)."""
    assert baseline.code == 0 and not baseline.problems(), baseline.stderr[-3000:]


def test_draw_is_seeded(base):
    assert make_cases(base, SEED, N_RANDOM) == make_cases(base, SEED, N_RANDOM)
    assert make_cases(base, SEED, N_RANDOM) != make_cases(base, SEED + 1, N_RANDOM)


# By index: the random cases are drawn from the base dataset, which exists only at run time
# (the failure message names the case).
@pytest.mark.parametrize("index", range(len(TARGETED) + N_RANDOM))
def test_fuzz_case(base, baseline, tmp_path, index):
    case = (TARGETED + make_cases(base, SEED, N_RANDOM))[index]
    outcome = run_case(base, tmp_path, case)
    assert not outcome.problems(baseline), (case.id, outcome.code, outcome.stderr[-3000:])
