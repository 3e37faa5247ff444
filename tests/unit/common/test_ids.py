"""The one id rule (services/common/ids.py), shared by every service and the gateway."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from gateway import models
from services.common.errors import InvalidArgument
from services.common.ids import (
    Role, check_id, check_principal_id, check_ts, is_id, valid_principal_id,
)

GOOD = ["a", "acct-1", "A.b_c:d-e", "9" * 128]
BAD = ["", "-a", ".a", "a b", "a/b", "a@b", "é", "a" * 129, "acct\n", "acct\r\n", "\nacct", "acct\x00", None, 7]


@pytest.mark.parametrize("value", GOOD)
def test_good_ids_pass_everywhere(value):
    assert check_id(value, "account_id") == value
    assert TypeAdapter(models.Id).validate_python(value) == value


@pytest.mark.parametrize("value", BAD)
def test_bad_ids_are_refused_naming_the_field(value):
    with pytest.raises(InvalidArgument) as err:
        check_id(value, "events[3].account_id")
    assert err.value.field == "events[3].account_id"
    if isinstance(value, str):
        with pytest.raises(ValidationError):
            TypeAdapter(models.Id).validate_python(value)


def test_a_trailing_newline_is_not_an_id():
    # Regression: "^...$" with re.match accepted "acct\n", a second spelling of "acct".
    assert not is_id("acct\n")
    assert not valid_principal_id("alice@example.com\n")
    with pytest.raises(InvalidArgument):
        check_principal_id("svc:privacy\n", "principal")


@given(st.text(max_size=140))
def test_service_and_gateway_agree(value):
    try:
        TypeAdapter(models.Id).validate_python(value)
        gateway_ok = True
    except ValidationError:
        gateway_ok = False
    assert is_id(value) is gateway_ok


def test_principal_ids_also_allow_at():
    assert check_principal_id("alice@example.com", "principal") == "alice@example.com"
    assert not is_id("alice@example.com")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "1700000000", 100.0, 4e9])
def test_bad_timestamps_are_refused(value):
    with pytest.raises(InvalidArgument, match="ts"):
        check_ts(value, "ts", now=1.7e9)


def test_roles_are_the_metadata_values():
    assert [r.value for r in Role] == ["admin", "analyst", "data_scientist", "privacy_officer", "service"]
    assert f"{Role.ADMIN}" == "admin"
