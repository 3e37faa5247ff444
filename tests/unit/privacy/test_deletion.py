from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.erasure import ErasureScope
from services.common.errors import InvalidArgument
from services.common.ids import is_id
from services.privacy.deletion.domain import (
    DEFAULT_SERVICES,
    InvalidTransition,
    JobState,
    RetryPolicy,
    ScopeKind,
    ServiceStatus,
    backoff_schedule,
    build_receipt,
    confirm_service,
    due_services,
    fail_service,
    job_from_dict,
    job_to_dict,
    new_job,
    retry_delay,
    start_job,
)
from services.privacy.deletion.receipts import EMPTY_IDS_DIGEST, ServiceDeletion, ids_digest
from tests.unit.privacy.factories import T0

# --------------------------------------------------------------------------- scopes

FIELDS = {"device_id": "tv-1", "person_id": "p2", "start": T0, "end": T0 + timedelta(days=1)}
ACCEPTED = {  # kind -> the field sets a valid scope of that kind may carry
    "device": [{"device_id"}], "person": [{"person_id"}], "household": [set()],
    "window": [{"start"}, {"end"}, {"start", "end"}],
}


@given(st.sampled_from(sorted(ACCEPTED)), st.sets(st.sampled_from(sorted(FIELDS))))
def test_scope_accepts_exactly_the_fields_its_kind_needs(kind, present):
    kwargs = {name: FIELDS[name] for name in present}
    if present in ACCEPTED[kind]:
        scope = ErasureScope("acct-1", kind, **kwargs)
        assert ErasureScope.from_dict(scope.to_dict()) == scope
        assert set(scope.to_dict()) == {"kind", "account_id"} | present
    else:
        with pytest.raises(ValueError) as err:
            ErasureScope("acct-1", kind, **kwargs)
        assert str(err.value).split(":")[0] in FIELDS  # the message names a field


@given(st.one_of(st.text(max_size=140), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,130}", fullmatch=True)))
def test_ids_are_validated(value):
    ok = is_id(value)  # the one id rule (services/common/ids.py)
    if ok:
        assert ErasureScope("acct", "device", device_id=value).device_id == value
    else:
        with pytest.raises(ValueError, match="device_id"):
            ErasureScope("acct", "device", device_id=value)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "galaxy", "account_id": "a"}, "kind"),
    ({"kind": "household", "account_id": ""}, "account_id"),
    ({"kind": "household", "account_id": " a"}, "account_id"),
    ({"kind": "window", "account_id": "a", "start": T0, "end": T0}, "end"),
    ({"kind": "window", "account_id": "a"}, "start"),
    ({"kind": "window", "account_id": "a", "start": T0.replace(tzinfo=None),
      "end": T0 + timedelta(1)}, "start"),
])
def test_invalid_scopes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ErasureScope(**kwargs)
    with pytest.raises(ValueError, match="scope.color: unknown"):
        ErasureScope.from_dict({"kind": "household", "account_id": "a", "color": "red"})


def test_scope_coverage_semantics():
    window = ErasureScope("a", "window", start=T0, end=T0 + timedelta(hours=1))
    assert window.covers("tv", None, T0) and not window.covers("tv", None, T0 + timedelta(hours=1))
    assert not window.covers("tv", None, T0 - timedelta(microseconds=1))
    open_start = ErasureScope("a", "window", end=T0)
    assert open_start.covers("tv", None, T0 - timedelta(days=9999)) and not open_start.covers("tv", None, T0)
    assert ErasureScope("a", "window", start=T0).covers("tv", None, T0 + timedelta(days=9999))
    assert ErasureScope("a", "device", device_id="tv").covers("tv", "p1", T0)
    assert not ErasureScope("a", "person", person_id="p2").covers("tv", "p1", T0)
    assert ErasureScope("a", ScopeKind.HOUSEHOLD).covers("x", None, T0)


# --------------------------------------------------------------------------- retries


def test_backoff_grows_caps_and_jitters_downwards():
    policy = RetryPolicy(base_delay=timedelta(seconds=1), multiplier=2, max_delay=timedelta(seconds=60),
                         max_attempts=10, jitter=0.2)
    sched = backoff_schedule(policy, key="job/clustering")
    assert len(sched) == 9
    for attempt, delay in enumerate(sched, start=1):
        nominal = min(60.0, 2.0 ** (attempt - 1))
        assert 0.8 * nominal <= delay.total_seconds() <= nominal
    assert backoff_schedule(policy, "k") == backoff_schedule(policy, "k")  # deterministic
    assert backoff_schedule(policy, "k1") != backoff_schedule(policy, "k2")  # spread
    no_jitter = RetryPolicy(jitter=0.0, max_attempts=4)
    assert [d.total_seconds() for d in backoff_schedule(no_jitter)] == [1.0, 2.0, 4.0]
    assert retry_delay(policy, 10_000) <= policy.max_delay  # no overflow
    with pytest.raises(ValueError, match="attempt"):
        retry_delay(policy, 0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"base_delay": timedelta(0)}, "base_delay"),
    ({"max_delay": timedelta(milliseconds=1)}, "max_delay"),
    ({"multiplier": 0.5}, "multiplier"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"jitter": 1.0}, "jitter"),
])
def test_invalid_policies(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)


