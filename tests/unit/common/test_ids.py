"""The one id rule (services/common/ids.py), shared by every service and the gateway."""

from __future__ import annotations

import time

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


@pytest.mark.parametrize("skew_s", [600.0, 60.0], ids=["the-constant", "the-constant-changed"])
def test_one_skew_rule_for_events_the_gateway_and_audit_records(monkeypatch, skew_s):
    """ledger35: AppendAudit's refusal of a record dated ahead (e5ddad35, attack34) and the
    gateway's of an event time restated check_ts's rule (the bound, the words); now the
    three are one function: the same bound MAX_FUTURE_SKEW_S ahead of the clock, the same
    words, and only the earliest time differs (an audit record's from 1970-01-01). With
    the one constant changed, all three follow (before: the audit servicer and the gateway
    kept their own copies of it, and went on accepting 10 minutes ahead)."""
    from datetime import UTC, datetime

    from hearth.privacy.v1 import privacy_pb2 as ppb
    from services.common import ids
    from services.common.identity import Principal
    from services.privacy.audit.servicer import record_from_pb

    monkeypatch.setattr(ids, "MAX_FUTURE_SKEW_S", skew_s)
    MAX_FUTURE_SKEW_S = skew_s
    now = time.time()
    caller = Principal("svc:clustering", Role.SERVICE)
    words = f"{int(MAX_FUTURE_SKEW_S // 60)} minutes from now (the server's clock)"

    def audit(ts: float):
        record = ppb.AuditRecord(event_type="ingest", resource="household:h", outcome="success")
        record.ts.seconds, record.ts.nanos = int(ts // 1), 0
        return record_from_pb(record, 0, caller, now).ts

    def gateway(ts: float):
        return TypeAdapter(models.Timestamp).validate_python(
            datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")).timestamp()

    within, beyond = int(now + MAX_FUTURE_SKEW_S - 5), int(now + MAX_FUTURE_SKEW_S + 5)
    assert check_ts(within, "ts", now) == audit(within) == gateway(within) == within
    with pytest.raises(InvalidArgument) as events:
        check_ts(beyond, "events[0].ts", now)
    with pytest.raises(InvalidArgument) as records:
        audit(beyond)
    with pytest.raises(ValidationError) as http:
        gateway(beyond)
    assert events.value.message == f"must lie between 2000-01-01 and {words}"
    assert records.value.message == f"must lie between 1970-01-01 and {words}"
    assert records.value.field == "records[0].ts"
    assert f"must lie between 2000-01-01 and {words}" in str(http.value)
    # The earliest time is each one's: an audit record of 1990 is one, an event of 1990 is not.
    assert audit(631152000) == 631152000.0
    with pytest.raises(InvalidArgument, match="between 1970-01-01"):
        audit(-1)
    with pytest.raises(InvalidArgument, match="between 2000-01-01"):
        check_ts(631152000, "ts", now)
