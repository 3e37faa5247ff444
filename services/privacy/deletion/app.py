"""Deletion across the mesh: durable jobs, the worker that drives them, signed receipts,
the scheduled retention purge, and the household export.

A job (``RequestDeletion``) is stored first, then worked on by a background worker
thread, so the request returns at once (HTTP 202) and survives the restart of any
service, this one included:

* **Order**: attribution first, then clustering, then feedback, then the privacy
  service's own part (crypto-shredding the household's data key; a household deletion
  does it first). Attribution's person scope needs clustering's person assignments (it
  resolves touchpoints to persons through clustering's ResolvePersons), so clustering
  must still hold them when attribution erases; feedback erases after clustering, which
  forwards its answered predictions to feedback (``STAGES``). Each service's Erase also
  clears its own caches (Redis).
* **Retries**: a service that fails or cannot be reached is retried with exponential
  backoff (``deletion.fail_service``; ``HEARTH_DELETION_RETRY_*``) until it confirms;
  only a non-retryable answer (INVALID_ARGUMENT, PERMISSION_DENIED,
  FAILED_PRECONDITION) or ``HEARTH_DELETION_MAX_ATTEMPTS`` fails the job — except a
  FAILED_PRECONDITION for a device/person/window scope whose household's data key is
  destroyed: the step waits for the household's own job to erase that service, and is
  then confirmed ``already_erased`` (``_erase_or_shredded``).
* **Durability**: every confirmation is stored (compare-and-swap on the job row)
  before the next service is called; a replica claims a job with a lease, so after a
  crash the job is resumed by whoever looks next (the restarted process included).
  The holder renews its (fenced) lease on a heartbeat, every third of the lease, also
  while a peer's Erase is in flight: the lease can be short (a killed holder's job is
  taken over within ``HEARTH_DELETION_LEASE_S``) while a live holder keeps it however
  long a peer takes (``HEARTH_DELETION_ERASE_TIMEOUT_S``) — but only while its pass
  steps: a pass that has not stepped within that deadline plus a lease (stuck outside
  the bounded Erase) is no longer renewed, and another replica takes its job over.
  Every Erase is idempotent, so repeating a call whose answer was lost is harmless;
  the repeat then reports ``already_erased`` and a count of 0 for that service
  (known limitation: the receipt counts what the *confirmed* call deleted).
* **Receipt**: the confirmation that completes the job is stored together with the
  signed receipt (Ed25519, ``receipts.sign_receipt``), in one transaction.

Retention: every ``HEARTH_RETENTION_CHECK_S`` a job with scope ``window`` over account
``"*"`` (every account; only this service's own principal may ask for it) ending at
``now - HEARTH_RETENTION_DAYS`` goes through the same path. Its request id is derived
from the check period, so replicas asking at once share one job. Its end advances at most
``RETENTION_MAX_ADVANCE_S`` (a day; two check periods when that is longer) past the newest
earlier purge's: a clock stepped a year forward erased every household's data in a second
until session 24; now a day's per check (docs/operations.md, "Clock steps").
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import grpc
from prometheus_client import Counter, Gauge

from hearth.common.v1 import common_pb2, common_pb2_grpc
from services.common import audit, erasure, export_stream, identity, telemetry
from services.common.erasure import ALL_ACCOUNTS, ErasureScope, ids_digest
from services.common.errors import (AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, PermissionDenied,
                                    ResourceExhausted, Unavailable)
from services.common.failure_log import FailureLog
from services.common.storage import sql
from services.common.text import MAX_REASON_CHARS, MAX_REQUEST_ID_CHARS, check_text
from services.privacy.audit.domain import format_ts
from services.privacy.deletion.domain import (
    DeletionJob, JobState, RetryPolicy, ServiceStatus, build_receipt, confirm_service,
    due_services, fail_service, new_job, receipt_id_of, start_job)
from services.privacy.keys.signing import Ed25519PrivateKey, key_id, public_key_to_pem
from services.privacy.deletion.receipts import (
    ReceiptVerificationError, ServiceDeletion, SignedReceipt, sign_receipt, verify_receipt)
from services.privacy.deletion.store import DeletionJobStore, StoredJob
from services.privacy.keys.app import KeyService
from services.privacy.keys.rotation import Rekeyed

log = logging.getLogger("hearth.privacy.deletion")
_TRACER = telemetry.tracer("hearth.privacy.deletion")

# Alerts: a failed job pages (a person's erasure did not happen); an open job older than
# its budget is overdue. Both states exist at 0 so the first failure is an increase.
JOBS_FINISHED = Counter("hearth_deletion_jobs_finished_total", "Deletion jobs that reached a final state",
                        ["state"])
for _state in ("completed", "failed"):
    JOBS_FINISHED.labels(_state)
RETENTION_HELD_BACK = Counter(
    "hearth_retention_purges_held_back_total",
    "Retention purges whose end was held back to a day (or two check periods) past the previous purge's "
    "(a clock stepped forward, "
    "a lowered HEARTH_RETENTION_DAYS, or privacy stopped for over a day)")
# The most a retention purge's end may advance past the newest earlier purge's (see the
# module docstring; two check periods when longer): after a longer gap the purge catches up
# a day less one check period per check (hourly: 23 hours), at least a check period.
RETENTION_MAX_ADVANCE_S = 86400.0
# A replica whose wall clock disagrees with the database server's (PostgreSQL) by more than
# a quarter of the lease takes no deletion lease and asks for no retention purge until it
# agrees again (``clock_disagrees``): leases, due times and purge periods are written and
# compared on each replica's own clock, so any two replicas must agree well within two
# thirds of the lease. Until session 25 a replica two hours behind saw every lease of the
# others as a clock step's and took it, and every due time as due: it and they retried each
# job at every poll, ignoring the backoff (a job failed after HEARTH_DELETION_MAX_ATTEMPTS
# in minutes, not days; docs/operations.md, "Clock steps").
CLOCK_OFFSET = Gauge("hearth_deletion_clock_offset_seconds",
                     "This privacy replica's wall clock minus the database server's, last measured "
                     "(NaN: not measured, SQLite)")
CLOCK_DISAGREES = Gauge("hearth_deletion_clock_disagrees",
                        "1 while this privacy replica takes no deletion leases and asks for no retention purge "
                        "because its clock disagrees with the database server's by more than a quarter lease")
CLOCK_OFFSET.set(float("nan"))
# Split by what the job waits for (session 36): ``none`` — it works on its own, so when old it
# is stuck itself (HearthDeletionJobOverdue); ``household_job`` — a device/person/window
# erasure whose step waits for its household's job to erase a store (``_WaitForHousehold``).
# Such a job still counts: its requester's clock runs from its own request; but what is stuck
# is the household job, so its age has its own series and alert
# (HearthDeletionRequestWaitingOverdue, silent while a job of the first kind is overdue: one
# stuck household job, one alarm). The max over both is the oldest open request.
OLDEST_OPEN_JOB_AGE = Gauge("hearth_deletion_oldest_open_job_age_seconds",
                            "Age of the oldest deletion job not yet completed or failed (0: none), by what it "
                            "waits for: none (working on its own) or household_job (a narrower erasure waiting "
                            "for its household's job)", ["waiting"])
WAITING_LABELS = {"none": False, "household_job": True}
# The last successful off-site ledger export (`hearth ledger export`, the chart's ledger
# CronJob every 5 minutes), read from privacy's database on every scrape: the export runs
# in a Job Prometheus does not scrape, so the service it exports from says when it last
# worked (HearthLedgerExportStale; session 34). NaN: no export recorded yet, or the
# database unreadable (its own alerts).
LAST_LEDGER_EXPORT = Gauge("hearth_ledger_last_export_timestamp_seconds",
                           "Unix time of the last successful off-site deletion ledger export "
                           "(hearth ledger export; NaN: none recorded)")
LAST_LEDGER_EXPORT.set(float("nan"))

# Erase order: one stage after the other; services within a stage in this order.
# Attribution's person scope resolves touchpoints with clustering's person assignments,
# so clustering erases after attribution. Feedback erases after clustering: clustering
# forwards the predictions it answered to feedback from a durable outbox, so a backlog
# (feedback was down, or the forwarder was backing off) drained between feedback's erase
# and clustering's would stay in feedback after the job completed (session 19's review;
# until then feedback erased in the first stage). Clustering's erase takes the outbox's
# undelivered predictions of the scope, so nothing of it is sent after that.
STAGES: tuple[tuple[str, ...], ...] = (("attribution",), ("clustering",), ("feedback",), ("privacy",))
# A household deletion shreds its data key FIRST. A device that keeps sending while the
# job runs must not be able to write after a store erased the household: once the key
# is destroyed no store can fetch it again, and each store's Erase drops the copy it
# had cached, so every write either lands before that store's Erase (and is erased by
# it) or is refused (FAILED_PRECONDITION). With the key shredded last (until session
# 14), a write landing between a store's Erase and the shred fetched the live key and
# kept it cached for up to a minute: the household took data after its job completed.
# Erasing a household needs no key (its rows go by account id), so nothing is lost.
HOUSEHOLD_STAGES: tuple[tuple[str, ...], ...] = (("privacy",), *STAGES[:-1])
PEER_SERVICES = ("clustering", "attribution", "feedback")


def stages_for(scope: ErasureScope) -> tuple[tuple[str, ...], ...]:
    """The erase order of a job of this scope."""
    return HOUSEHOLD_STAGES if scope.kind == "household" else STAGES
RETENTION_REASON = "retention"
# How long close() lets a job pass finish the call it is in: inside the chart's margin
# after the drain (terminationGracePeriodSeconds = preStop 5 + grace 10 + margin 5).
CLOSE_TIMEOUT_S = 2.0
_LOST = -1.0   # a lease token no claim writes: the heartbeat found the lease taken
# A stored time (a job's next attempt, a lease's end) further ahead of this replica's clock
# than it could have written — its longest backoff or lease — plus this margin was written
# by a clock stepped forward (or by a replica whose clock is ahead): the job is due and the
# lease free now. Until session 24 a job retried while privacy's clock was a year ahead
# waited that year after the clock was put right (docs/operations.md, "Clock steps").
FUTURE_MARGIN_S = 3600.0

_FATAL_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE})


# A step waiting for its household's erasure (``_erase_or_shredded``) is tried again this
# long after the household job is next due: its pass has then had the time to confirm.
HOUSEHOLD_WAIT_MARGIN_S = 5.0


class _WaitForHousehold(Exception):
    """A device/person/window step found its household's key destroyed and the household
    job yet to erase that service: tried again at ``until``, not a failed attempt."""

    def __init__(self, reason: str, until: datetime, job_id: str) -> None:
        super().__init__(reason)
        self.reason = reason[:500]
        self.until = until
        self.job_id = job_id


class Peers(Protocol):
    """The other services as the deletion and export paths see them."""

    def erase(self, service: str, scope: common_pb2.ErasureScope, job_id: str) -> common_pb2.ErasureResult: ...

    def export(self, service: str, account_id: str) -> Iterator[bytes]:
        """``service``'s part of the export: its JSON text's bytes as they arrive, checked
        whole (export_stream.verified) before the iterator ends."""
        ...

    def close(self) -> None: ...


# A streamed part's deadline (GrpcPeers.export): the caller's own deadline bounds it.
EXPORT_STREAM_TIMEOUT_S = 3600.0
# How a process of a release before session 26 refuses ExportAccountStream /
# ExportHouseholdStream: UNIMPLEMENTED, as it shipped (it serves no such RPC; seen through
# real processes on that release's own generated protos: tests/e2e/
# test_export_rolling_upgrade_e2e.py — until session 34 the test ran it on this checkout's,
# whose servicer base lists the RPC, and its permission matrix answered PERMISSION_DENIED).
# PERMISSION_DENIED is kept: the unary call the caller falls back to is judged by the
# permission matrix, so a caller really refused is refused again there.
OLDER_RELEASE_CODES = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED})


class GrpcPeers:
    """Erase (as ``svc:privacy``) and ExportAccount (on behalf of the caller, so the
    permission matrix decides who may read a household) on the data-holding services."""

    def __init__(self, addresses: Mapping[str, str], erase_timeout_s: float, export_timeout_s: float = 30.0) -> None:
        from services.common.client import Peer

        self._peers = {s: Peer(addresses[s], "privacy", common_pb2_grpc.DataHolderStub, erase_timeout_s,
                                audience=s)
                       for s in PEER_SERVICES}
        self._export_timeout = export_timeout_s

    def erase(self, service: str, scope: common_pb2.ErasureScope, job_id: str) -> common_pb2.ErasureResult:
        request = common_pb2.EraseRequest(scope=scope, job_id=job_id)
        return self._peers[service].call("Erase", request).result

    def rekey(self, service: str, account_id: str, dek_version: int, defer_purge: bool = False) -> Rekeyed:
        """DataHolder/Rekey (as ``svc:privacy``): a data key rotation's re-encryption —
        values re-encrypted, the purge steps of the old ciphertexts (as Erase's), and
        whether the data holder keys erased-id digests apart from data key version 1
        (false from a release before session 27). ``defer_purge``: a batch's re-encryption,
        purged once per store afterwards (keys/rotation.py ``purge_deferred``)."""
        request = common_pb2.RekeyRequest(account_id=account_id, dek_version=dek_version, defer_purge=defer_purge)
        response = self._peers[service].call("Rekey", request, idempotent=True)
        return Rekeyed(int(response.reencrypted),
                       tuple({"store": p.store, "where": p.location, "action": p.action, "complete": p.complete}
                             for p in response.purges),
                       bool(response.digests_keyed_apart))

    def export(self, service: str, account_id: str) -> Iterator[bytes]:
        """``ExportAccountStream`` on behalf of the caller, verified as it arrives. A data
        holder of a release before session 26 refuses it (``OLDER_RELEASE_CODES``): its part
        comes from the unary ``ExportAccount`` instead, one message held whole as before (up
        to HEARTH_GRPC_MAX_RESPONSE_BYTES; docs/operations.md, "Rolling upgrades")."""
        request = common_pb2.ExportAccountRequest(account_id=account_id)
        # The stream is paced by whoever reads the export (the gateway's HTTP client): its
        # deadline is the export's own (the serving deadline bounds it), not the 30 s of one
        # unary answer.
        stream = self._peers[service].call("ExportAccountStream", request, timeout_s=EXPORT_STREAM_TIMEOUT_S,
                                           on_behalf_of_caller=True)
        try:
            first = next(stream)
        except StopIteration:
            first = None
        except grpc.RpcError as exc:
            if exc.code() not in OLDER_RELEASE_CODES:
                raise
            log.info("%s has no ExportAccountStream (%s: an older release): its export part is one message",
                     service, exc.code().name)
            response = self._peers[service].call("ExportAccount", request, timeout_s=self._export_timeout,
                                                 on_behalf_of_caller=True)
            yield response.json.encode("utf-8")
            return
        try:
            yield from export_stream.verified(itertools.chain([first] if first is not None else [], stream), service)
        finally:
            # The export stopped early (its reader went away, another part failed): end the
            # holder's call now, not at its deadline, so its worker is not held meanwhile.
            stream.cancel()

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.RpcError) and isinstance(exc.code(), grpc.StatusCode):
        return exc.code() not in _FATAL_CODES
    return not isinstance(exc, (InvalidArgument, PermissionDenied))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc.code(), grpc.StatusCode):
        return f"{exc.code().name}: {exc.details() or ''}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


class DeletionCoordinator:
    """RequestDeletion / GetDeletion / VerifyReceipt and the worker (module docstring)."""

    def __init__(self, jobs: DeletionJobStore, peers: Peers, keys: KeyService | None,
                 signing_key: Ed25519PrivateKey, *, policy: RetryPolicy = RetryPolicy(),
                 lease_s: float = 10.0, erase_timeout_s: float = 60.0, poll_s: float = 1.0, workers: int = 4,
                 retention_days: float = 90.0, retention_check_s: float = 0.0,
                 retention_max_advance_s: float = RETENTION_MAX_ADVANCE_S,
                 on_local_erase: Callable[[ErasureScope], Mapping[str, Any] | None] | None = None,
                 clock: Callable[[], datetime] | None = None, wall: Callable[[], float] = time.time) -> None:
        self.jobs = jobs
        self.peers = peers
        self.keys = keys
        self.signing_key = signing_key
        self.key_id = key_id(signing_key)
        self.public_key_pem = public_key_to_pem(signing_key.public_key())
        self.policy = policy
        self.lease_s = lease_s
        # The longest a healthy step of a pass takes (a peer's Erase up to its deadline, then
        # storing its outcome): the heartbeat renews a lease only while its pass stepped
        # within this, so a pass stuck outside the bounded Erase loses its job (review21).
        self.step_limit_s = erase_timeout_s + lease_s
        self.poll_s = poll_s
        self.retention_days = retention_days
        self.retention_check_s = retention_check_s
        self.retention_max_advance_s = retention_max_advance_s
        self._on_local_erase = on_local_erase
        # ``wall``: this replica's wall clock (epoch seconds) for leases, due times and the
        # retention period; ``clock``: the same as a datetime for the job's own times.
        self._wall = wall
        self._clock = clock or (lambda: datetime.fromtimestamp(wall(), UTC))
        self.clock_tolerance_s = lease_s / 4.0
        self._clock_checked_at: float | None = None   # time.monotonic() of the last measurement
        self._clock_off = False
        # How far this replica is ahead of the database server's clock while exempted from
        # the clock check (alone, or with every worker off alike); 0 otherwise. The purge
        # then goes by the server's clock (maybe_request_retention).
        self._ahead_of_server_s = 0.0
        self._server_clock_warned = False
        self._clock_measured = 0   # measurements stored by this worker
        self._worker_id = uuid.uuid4().hex   # its row in deletion_clocks
        self._wake = threading.Event()
        self._stop = threading.Event()
        # One traceback per run of identical failed passes (a database outage), not one a poll.
        self.pass_failures = FailureLog(log, "deletion worker pass")
        # The lease heartbeat's renewals likewise (review21: a traceback a lease a beat).
        self.renew_failures = FailureLog(log, "deletion lease renewal")
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deletion-job")
        self._advancing: set[Future] = set()
        self._advancing_ids: set[str] = set()   # jobs a pass of this process is advancing
        # job -> the lease token its pass holds (store.claim), or _LOST once the heartbeat
        # found it taken; read and written under _lease_lock, which also serialises each
        # renewal and release with the heartbeat's (a renewal replaces the token).
        self._leases: dict[str, float] = {}
        # job -> time.monotonic() of its pass's last step (claim, renewal before a call,
        # outcome stored), and the jobs whose pass the heartbeat found stalled (warned once).
        self._stepped: dict[str, float] = {}
        self._stalled: set[str] = set()
        self._lease_lock = threading.Lock()
        self._advancing_lock = threading.Lock()
        self._heartbeat_thread: threading.Thread | None = None
        self._closed = threading.Event()
        # The check period (retention_scope) last purged by this process: a purge is asked
        # for whenever the period differs, so a clock stepped back does not stop the purge
        # until it reaches the period it had stepped to (session 24: a year).
        self._retention_period: int | None = None
        # A stored time later than now + this is a clock step's (FUTURE_MARGIN_S).
        self.future_bound_s = max(lease_s, policy.max_delay.total_seconds() * (1.0 + policy.jitter)) \
            + FUTURE_MARGIN_S

    # ---- requests ------------------------------------------------------------------------

    def request(self, scope: ErasureScope, request_id: str = "", reason: str = "",
                principal: identity.Principal | None = None) -> StoredJob:
        """Store a new job (or return the job of a repeated ``request_id``) and wake the
        worker. ``account_id "*"`` is refused here: only the retention purge uses it."""
        principal = principal or identity.current_principal()
        if scope.account_id == ALL_ACCOUNTS and principal.id != "svc:privacy":
            raise PermissionDenied("only the retention purge may erase across every account", "scope.account_id")
        # The one text rule: a gRPC caller's NUL made PostgreSQL refuse the job's insert
        # (INTERNAL) and SQLite store it (attack29).
        check_text(reason, "reason", max_chars=MAX_REASON_CHARS)
        check_text(request_id, "request_id", max_chars=MAX_REQUEST_ID_CHARS)
        job = new_job(f"job-{uuid.uuid4().hex}", scope, principal.id, principal.role.value,
                      self._clock())
        stored = self.jobs.create(job, request_id or f"auto:{job.job_id}", reason or "unspecified",
                                  next_due=job.requested_at,
                                  trace_context=json.dumps(telemetry.context_carrier(), sort_keys=True))
        self._wake.set()
        return stored

    def get(self, job_id: str) -> StoredJob:
        return self.jobs.get(job_id)

    def verify(self, receipt_json: str) -> tuple[bool, str]:
        """Check a receipt against this service's signing key (not the embedded one)."""
        try:
            verify_receipt(SignedReceipt.from_json(receipt_json), self.signing_key.public_key())
        except ReceiptVerificationError as exc:
            return False, str(exc)
        except ValueError as exc:
            return False, f"malformed receipt: {exc}"
        return True, ""

    # ---- the worker ----------------------------------------------------------------------

    def oldest_open_age_s(self, waiting: bool | None = None) -> float:
        """Age of the oldest open job (``waiting``: only those waiting for their household's
        job, True, or only the others, False; OLDEST_OPEN_JOB_AGE)."""
        # Called by Prometheus on every scrape, from the scraping thread: a scrape must never
        # fail because the store is closing or briefly unreachable; "unknown" is NaN, which
        # no alert threshold compares true against.
        try:
            oldest = self.jobs.oldest_open_created_at(waiting)
        except Exception:  # noqa: BLE001 - a gauge callback has no caller to report to
            return float("nan")
        return max(0.0, self._wall() - oldest) if oldest is not None else 0.0

    def last_ledger_export_at(self) -> float:
        # A scrape's callback, as oldest_open_age_s: never raises; unknown is NaN.
        try:
            at = self.jobs.last_ledger_export_at()
        except Exception:  # noqa: BLE001 - a gauge callback has no caller to report to
            return float("nan")
        return at if at is not None else float("nan")

    def start(self) -> None:
        for label, waiting in WAITING_LABELS.items():
            OLDEST_OPEN_JOB_AGE.labels(label).set_function(lambda waiting=waiting: self.oldest_open_age_s(waiting))
        LAST_LEDGER_EXPORT.set_function(self.last_ledger_export_at)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deletion-worker", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the worker: no new job or step starts; a pass under way stops before its
        next service and gets ``timeout_s`` to finish the call it is in. One still waiting
        then (a peer that does not answer: up to ``HEARTH_DELETION_ERASE_TIMEOUT_S``, 60 s)
        is left to the caller's next closer, the peers' channels, whose closing cancels it:
        the step is recorded as a retryable failure and the lease released, so the job
        resumes at once after the restart. Until session 20 this waited for every call
        under way: with a peer hung, the privacy service took 57 s to exit after SIGTERM,
        the chart's pod was SIGKILLed at 20 s, before its audit log and database were closed
        (tests/e2e/test_deletion_e2e.py)."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._advancing_lock:
            advancing = set(self._advancing)
        _, left = futures_wait(advancing, timeout=max(0.0, deadline - time.monotonic()))
        if left:
            log.warning("stopping with %d deletion job pass(es) still waiting on a peer: their calls are "
                        "cancelled; the jobs resume after the restart", len(left))
            # Cancel the calls now, while the database is still open: each pass records
            # its step as a retryable failure and releases its lease (the restart takes
            # the job at once instead of after HEARTH_DELETION_LEASE_S).
            self.peers.close()
            futures_wait(left, timeout=1.0)
        self._closed.set()   # the heartbeat stops: a pass still waiting lets its lease run out

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.maybe_request_retention()
                self.run_due(wait=False)
            except Exception:  # noqa: BLE001 - the worker must outlive any one failure
                self.pass_failures.failed()
            else:
                self.pass_failures.succeeded()
            timeout = self.poll_s
            try:
                # A replica taking no jobs for its clock waits its poll period: the due
                # times, read on its own clock, are not its to act on (one ahead saw every
                # retry due and woke every 5 ms, review25).
                due = None if self._clock_off else self.jobs.next_due()
                # Woken for a due time still ahead; one already past belongs to a job this
                # round did not claim (leased by another pass, ours included: its end wakes
                # this loop), so the poll period, not 5 ms: every worker woke every 5 ms
                # and queried twice for as long as a pass ran (review25).
                if due is not None and due > self._wall():
                    timeout = min(timeout, due - self._wall() + 0.005)
            except Exception:  # noqa: BLE001
                pass
            self._wake.wait(timeout)
            self._wake.clear()

    def run_due(self, wait: bool = True) -> int:
        """Claim every due job and advance it (in the worker pool). ``wait``: block until
        they are done (tests, tools). Returns the number of jobs claimed: none while this
        replica's clock disagrees with the database's (``clock_disagrees``)."""
        if self.clock_disagrees():
            return 0
        now = self._wall()
        futures = []
        for job_id in self.jobs.due(now, future_bound_s=self.future_bound_s):
            if self._stop.is_set():
                break
            with self._advancing_lock:
                # A pass of ours still on it (its lease ran out while a peer did not
                # answer): never a second one beside it. Until session 20 the worker
                # claimed such a job again at every lease expiry, so a hung peer got the
                # same Erase from two, three, four passes of one process at once.
                if job_id in self._advancing_ids:
                    continue
            lease = self.jobs.claim(job_id, now, self.lease_s, future_bound_s=self.future_bound_s)
            if lease is not None:
                with self._lease_lock:
                    self._leases[job_id] = lease
                    self._stepped[job_id] = time.monotonic()
                self._start_heartbeat()
                try:
                    future = self._pool.submit(self._advance_claimed, job_id)
                except RuntimeError:   # the pool was shut down (close) after the check above
                    self._release(job_id)
                    break
                with self._advancing_lock:
                    self._advancing.add(future)
                    self._advancing_ids.add(job_id)
                future.add_done_callback(lambda f, job_id=job_id: self._done_advancing(f, job_id))
                futures.append(future)
        if wait:
            for f in futures:
                f.result()
        return len(futures)

    def _done_advancing(self, future: Future, job_id: str) -> None:
        with self._advancing_lock:
            self._advancing.discard(future)
            self._advancing_ids.discard(job_id)

    def _advance_claimed(self, job_id: str) -> None:
        try:
            self.advance(job_id)
        except Exception:  # noqa: BLE001
            log.exception("advancing deletion job %s failed", job_id)
        finally:
            try:
                self._release(job_id)
            except Exception:  # noqa: BLE001
                log.exception("releasing deletion job %s failed", job_id)
            self._wake.set()  # a job may have become due sooner than the worker thinks

    def _release(self, job_id: str) -> None:
        """The pass on ``job_id`` is over: stop renewing its lease and free it, only if it
        is still ours (store.claim)."""
        with self._lease_lock:
            lease = self._leases.pop(job_id, None)
            self._stepped.pop(job_id, None)
            self._stalled.discard(job_id)
            if lease is not None and lease != _LOST:
                self.jobs.release(job_id, lease)

    # ---- this replica's clock against the database's ---------------------------------------

    def clock_disagrees(self) -> bool:
        """Whether this replica's wall clock is off the database server's by more than
        ``clock_tolerance_s`` (a quarter of the lease) beyond the measurement's uncertainty;
        measured at most every third of the lease. While it is, the replica takes no lease
        and asks for no purge (CLOCK_DISAGREES; logged at ERROR once, and again when it
        agrees). SQLite has no clock of its own (storage.sql.clock_offset): never. A failed
        measurement keeps the last verdict (a claim would fail the same way). Each
        measurement is stored (``deletion_clocks``): one off the server's clock still takes
        jobs while every other live worker is off by about the same (the server's clock is
        wrong, theirs agree), and so does a worker alone."""
        checked = self._clock_checked_at
        if checked is not None and time.monotonic() - checked < self.lease_s / 3.0:
            return self._clock_off
        self._clock_checked_at = time.monotonic()
        try:
            measured = sql.clock_offset(self.jobs.db, self._wall)
        except Exception:  # noqa: BLE001 - the database is unreachable: so are its leases
            return self._clock_off
        if measured is None:
            return False
        offset, uncertainty = measured
        CLOCK_OFFSET.set(offset)
        off = abs(offset) - uncertainty > self.clock_tolerance_s
        try:
            others = self.jobs.record_clock(self._worker_id, offset, self._wall() - offset, 3.0 * self.lease_s)
        except Exception:  # noqa: BLE001 - as a failed measurement
            return self._clock_off
        self._clock_measured += 1
        peers_agree = all(abs(o - offset) <= self.clock_tolerance_s + uncertainty for o in others)
        # Every live worker (or this one alone) off the server's clock by the same amount:
        # the server's clock is the odd one out, and the workers, which compare leases on
        # their own clocks, agree: they go on (session 25's drill: PostgreSQL an hour
        # behind stopped every deletion). Not on a first measurement: a worker started
        # beside this one may not have stored its own yet, so "no live peer" would let a
        # worker that is itself off go on; it waits for the next one, without a word.
        server_off = off and peers_agree
        self._ahead_of_server_s = 0.0
        if server_off and self._clock_measured > 1:
            off = False
            self._ahead_of_server_s = max(offset, 0.0)
            if not self._server_clock_warned:
                log.warning("the database server's clock is %.1f s %s every deletion worker's: they agree with "
                            "each other and go on taking jobs; set the server's clock right", abs(offset),
                            "behind" if offset > 0 else "ahead of")
                self._server_clock_warned = True
        elif off and not self._clock_off and not server_off:
            log.error("this replica's clock is %.1f s %s the database server's (more than %.1f s, a quarter of "
                      "HEARTH_DELETION_LEASE_S) and the other deletion workers': it takes no deletion job and asks "
                      "for no retention purge until they agree; set the clocks right (NTP)", abs(offset),
                      "ahead of" if offset > 0 else "behind", self.clock_tolerance_s)
        elif self._clock_off and not off:
            log.warning("this replica's clock agrees with the database server's again (%.1f s): it takes deletion "
                        "jobs again", offset)
        self._clock_off = off
        CLOCK_DISAGREES.set(1.0 if off else 0.0)
        return off

    # ---- the lease's heartbeat -----------------------------------------------------------

    def _start_heartbeat(self) -> None:
        with self._lease_lock:
            if self._heartbeat_thread is None:
                self._heartbeat_thread = threading.Thread(target=self._heartbeat, name="deletion-lease",
                                                          daemon=True)
                self._heartbeat_thread.start()

    def _heartbeat(self) -> None:
        """Renew every lease a pass of this process holds, every third of the lease, so a
        pass waiting on a slow peer (an Erase may take HEARTH_DELETION_ERASE_TIMEOUT_S, 60 s)
        never loses its job to another replica, and the lease can stay short: a holder
        killed (kill -9, a lost node) stops renewing and its job is taken over within
        ``lease_s``. Until session 21 the lease (30 s) was renewed only before each call,
        so a call longer than it let a second replica send the same Erase, and a killed
        holder's job waited out the 30 s."""
        while not self._closed.wait(self.lease_s / 3.0):
            self.renew_leases()

    def renew_leases(self) -> None:
        """One heartbeat: renew each lease held; one found taken (the holder was paused or
        cut off from the database for longer than the lease) is marked lost, so its pass
        stops before its next step. A lease whose pass has not stepped within
        ``step_limit_s`` (Erase deadline + lease: stuck outside the bounded call, e.g. a
        store call that never returns) is not renewed: it runs out and another replica
        takes the job; the pass, if it resumes, finds it lost at its next step. Until
        review21's doubt was mended, such a pass kept its job as long as the process lived."""
        now = time.monotonic()
        with self._lease_lock:
            held = [job_id for job_id, token in self._leases.items() if token != _LOST]
            stalled = [job_id for job_id in held
                       if now - self._stepped.get(job_id, now) > self.step_limit_s]
            newly_stalled = [job_id for job_id in stalled if job_id not in self._stalled]
            self._stalled.update(stalled)
        for job_id in newly_stalled:
            log.warning("job %s: its pass has not stepped for over %.0f s (Erase deadline + lease); its lease is "
                        "no longer renewed, so another worker takes the job over", job_id, self.step_limit_s)
        for job_id in held:
            if job_id in stalled:
                continue
            try:
                # Only a lease found taken now is reported: one whose pass ended (released)
                # since the list above is not (review21: it was, as a lease another took).
                if self._renewal(job_id) == "lost":
                    log.warning("job %s: its lease ran out and another worker took it; this pass stops "
                                "before its next step", job_id)
            except Exception:  # noqa: BLE001 - the next beat tries again; the lease may run out
                self.renew_failures.failed()
            else:
                self.renew_failures.succeeded()

    def _renew(self, job_id: str) -> bool:
        """Renew this process's lease on ``job_id`` from now, before a step of its pass:
        False when it is no longer ours."""
        self._step(job_id)
        return self._renewal(job_id) == "renewed"

    def _step(self, job_id: str) -> None:
        """The pass on ``job_id`` made progress: the heartbeat renews its lease again."""
        with self._lease_lock:
            if job_id in self._leases:
                self._stepped[job_id] = time.monotonic()
                self._stalled.discard(job_id)

    def _renewal(self, job_id: str) -> str:
        """``_renew``'s outcome: "renewed"; "lost" (found taken by this call); "gone" (no
        lease held: its pass released it, or it was already found lost)."""
        with self._lease_lock:
            held = self._leases.get(job_id)
            if held is None or held == _LOST:
                return "gone"
            renewed = self.jobs.renew(job_id, held, self._wall(), self.lease_s)
            self._leases[job_id] = _LOST if renewed is None else renewed
            return "lost" if renewed is None else "renewed"

    def advance(self, job_id: str) -> StoredJob:
        """Call every service that is due now, in stage order, storing each outcome.

        Runs in a span whose parent is the RequestDeletion call's (stored with the job),
        so every pass's Erase calls, retries and restarts included, join that trace."""
        stored = self.jobs.get(job_id)
        parent = telemetry.extract_context(json.loads(stored.trace_context or "{}"))
        with telemetry.safe_span(_TRACER, "deletion.advance", context=parent,
                                 attributes={"hearth.job_id": job_id}):
            return self._advance(stored)

    def _advance(self, stored: StoredJob) -> StoredJob:
        job = stored.job
        if job.terminal:
            return stored
        if job.state is JobState.PENDING:
            job = start_job(job, self._clock())
            stored = self.jobs.save(stored, job, self._next_due(job))
            self._step(job.job_id)
        erasures = dict(stored.erasures)
        while job.state is JobState.RUNNING and not self._stop.is_set():
            runnable = self._runnable(job)
            if not runnable:
                break
            for service in runnable:
                if self._stop.is_set():   # stopping: the next service waits for the restart
                    break
                # Held for the call about to start (another replica takes a job only once
                # its lease has run out); a pass whose lease ran out and was taken stops.
                if not self._hold(job.job_id):
                    log.warning("job %s: its lease ran out and another worker took it; this pass stops",
                                job.job_id)
                    return stored
                receipt_json = None
                try:
                    result, counts, already = self._erase_or_shredded(service, job)
                    # Never before the request: a receipt whose completion precedes it does
                    # not verify (receipts.py), and a job requested by a replica whose clock
                    # is ahead, or completed after a step back, failed its every attempt.
                    job = confirm_service(job, service, result, max(self._clock(), job.requested_at))
                    erasures[service] = {"deleted_counts": counts, "already_erased": already}
                    if job.state is JobState.COMPLETED:
                        receipt = build_receipt(job, receipt_id_of(job.job_id), self.key_id)
                        receipt_json = sign_receipt(receipt, self.signing_key).to_json()
                except _WaitForHousehold as wait:
                    log.info("job %s: %s", job.job_id, wait.reason)
                    job = fail_service(job, service, wait.reason, self._clock(), self.policy, wait_until=wait.until,
                                       waiting_for=wait.job_id)
                except Exception as exc:  # noqa: BLE001 - classified: retry or fail the job
                    log.warning("job %s: erase in %s failed: %s", job.job_id, service, _describe(exc))
                    job = fail_service(job, service, _describe(exc), self._clock(), self.policy,
                                       retryable=_retryable(exc))
                stored = self.jobs.save(stored, job, self._next_due(job), erasures, receipt_json)
                self._step(job.job_id)
                if job.state is not JobState.RUNNING:
                    break
        if job.state is JobState.COMPLETED:
            JOBS_FINISHED.labels("completed").inc()
            self._audit_done(stored)
        elif job.state is JobState.FAILED:
            JOBS_FINISHED.labels("failed").inc()
            self._audit_failed(stored)
        return stored

    def _hold(self, job_id: str) -> bool:
        """Renew this pass's lease on ``job_id`` from now: False when it is no longer ours.
        A pass that did not claim the job (``advance`` called directly by a tool or a test)
        holds it the way it always did."""
        with self._lease_lock:
            claimed = job_id in self._leases
        if not claimed:
            self.jobs.extend_lease(job_id, self._wall(), self.lease_s)
            return True
        return self._renew(job_id)

    def _stage(self, job: DeletionJob) -> tuple[str, ...]:
        for stage in stages_for(job.scope):
            open_ = tuple(s for s in stage if s in job.services
                          and job.services[s].status is not ServiceStatus.CONFIRMED)
            if open_:
                return open_
        return ()

    def _runnable(self, job: DeletionJob) -> list[str]:
        due = set(due_services(job, self._clock(), timedelta(seconds=self.future_bound_s)))
        return [s for s in self._stage(job) if s in due]

    def _next_due(self, job: DeletionJob) -> datetime | None:
        if job.terminal:
            return None
        if job.state is JobState.PENDING:
            return job.requested_at
        times = [job.services[s].next_attempt_at for s in self._stage(job)
                 if job.services[s].next_attempt_at is not None]
        return min(times) if times else self._clock()

    def _erase(self, service: str, job: DeletionJob) -> tuple[ServiceDeletion, dict[str, int], bool]:
        if service == "privacy":
            ids, local_purges = self._erase_local(job)
            # data key versions and the digest key (session 27) are counted apart
            digest = sum(i.startswith("digest_key:") for i in ids)
            counts = {k: n for k, n in (("data_keys", len(ids) - digest), ("digest_keys", digest)) if n}
            purges = tuple({**p, "at": format_ts(datetime.fromtimestamp(p["at"], UTC))} for p in local_purges)
            return ServiceDeletion(len(ids), ids_digest(ids).hex(), purges), counts, not ids
        result = self.peers.erase(service, erasure.scope_to_pb(job.scope), job.job_id)
        counts = {k: int(v) for k, v in sorted(result.deleted_counts.items()) if v}
        purges = tuple({"store": p.store, "where": p.location, "action": p.action,
                        "at": format_ts(datetime.fromtimestamp(p.at.seconds + p.at.nanos / 1e9, UTC)),
                        "complete": p.complete} for p in result.purges)
        return (ServiceDeletion(sum(counts.values()), result.deleted_ids_sha256.hex(), purges), counts,
                bool(result.already_erased))

    def _erase_or_shredded(self, service: str, job: DeletionJob) -> tuple[ServiceDeletion, dict[str, int], bool]:
        """``_erase``, with the one rule for a scope whose household was crypto-shredded
        meanwhile: a peer answers FAILED_PRECONDITION (the stores' answer when the household's
        data key is destroyed) for a device, person or window scope of a household whose key
        IS destroyed. Its data there opens under no key, but the household's own job (the
        only thing that shreds a key, HOUSEHOLD_STAGES) has still to erase its rows, and
        what a store keeps in the clear (account, device and session ids, timestamps) is
        readable until it does. So the step is confirmed ``already_erased`` (count 0) only
        once a household job of the account has CONFIRMED this service: the receipt, signed
        when the last step confirms, then claims nothing that has not happened. While a
        household job is still open the step waits for it (``_WaitForHousehold``: tried
        again when that job is next due, not counted as a failed attempt; its last_error
        names the job); with none open and none that erased this service (it failed) the
        refusal fails the job, as any FAILED_PRECONDITION does — nothing vouches for the
        erasure. Until session 34 such a job ended ``failed`` at once (attack34); in session
        34 the step was confirmed at once, before the household job had erased that store's
        unencrypted ids (review34 N6; tests/e2e/test_erasure_after_shred_e2e.py). Waiting
        rather than naming the household job in the receipt: a receipt is a claim about
        this job's scope at its signing, and a step confirmed only after the household job
        confirmed the service is true when signed without a new receipt field. A household
        scope is not covered: its own rows are what nobody else erases."""
        try:
            return self._erase(service, job)
        except grpc.RpcError as exc:
            scope = job.scope
            if (service == "privacy" or scope.kind == "household" or scope.all_accounts or self.keys is None
                    or not isinstance(exc.code(), grpc.StatusCode)
                    or exc.code() is not grpc.StatusCode.FAILED_PRECONDITION
                    or not self.keys.is_shredded(scope.account_id)):
                raise
            households = [s.job for s in self.jobs.for_account(scope.account_id)
                          if s.job.scope.kind == "household"]
            done = next((h for h in households if service in h.services
                         and h.services[service].status is ServiceStatus.CONFIRMED), None)
            if done is not None:
                log.warning("job %s: %s refused the erase (%s): the household's data key is destroyed and "
                            "household job %s erased %s: confirmed as already erased", job.job_id, service,
                            _describe(exc), done.job_id, service)
                return ServiceDeletion(0, ids_digest(()).hex(), ()), {}, True
            open_ = [h for h in households if not h.terminal]
            if not open_:
                raise
            first = min(open_, key=lambda h: h.requested_at)
            due = self._next_due(first) or self._clock()
            raise _WaitForHousehold(
                f"waiting for household job {first.job_id} to erase {service} (the household's data key is "
                f"destroyed; {service} refused: {_describe(exc)})",
                max(due, self._clock()) + timedelta(seconds=HOUSEHOLD_WAIT_MARGIN_S), first.job_id) from exc

    def _erase_local(self, job: DeletionJob) -> tuple[list[str], list[dict]]:
        """The privacy service's own part: its cached copies of the scope (consent
        answers) go, and a household deletion crypto-shreds the data key (before the
        other services erase: HOUSEHOLD_STAGES). Returns the ids of the destroyed keys
        and the purge steps (epoch ``at``) for the receipt."""
        scope = job.scope
        purges: list[dict] = []
        if self._on_local_erase is not None:
            cache_purge = self._on_local_erase(scope)
            if cache_purge:
                purges.append(dict(cache_purge))
        if scope.kind != "household" or self.keys is None:
            return [], purges
        ids = self.keys.shred(scope.account_id, purges)
        if ids:
            self._audit(audit.KEY_DESTROYED, job, details={"job_id": job.job_id, "keys": len(ids)})
        return ids, purges

    # ---- retention -----------------------------------------------------------------------

    def retention_scope(self, now: float) -> tuple[ErasureScope, str]:
        """The purge of the check period containing ``now``: everything older than
        (period start - retention), with a request id naming the period."""
        period = int(now // self.retention_check_s)
        cutoff = period * self.retention_check_s - self.retention_days * 86400.0
        return ErasureScope(ALL_ACCOUNTS, "window", end=cutoff), f"retention:{period}"

    def maybe_request_retention(self, now: float | None = None) -> StoredJob | None:
        if self.retention_check_s <= 0:
            return None
        now = self._wall() if now is None else now
        if int(now // self.retention_check_s) == self._retention_period:
            return None
        if self.clock_disagrees():   # asked for again at the next loop once it agrees
            return None
        # Exempted from the clock check while ahead of the database server's: the purge goes
        # by the earlier clock, the server's. A replica alone cannot tell which clock is
        # wrong, and a purge late by the offset keeps data a while longer, where one by a
        # clock a year ahead erased a day within the retention at each check, run by the
        # right replica once back (review25; test_deletion_clock_behind.py).
        now -= self._ahead_of_server_s
        if int(now // self.retention_check_s) == self._retention_period:
            return None
        scope, request_id = self.retention_scope(now)
        previous = self.jobs.last_retention_end(RETENTION_REASON, stamped_by=now + self.future_bound_s)
        # A day, or two check periods when longer: a purge that fell behind catches up at
        # least a check period per check (review24: with a check a day or longer, a cap of
        # a day never caught up after privacy was stopped, or fell behind at every check).
        max_advance = max(self.retention_max_advance_s, 2.0 * self.retention_check_s)
        if previous is not None and scope.end > previous + max_advance:
            # A purge never erases more than a day's data past the previous one's: the
            # clock may have stepped forward (a year's step erased everything at once).
            held = previous + max_advance
            RETENTION_HELD_BACK.inc()
            log.error("retention purge held back: this replica's clock (%s) would erase everything older than %s, "
                      "%.1f days past the previous purge's end; erasing up to %s only. If the clock is right "
                      "(privacy was stopped, or HEARTH_RETENTION_DAYS lowered) the purge catches up at "
                      "every check; if not, set the clock right", format_ts(datetime.fromtimestamp(now, UTC)),
                      format_ts(datetime.fromtimestamp(scope.end, UTC)), (scope.end - previous) / 86400.0,
                      format_ts(datetime.fromtimestamp(held, UTC)))
            scope = ErasureScope(ALL_ACCOUNTS, "window", end=held)
        # One purge a period, held back or not: its request id names the period alone, so a
        # replica asking after another's purge of the period was stored (its previous end
        # now that purge's) gets that purge. Until session 25 a held-back purge had an id of
        # its own (``retention:<period>:held``): a second replica reading the first's end as
        # the previous one asked for the period's unheld purge, up to two caps past the
        # previous end in one check (tests/integration/test_retention_replicas.py).
        try:
            stored = self.request(scope, request_id, RETENTION_REASON, identity.service_principal("privacy"))
        except AlreadyExists:
            stored = self.jobs.by_request(request_id)
        self._retention_period = int(now // self.retention_check_s)
        return stored

    # ---- audit ---------------------------------------------------------------------------

    def _audit(self, event_type: str, job: DeletionJob, outcome: str = audit.SUCCESS,
               details: dict[str, Any] | None = None) -> None:
        try:
            principal = identity.Principal(job.principal, identity.Role(job.role))
            audit.record(event_type, audit.household_resource(job.scope.account_id), outcome,
                         details or {}, principal=principal)
        except Exception:  # noqa: BLE001 - auditing must not break the job
            log.exception("audit of %s failed", event_type)

    def _audit_done(self, stored: StoredJob) -> None:
        job = stored.job
        total = sum(p.result.count for p in job.services.values() if p.result)
        event = audit.RETENTION_PURGE if stored.reason == RETENTION_REASON else audit.DELETION_COMPLETED
        self._audit(event, job, details={"job_id": job.job_id, "receipt_id": receipt_id_of(job.job_id),
                                         "scope": job.scope.kind.value, "records": total})

    def _audit_failed(self, stored: StoredJob) -> None:
        job = stored.job
        failed = sorted(s for s, p in job.services.items() if p.status is ServiceStatus.FAILED)
        self._audit(audit.DELETION_FAILED, job, audit.FAILURE,
                    {"job_id": job.job_id, "services": ",".join(failed)})


# ---- export --------------------------------------------------------------------------------

EXPORT_SCHEMA = "hearth-household-export"
EXPORT_VERSION = 1




def export_household(account_id: str, peers: Peers, jobs: DeletionJobStore, keys: KeyService | None,
                     consent: Mapping[str, Any], now: datetime | None = None) -> Iterator[bytes | str]:
    """Everything Hearth holds about a household (schema: docs/privacy.md §9), as the
    pieces of its JSON text, in order, each data holder's part forwarded as it arrives
    and never held whole.

    All or nothing, when streamed: every holder's stream is opened and its first chunk
    received before the first piece is given (a holder that cannot answer fails the
    export before any byte: UNAVAILABLE); a holder that fails part-way, or whose part does
    not match its completion marker, raises there, and the document is then left
    unclosed — it is valid JSON, ending ``"v": 1, "complete": true}``, only when every part
    arrived whole. A deletion of the household that is pending or running refuses the
    export (FAILED_PRECONDITION); one that ran while the export was read (a job created
    or advanced meanwhile) fails it before the document is closed (ABORTED: export again),
    since the parts may then disagree (docs/privacy.md §9, "Streaming")."""
    before = _jobs_seen(jobs, account_id)
    running = [job_id for job_id, state in before if state["state"] in (JobState.PENDING, JobState.RUNNING)]
    if running:
        raise FailedPrecondition(f"a deletion of this household is in progress (job {running[0]}); "
                                 "export once it has completed", "account_id")
    services = sorted(PEER_SERVICES)   # the document's key order (sorted, as json.dumps(sort_keys=True))
    opened: list[Iterator[bytes]] = []
    try:
        yield from _export_pieces(account_id, services, opened, peers, jobs, keys, consent, before, now)
    finally:
        for part in opened:   # each holder's call ends with the export, whole or not
            close = getattr(part, "close", None)
            if close is not None:
                close()


def _export_pieces(account_id: str, services: list[str], opened: list[Iterator[bytes]], peers: Peers,
                   jobs: DeletionJobStore, keys: KeyService | None, consent: Mapping[str, Any],
                   before: list[tuple[str, dict[str, Any]]], now: datetime | None) -> Iterator[bytes | str]:
    parts: dict[str, Iterator[bytes]] = {}
    for service in services:
        part = peers.export(service, account_id)
        opened.append(part)
        try:
            first = next(part, b"")
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"{service} is unavailable; no partial export is given", "account_id") from None
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:   # streaming its most exports (export_stream.bounded)
                raise ResourceExhausted(f"{service} is streaming its most exports at once; retry when one has "
                                        "finished", "account_id") from None
            raise
        parts[service] = itertools.chain([first], part)
    when = (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    yield (f'{{"account_id": {json.dumps(account_id)}, "generated_at": {json.dumps(when)}, '
           f'"schema": {json.dumps(EXPORT_SCHEMA)}, "services": {{')
    for i, service in enumerate(services):
        yield f'{", " if i else ""}{json.dumps(service)}: '
        try:
            yield from parts.pop(service)
        except grpc.RpcError as exc:
            # After the first byte: the HTTP status is sent, so the only honest answer is an
            # unfinished document (the gateway drops the connection before its end).
            raise Unavailable(f"{service} failed part-way through its export ({exc.code().name}); "
                              "no export is given", "account_id") from None
    after = _jobs_seen(jobs, account_id)
    if after != before:
        changed = next(job_id for job_id, state in after if (job_id, state) not in before)
        raise Conflict(f"a deletion of this household (job {changed}) ran while it was exported; the parts may "
                       "disagree, so no export is given: export again", "account_id")
    privacy = {
        "consent": dict(consent),
        "deletion_jobs": [{"request_id": s.request_id, "reason": s.reason, "job": _job_json(s.job),
                           "receipt": json.loads(s.receipt_json) if s.receipt_json else None}
                          for s in jobs.for_account(account_id)],
        "data_keys": keys.metadata(account_id) if keys is not None else [],
    }
    yield ', "privacy": '
    yield from export_stream.json_pieces(privacy)
    yield f'}}, "v": {EXPORT_VERSION}, "complete": true}}'


def _jobs_seen(jobs: DeletionJobStore, account_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The account's deletion jobs as the export compares them before and after."""
    return [(s.job.job_id, _job_json(s.job)) for s in jobs.for_account(account_id)]


def _job_json(job: DeletionJob) -> dict[str, Any]:
    from services.privacy.deletion.domain import job_to_dict

    return job_to_dict(job)


def retry_policy(base_s: float, max_s: float, attempts: int) -> RetryPolicy:
    return RetryPolicy(base_delay=timedelta(seconds=base_s), max_delay=timedelta(seconds=max(max_s, base_s)),
                       max_attempts=attempts)
