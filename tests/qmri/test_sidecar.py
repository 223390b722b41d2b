"""The one sidecar-field validator: types, ranges, arrays, booleans, messages with file and field."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from qmri_bids.errors import BadDataError
from qmri_bids.qmri import sidecar


def _member(**metadata):
    return SimpleNamespace(path="/data/sub-01_inv-2_IRT1.nii.gz", entities={}, metadata=metadata)


@pytest.mark.parametrize("key, value, message", [
    ("InversionTime", "0.5", "field 'InversionTime' must be a number, got str '0.5'"),
    ("InversionTime", [0.1, 0.5], "must be a number, got list [0.1, 0.5]"),
    ("InversionTime", 0, "InversionTime = 0 is outside (0, 30]"),
    ("InversionTime", 900, "900 ms is 0.9"),
    ("FlipAngle", "20", "must be a number, got str '20'"),
    ("FlipAngle", 200, "FlipAngle = 200 is outside (0, 180]"),
    ("FlipAngle", True, "must be a number, got bool True"),
    ("EchoTime", float("nan"), "field 'EchoTime' is not finite"),
    ("MTState", "on", "field 'MTState' must be true or false, got str 'on'"),
])
def test_problems_name_the_field(key, value, message):
    assert message in sidecar.field_problem(key, value)


@pytest.mark.parametrize("key, value", [("InversionTime", 0.5), ("InversionTime", [0.5]),
                                        ("FlipAngle", 180), ("FlipAngle", 20.5),
                                        ("MTState", False), ("PhilipsScaleSlope", 0.3)])
def test_usable_values(key, value):
    assert sidecar.field_problem(key, value) is None


def test_arrays_only_where_allowed_and_checked_element_by_element():
    schedule = [10.0, 30.0, 5.0]
    assert "must be a number" in sidecar.field_problem("FlipAngle", schedule)
    assert sidecar.field_problem("FlipAngle", schedule, array=True) is None
    assert "FlipAngle = 0 is outside" in sidecar.field_problem("FlipAngle", [10.0, 0.0],
                                                               array=True)


def test_get_number_names_file_and_field():
    assert sidecar.get_number(_member(InversionTime=[0.5]), "InversionTime") == 0.5
    with pytest.raises(BadDataError, match=r"^sub-01_inv-2_IRT1.nii.gz: required field "
                                           r"'InversionTime' is missing"):
        sidecar.get_number(_member(), "InversionTime")
    with pytest.raises(BadDataError, match=r"^sub-01_inv-2_IRT1.nii.gz: field 'InversionTime' "
                                           r"must be a number"):
        sidecar.get_number(_member(InversionTime="0.5"), "InversionTime")
    assert sidecar.get_number(_member(), "InversionTime", required=False) is None


def test_repetition_time_preference_and_mt_state():
    m = _member(RepetitionTime=2.0, RepetitionTimeExcitation=0.01)
    assert sidecar.repetition_time(m, True, True) == 0.01
    assert sidecar.repetition_time(m, False, True) == 2.0
    with pytest.raises(BadDataError, match="'RepetitionTimeExcitation' \\(or 'RepetitionTime'\\)"):
        sidecar.repetition_time(_member(), True, True)
    assert sidecar.mt_state(SimpleNamespace(path="x_MTS.nii", entities={"mt": "on"},
                                            metadata={})) is True
    assert sidecar.mt_state(_member(MTState=False)) is False


def test_variation_and_member_counts():
    members = [_member(), _member(), _member()]
    with pytest.raises(BadDataError, match="for all members"):
        sidecar.require_variation(members, "FlipAngle", np.array([5.0, 5.0, 5.0]))
    with pytest.raises(BadDataError, match="appears in several members"):
        sidecar.require_variation(members, "FlipAngle", np.array([5.0, 5.0, 6.0]))
    with pytest.raises(BadDataError, match="needs exactly 2 members, got 3"):
        sidecar.require_members(members, 2, "MP2RAGE", exactly=True)