# --------------------------------------------------------------------------- state machine


def running_job(services=DEFAULT_SERVICES):
    job = new_job("job-1", ErasureScope("acct", "person", person_id="p1"), "olivia",
                  "privacy_officer", T0, services)
    return start_job(job, T0)


def result(n: int) -> ServiceDeletion:
    ids = [f"r{i}" for i in range(n)]
    return ServiceDeletion(n, ids_digest(ids))


def test_happy_path_completes_after_all_confirmations():
    job = running_job()
    assert job.state is JobState.RUNNING and due_services(job, T0) == sorted(DEFAULT_SERVICES)
    for i, svc in enumerate(DEFAULT_SERVICES):
        assert job.state is JobState.RUNNING
        job = confirm_service(job, svc, result(i), T0 + timedelta(seconds=i + 1))
    assert job.state is JobState.COMPLETED and job.completed_at == T0 + timedelta(seconds=4)
    receipt = build_receipt(job, "r-1", "kid")
    assert receipt.total_count == 0 + 1 + 2 + 3
    assert receipt.services["feedback"] == result(2)
    assert receipt.scope == {"kind": "person", "account_id": "acct", "person_id": "p1"}
    assert job_from_dict(job_to_dict(job)) == job


def test_retry_then_success():
    policy = RetryPolicy(jitter=0.0)
    job = running_job(("clustering", "feedback"))
    job = confirm_service(job, "feedback", result(1), T0)
    job = fail_service(job, "clustering", "UNAVAILABLE", T0, policy)
    p = job.services["clustering"]
    assert (p.status, p.attempts, p.next_attempt_at) == (ServiceStatus.RETRYING, 1, T0 + timedelta(seconds=1))
    assert due_services(job, T0) == [] and due_services(job, T0 + timedelta(seconds=1)) == ["clustering"]
    job = fail_service(job, "clustering", "UNAVAILABLE", T0 + timedelta(seconds=1), policy)
    assert job.services["clustering"].next_attempt_at == T0 + timedelta(seconds=3)
    assert job_from_dict(job_to_dict(job)) == job
    job = confirm_service(job, "clustering", result(5), T0 + timedelta(seconds=3))
    assert job.state is JobState.COMPLETED


def test_exhausted_retries_and_fatal_errors_fail_the_job():
    policy = RetryPolicy(max_attempts=3)
    job = running_job(("clustering", "feedback"))
    for i in range(2):
        job = fail_service(job, "clustering", "timeout", T0 + timedelta(minutes=i), policy)
        assert job.state is JobState.RUNNING
    job = fail_service(job, "clustering", "timeout", T0 + timedelta(minutes=5), policy)
    assert job.state is JobState.FAILED and job.services["clustering"].status is ServiceStatus.FAILED
    assert due_services(job, T0 + timedelta(days=1)) == []
    fatal = fail_service(running_job(), "feedback", "INVALID_ARGUMENT", T0, retryable=False)
    assert fatal.state is JobState.FAILED and fatal.services["feedback"].attempts == 1


def test_a_wait_for_another_job_is_no_failed_attempt_and_never_exhausts_the_attempts():
    # review34 N6: a device step waiting for its household's erasure is tried again when
    # that job is next due; the household job's own attempts bound it, not this one's.
    policy = RetryPolicy(max_attempts=2)
    job = running_job(("clustering", "feedback"))
    for i in range(5):
        job = fail_service(job, "clustering", "waiting for household job j-h", T0 + timedelta(minutes=i), policy,
                           wait_until=T0 + timedelta(minutes=i, seconds=30), waiting_for="j-h")
    p = job.services["clustering"]
    assert job.state is JobState.RUNNING and p.attempts == 0 and p.status is ServiceStatus.RETRYING
    assert p.next_attempt_at == T0 + timedelta(minutes=4, seconds=30) and "j-h" in p.last_error
    assert due_services(job, T0 + timedelta(minutes=4, seconds=29)) == ["feedback"]
    # a wait never schedules into the past
    past = fail_service(job, "clustering", "waiting", T0 + timedelta(minutes=9), policy, wait_until=T0,
                        waiting_for="j-h")
    assert past.services["clustering"].next_attempt_at == T0 + timedelta(minutes=9)
    assert job_from_dict(job_to_dict(job)) == job


