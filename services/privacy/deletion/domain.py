"""Pure planning of deletion jobs: scopes, the job state machine, retries, receipts.

Scopes are ``services.common.erasure.ErasureScope``, the one scope type of the mesh (its
module docstring has the table of kinds and what each deletes).

Job state machine (every transition is a pure function returning a new job)::

    pending --start--> running --confirm(all services)--> completed
                          |  \\--fail(retryable, attempts left)--> running (retry due later)
                          \\----fail(not retryable | attempts exhausted)--> failed

Each service (clustering, attribution, feedback, privacy) is tracked separately:
``pending`` → ``confirmed`` with its ``ServiceDeletion`` (count, ids digest), or
``retrying`` with ``next_attempt_at``, or ``failed``. ``due_services(job, now)`` says
which services the worker should call now. Terminal jobs reject further transitions
with ``InvalidTransition``; re-confirming a service with the same result is a no-op
(so redelivered confirmations are idempotent).

Retry delays: ``delay(a) = min(max_delay, base * multiplier^(a-1)) * (1 - jitter * u)``
for failed attempt ``a`` = 1, 2, ..., where ``u`` in [0, 1) is derived from
SHA-256(key, a) — deterministic per (job, service) so replicas agree and tests are
reproducible, yet different jobs spread out instead of retrying in lockstep.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from services.common.erasure import ErasureScope, ScopeKind  # noqa: F401  (the one scope type)
from services.common.ids import Role, check_id, check_principal_id

from services.privacy.audit.domain import format_ts, parse_ts
from services.privacy.deletion.receipts import DeletionReceipt, ServiceDeletion

DEFAULT_SERVICES: tuple[str, ...] = ("clustering", "attribution", "feedback", "privacy")


class InvalidTransition(ValueError):
    """The requested transition is not allowed from the job's current state."""


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay: timedelta = timedelta(seconds=1)
    multiplier: float = 2.0
    max_delay: timedelta = timedelta(minutes=5)
    max_attempts: int = 8
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.base_delay, timedelta) or self.base_delay <= timedelta(0):
            raise ValueError("base_delay: must be a positive timedelta")
        if not isinstance(self.max_delay, timedelta) or self.max_delay < self.base_delay:
            raise ValueError("max_delay: must be a timedelta >= base_delay")
        if not isinstance(self.multiplier, (int, float)) or not self.multiplier >= 1.0:
            raise ValueError(f"multiplier: must be >= 1, got {self.multiplier!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be an int >= 1, got {self.max_attempts!r}")
        if not isinstance(self.jitter, (int, float)) or not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter: must be in [0, 1), got {self.jitter!r}")