def test_a_waiting_step_names_the_job_it_waits_for_until_its_next_outcome():
    # session 36: the overdue gauge tells a job waiting for its household's job apart from
    # one stuck itself by this mark, stored only while set (store.WAITING_PATTERN).
    policy = RetryPolicy(max_attempts=3)
    job = running_job(("clustering", "feedback"))
    assert "waiting_for" not in job_to_dict(job)["services"]["clustering"]
    waiting = fail_service(job, "clustering", "waiting for household job j-h", T0, policy,
                           wait_until=T0 + timedelta(seconds=30), waiting_for="j-h")
    assert waiting.services["clustering"].waiting_for == "j-h"
    assert job_to_dict(waiting)["services"]["clustering"]["waiting_for"] == "j-h"
    assert job_from_dict(job_to_dict(waiting)) == waiting
    confirmed = confirm_service(waiting, "clustering", result(0), T0 + timedelta(minutes=1))
    failed_once = fail_service(waiting, "clustering", "UNAVAILABLE", T0 + timedelta(minutes=1), policy)
    for after in (confirmed, failed_once):
        assert after.services["clustering"].waiting_for == ""
        assert "waiting_for" not in job_to_dict(after)["services"]["clustering"]
    with pytest.raises(InvalidArgument):   # a wait names the job it waits for
        fail_service(job, "clustering", "waiting", T0, policy, wait_until=T0)


def test_invalid_transitions():
    job = new_job("j", ErasureScope("a", "household"), "p", "admin", T0)
    with pytest.raises(InvalidTransition):
        confirm_service(job, "clustering", result(1), T0)  # not started
    with pytest.raises(InvalidTransition):
        build_receipt(job, "r", "k")
    job = start_job(job, T0)
    with pytest.raises(InvalidTransition):
        start_job(job, T0)
    with pytest.raises(ValueError, match="service"):
        confirm_service(job, "billing", result(1), T0)
    job = confirm_service(job, "clustering", result(1), T0)
    assert confirm_service(job, "clustering", result(1), T0) == job  # idempotent redelivery
    with pytest.raises(InvalidTransition):
        confirm_service(job, "clustering", result(2), T0)  # conflicting confirmation
    with pytest.raises(InvalidTransition):
        fail_service(job, "clustering", "late failure", T0)
    for svc in ("attribution", "feedback", "privacy"):
        job = confirm_service(job, svc, ServiceDeletion(0, EMPTY_IDS_DIGEST), T0)
    assert job.terminal
    assert confirm_service(job, "privacy", ServiceDeletion(0, EMPTY_IDS_DIGEST), T0) == job
    with pytest.raises(InvalidTransition):
        fail_service(job, "privacy", "x", T0)


@pytest.mark.parametrize(("args", "match"), [
    (("", ErasureScope("a", "household"), "p", "admin", T0), "job_id"),
    (("j", {"kind": "household"}, "p", "admin", T0), "scope"),
    (("j", ErasureScope("a", "household"), "p", "admin", T0, []), "services"),
    (("j", ErasureScope("a", "household"), "p", "admin", T0, ["a", "a"]), "duplicate"),
    (("j", ErasureScope("a", "household"), "p", "admin", "soon"), "requested_at"),
])
def test_new_job_validation(args, match):
    with pytest.raises(ValueError, match=match):
        new_job(*args)


@given(st.lists(st.tuples(st.sampled_from(DEFAULT_SERVICES), st.booleans()), max_size=40))
@settings(max_examples=60, deadline=None)
def test_random_event_sequences_keep_invariants(events):
    """Whatever arrives, the job never leaves a terminal state, completes only when every
    service confirmed, and fails only when some service failed."""
    policy = RetryPolicy(max_attempts=3)
    job = running_job()
    for i, (svc, ok) in enumerate(events):
        now = T0 + timedelta(minutes=i)
        before = job
        try:
            job = confirm_service(job, svc, result(1), now) if ok else fail_service(job, svc, "e", now, policy)
        except InvalidTransition:
            assert before.terminal or before.services[svc].status in (
                ServiceStatus.CONFIRMED, ServiceStatus.FAILED)
            continue
        statuses = {p.status for p in job.services.values()}
        if job.state is JobState.COMPLETED:
            assert statuses == {ServiceStatus.CONFIRMED}
        elif job.state is JobState.FAILED:
            assert ServiceStatus.FAILED in statuses
        else:
            assert ServiceStatus.FAILED not in statuses and statuses != {ServiceStatus.CONFIRMED}
        assert all(p.attempts < policy.max_attempts or p.status is ServiceStatus.FAILED
                   for p in job.services.values())