def _unit_hash(key: str, attempt: int) -> float:
    digest = hashlib.sha256(f"{key}\x00{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def retry_delay(policy: RetryPolicy, attempt: int, key: str = "") -> timedelta:
    """Delay after failed attempt number ``attempt`` (1-based); see module docstring."""
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt: must be an int >= 1, got {attempt!r}")
    base_s = policy.base_delay.total_seconds()
    max_s = policy.max_delay.total_seconds()
    # Compare in log space so huge attempt numbers cannot overflow a float.
    multiplier = float(policy.multiplier)
    if multiplier == 1.0 or (attempt - 1) * math.log(multiplier) < math.log(max_s / base_s):
        raw = min(max_s, base_s * multiplier ** (attempt - 1))
    else:
        raw = max_s
    return timedelta(seconds=raw * (1.0 - policy.jitter * _unit_hash(key, attempt)))


def backoff_schedule(policy: RetryPolicy, key: str = "") -> list[timedelta]:
    """Delays between the ``max_attempts`` attempts (``max_attempts - 1`` of them)."""
    return [retry_delay(policy, a, key) for a in range(1, policy.max_attempts)]


# --------------------------------------------------------------------------- job


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class ServiceStatus(enum.StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    CONFIRMED = "confirmed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ServiceProgress:
    status: ServiceStatus = ServiceStatus.PENDING
    attempts: int = 0  # failed attempts so far
    next_attempt_at: datetime | None = None
    last_error: str = ""
    result: ServiceDeletion | None = None
    # The job this step waits for (a household erasure that has yet to erase this service:
    # ``fail_service(waiting_for=)``), "" otherwise. Stored only while set, so the overdue
    # gauge tells a job waiting for another apart from one stuck itself (store.py).
    waiting_for: str = ""


@dataclass(frozen=True, slots=True)
class DeletionJob:
    job_id: str
    scope: ErasureScope
    principal: str
    role: str
    requested_at: datetime
    state: JobState = JobState.PENDING
    services: Mapping[str, ServiceProgress] = field(default_factory=dict)
    updated_at: datetime | None = None
    completed_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.state in (JobState.COMPLETED, JobState.FAILED)


def new_job(
    job_id: str,
    scope: ErasureScope,
    principal: str,
    role: str,
    requested_at: datetime,
    services: Sequence[str] = DEFAULT_SERVICES,
) -> DeletionJob:
    """A pending job that must be confirmed by each of ``services``."""
    check_id(job_id, "job_id")
    if not isinstance(scope, ErasureScope):
        raise ValueError(f"scope: expected ErasureScope, got {type(scope).__name__}")
    check_principal_id(principal, "principal")
    try:
        Role(role)
    except ValueError:
        raise ValueError(f"role: {role!r} is not one of {', '.join(r.value for r in Role)}") from None
    if isinstance(services, str) or not services:
        raise ValueError("services: at least one service name is required")
    names = [check_id(s, f"services[{i}]") for i, s in enumerate(services)]
    if len(set(names)) != len(names):
        raise ValueError("services: duplicate service name")
    when = parse_ts(requested_at, "requested_at")
    return DeletionJob(
        job_id, scope, principal, role, when,
        services={n: ServiceProgress() for n in names}, updated_at=when,
    )


def _require(job: DeletionJob, *states: JobState, action: str) -> None:
    if not isinstance(job, DeletionJob):
        raise ValueError(f"job: expected DeletionJob, got {type(job).__name__}")
    if job.state not in states:
        raise InvalidTransition(f"job {job.job_id}: cannot {action} a {job.state.value} job")


def _service(job: DeletionJob, service: str) -> ServiceProgress:
    if service not in job.services:
        raise ValueError(f"service: {service!r} is not part of job {job.job_id}")
    return job.services[service]


def start_job(job: DeletionJob, now: datetime) -> DeletionJob:
    """pending → running; every service becomes due at ``now``."""
    _require(job, JobState.PENDING, action="start")
    when = parse_ts(now, "now")
    services = {n: replace(p, next_attempt_at=when) for n, p in job.services.items()}
    return replace(job, state=JobState.RUNNING, services=services, updated_at=when)


def due_services(job: DeletionJob, now: datetime, horizon: timedelta | None = None) -> list[str]:
    """Services the worker should call at ``now`` (sorted by name). ``horizon``: an
    attempt set later than ``now + horizon`` was set by a clock stepped forward, and is
    due now (app.FUTURE_MARGIN_S)."""
    if job.state is not JobState.RUNNING:
        return []
    when = parse_ts(now, "now")
    return sorted(
        n for n, p in job.services.items()
        if p.status in (ServiceStatus.PENDING, ServiceStatus.RETRYING)
        and p.next_attempt_at is not None
        and (p.next_attempt_at <= when or (horizon is not None and p.next_attempt_at > when + horizon))
    )


def confirm_service(
    job: DeletionJob, service: str, result: ServiceDeletion, now: datetime
) -> DeletionJob:
    """Record a service's confirmation; the job completes when all have confirmed."""
    if not isinstance(result, ServiceDeletion):
        raise ValueError(f"result: expected ServiceDeletion, got {type(result).__name__}")
    if isinstance(job, DeletionJob) and job.state is JobState.COMPLETED:
        if job.services.get(service, ServiceProgress()).result == result:
            return job  # redelivered confirmation
    _require(job, JobState.RUNNING, action="confirm a service of")
    progress = _service(job, service)
    if progress.status is ServiceStatus.CONFIRMED:
        if progress.result == result:
            return job
        raise InvalidTransition(
            f"job {job.job_id}: service {service} already confirmed with a different result"
        )
    if progress.status is ServiceStatus.FAILED:
        raise InvalidTransition(f"job {job.job_id}: service {service} already failed")
    when = parse_ts(now, "now")
    services = dict(job.services)
    services[service] = replace(
        progress, status=ServiceStatus.CONFIRMED, result=result, next_attempt_at=None, waiting_for=""
    )
    done = all(p.status is ServiceStatus.CONFIRMED for p in services.values())
    return replace(
        job, services=services, updated_at=when,
        state=JobState.COMPLETED if done else JobState.RUNNING,
        completed_at=when if done else None,
    )


def fail_service(
    job: DeletionJob,
    service: str,
    error: str,
    now: datetime,
    policy: RetryPolicy | None = None,
    *,
    retryable: bool = True,
    wait_until: datetime | None = None,
    waiting_for: str = "",
) -> DeletionJob:
    """Record a failed attempt: schedule a retry, or fail the job when the error is not
    retryable or the attempts are exhausted. ``wait_until``: not a failed attempt but a
    wait for another job (a household erasure that has yet to erase this service, app.py
    ``_erase_or_shredded``): the step is tried again then, its attempts not counted (the
    other job's own attempts bound the wait); ``waiting_for`` names that job (kept on the
    step until its next outcome)."""
    _require(job, JobState.RUNNING, action="record a failure in")
    policy = policy or RetryPolicy()
    progress = _service(job, service)
    if progress.status in (ServiceStatus.CONFIRMED, ServiceStatus.FAILED):
        raise InvalidTransition(
            f"job {job.job_id}: service {service} is already {progress.status.value}"
        )
    if not isinstance(error, str):
        raise ValueError("error: expected a string")
    when = parse_ts(now, "now")
    services = dict(job.services)
    if wait_until is not None:
        services[service] = replace(progress, status=ServiceStatus.RETRYING,
                                    next_attempt_at=max(parse_ts(wait_until, "wait_until"), when),
                                    last_error=error, waiting_for=check_id(waiting_for, "waiting_for"))
        return replace(job, services=services, updated_at=when)
    attempts = progress.attempts + 1
    if retryable and attempts < policy.max_attempts:
        delay = retry_delay(policy, attempts, key=f"{job.job_id}/{service}")
        services[service] = replace(
            progress, status=ServiceStatus.RETRYING, attempts=attempts,
            next_attempt_at=when + delay, last_error=error, waiting_for="",
        )
        return replace(job, services=services, updated_at=when)
    services[service] = replace(
        progress, status=ServiceStatus.FAILED, attempts=attempts,
        next_attempt_at=None, last_error=error, waiting_for="",
    )
    return replace(job, services=services, state=JobState.FAILED, updated_at=when)


# --------------------------------------------------------------------------- receipts


def receipt_from_results(
    *,
    receipt_id: str,
    job_id: str,
    scope: ErasureScope,
    principal: str,
    role: str,
    requested_at: datetime,
    completed_at: datetime,
    results: Mapping[str, tuple[int, str] | ServiceDeletion],
    key_id: str,
) -> DeletionReceipt:
    """Receipt contents from per-service results ``{service: (count, ids_digest)}``."""
    if not isinstance(scope, ErasureScope):
        raise ValueError(f"scope: expected ErasureScope, got {type(scope).__name__}")
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results: at least one service result is required")
    services: dict[str, ServiceDeletion] = {}
    for name, value in results.items():
        if isinstance(value, ServiceDeletion):
            services[name] = value
            continue
        if not isinstance(value, tuple) or len(value) != 2:
            raise ValueError(f"results.{name}: expected (count, ids_digest)")
        try:
            services[name] = ServiceDeletion(*value)
        except ValueError as exc:
            raise ValueError(f"results.{name}.{exc}") from None
    return DeletionReceipt(
        receipt_id=receipt_id, job_id=job_id, account_id=scope.account_id,
        scope=scope.to_dict(), principal=principal, role=role,
        requested_at=requested_at, completed_at=completed_at,
        services=services, key_id=key_id,
    )


def receipt_id_of(job_id: str) -> str:
    """The id of a job's receipt (docs/privacy.md §2's example follows it)."""
    return f"r-{job_id}"


def build_receipt(job: DeletionJob, receipt_id: str, key_id: str) -> DeletionReceipt:
    """Receipt contents of a completed job (sign with ``receipts.sign_receipt``)."""
    _require(job, JobState.COMPLETED, action="issue a receipt for")
    assert job.completed_at is not None
    results = {n: p.result for n, p in job.services.items() if p.result is not None}
    return receipt_from_results(
        receipt_id=receipt_id, job_id=job.job_id, scope=job.scope,
        principal=job.principal, role=job.role, requested_at=job.requested_at,
        completed_at=job.completed_at, results=results, key_id=key_id,
    )


# --------------------------------------------------------------------------- persistence


def _progress_to_dict(p: ServiceProgress) -> dict[str, Any]:
    waiting = {"waiting_for": p.waiting_for} if p.waiting_for else {}   # store.WAITING_PATTERN
    return {
        **waiting,
        "status": p.status.value,
        "attempts": p.attempts,
        "next_attempt_at": format_ts(p.next_attempt_at) if p.next_attempt_at else None,
        "last_error": p.last_error,
        "result": {"count": p.result.count, "ids_digest": p.result.ids_digest,
                   "purges": [dict(x) for x in p.result.purges]}
        if p.result else None,
    }


def job_to_dict(job: DeletionJob) -> dict[str, Any]:
    """JSON-ready form of a job (the store keeps it in one JSON column, or spreads it)."""
    return {
        "job_id": job.job_id,
        "scope": job.scope.to_dict(),
        "principal": job.principal,
        "role": job.role,
        "requested_at": format_ts(job.requested_at),
        "state": job.state.value,
        "services": {n: _progress_to_dict(p) for n, p in sorted(job.services.items())},
        "updated_at": format_ts(job.updated_at) if job.updated_at else None,
        "completed_at": format_ts(job.completed_at) if job.completed_at else None,
    }


def job_from_dict(data: Mapping[str, Any]) -> DeletionJob:
    """Inverse of ``job_to_dict``."""
    try:
        services = {}
        for name, p in data["services"].items():
            r = p["result"]
            services[name] = ServiceProgress(
                status=ServiceStatus(p["status"]),
                attempts=int(p["attempts"]),
                next_attempt_at=parse_ts(p["next_attempt_at"]) if p["next_attempt_at"] else None,
                last_error=str(p["last_error"]),
                waiting_for=str(p.get("waiting_for", "")),
                result=ServiceDeletion(r["count"], r["ids_digest"], tuple(r.get("purges", ()))) if r else None,
            )
        return DeletionJob(
            job_id=check_id(data["job_id"], "job_id"),
            scope=ErasureScope.from_dict(data["scope"]),
            principal=data["principal"],
            role=data["role"],
            requested_at=parse_ts(data["requested_at"], "requested_at"),
            state=JobState(data["state"]),
            services=services,
            updated_at=parse_ts(data["updated_at"]) if data.get("updated_at") else None,
            completed_at=parse_ts(data["completed_at"]) if data.get("completed_at") else None,
        )
    except KeyError as exc:
        raise ValueError(f"job.{exc.args[0]}: missing") from None
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"job: malformed ({exc})") from None
