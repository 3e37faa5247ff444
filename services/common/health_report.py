"""What a service's health says about its dependencies (docs/operations.md, "Outages").

Storage and cache factories (``open_database``, ``open_cache``) and the bootstrap (the
peer services) register a *check* here: a function answering "" when the dependency
works, else the reason. ``DependencyMonitor`` runs every check every ``interval_s`` on
its own thread (never on the request path) and publishes the result on the standard
gRPC health service:

* a *critical* dependency failing (the database: nothing can be answered without it)
  sets the service NOT_SERVING;
* any other (Redis: the SQL store answers instead; peers: only the features that need
  them fail) leaves it SERVING but *degraded*;
* either way the reasons travel as the trailing metadata ``hearth-health-reason`` of
  every ``Health/Check`` answer, e.g. ``peer privacy: 10.0.3.7:50053 unreachable
  (UNAVAILABLE)``, and the names of the failing checks alone as ``hearth-health-failing``
  (``peer privacy``).

Who reads which: a service's gRPC health is open (no principal: kubelet probes and the
gateway ask it), but only what may connect to its gRPC port can ask — its callers in the
mesh (NetworkPolicy; client certificates under mutual TLS), never a client of the API
(the Envoy edge routes only Hearth's own services). The full reasons, which name internal
addresses and carry driver text, are for those operators (and the services' logs). The
gateway's ``/health`` is public — unauthenticated, reachable through the ingress — so it
shows only the failing checks' names (gateway/clients.py).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import Gauge

log = logging.getLogger("hearth.health")
REASON_KEY = "hearth-health-reason"
MAX_REASON_CHARS = 1000   # per check, in the trailing metadata (_metadata_text)
FAILING_KEY = "hearth-health-failing"   # the failing checks' names only: safe to show anyone
# The health service name kubelet's liveness and startup probes ask (the chart's
# ``grpc: {port, service: liveness}``): SERVING from the moment the server listens until
# the process exits, whatever the dependencies say. Liveness asks "is this process
# alive and answering?" — never "can it serve?" (that is readiness, the "" status): with
# liveness on "", a PostgreSQL outage longer than the liveness window (3 x 10 s) set
# every service NOT_SERVING and kubelet restarted every service pod, which cannot help
# and turns a database blip into a restart storm (session 20). A process too hung to
# answer a health call still fails it.
LIVENESS_SERVICE = "liveness"
DEPENDENCY_UP = Gauge("hearth_dependency_up", "1 when the dependency answered its last health check",
                      ["dependency"])


@dataclass(frozen=True)
class Check:
    name: str
    probe: Callable[[], str]
    critical: bool


_checks: dict[str, Check] = {}
_lock = threading.Lock()


def register(name: str, probe: Callable[[], str], *, critical: bool = False) -> None:
    """Add (or replace) the check ``name``; ``probe()`` returns "" or why it fails."""
    with _lock:
        _checks[name] = Check(name, probe, critical)


def checks() -> list[Check]:
    with _lock:
        return list(_checks.values())


def clear() -> None:
    with _lock:
        _checks.clear()


# How long one check may take before it counts as failing ("no answer in N s"). Above
# the database pool's own wait (storage.sql.POOL_WAIT_S, 3 s), so a busy but healthy pool
# is not reported as failing; the peers' (1 s) and Redis's (0.5 s) probes end well before.
CHECK_TIMEOUT_S = 5.0


def _probe_reason(check: Check) -> str:
    try:
        return check.probe()
    except Exception as exc:  # noqa: BLE001 - a probe that raises is a failing dependency
        return f"{type(exc).__name__}: {exc}"[:200]


def _publish(results: list[tuple[Check, str]]) -> tuple[bool, list[str]]:
    serving, reasons = True, []
    for check, reason in results:
        DEPENDENCY_UP.labels(check.name).set(0 if reason else 1)
        if reason:
            reasons.append(f"{check.name}: {reason}")
            serving = serving and not check.critical
    return serving, reasons


def run_checks(items: list[Check]) -> tuple[bool, list[str]]:
    """(serving, reasons) after running each probe once, one after the other, each for
    as long as it takes (tools and tests; the monitor bounds them, see DependencyMonitor)."""
    return _publish([(check, _probe_reason(check)) for check in items])


def _metadata_text(text: str) -> str:
    """``text`` as a legal gRPC metadata value: printable ASCII on one line. A reason is
    driver text — PostgreSQL's DiskFull has a second line ("HINT:  Check free disk
    space."), a path or a peer's message may be non-ASCII — and one illegal character
    made every Check fail (DEADLINE_EXCEEDED at the caller: the gateway and the peers saw
    the service unreachable, a kubelet probe would fail) while the check failed (session
    25's full PostgreSQL volume, tests/integration/test_health_reasons.py). At most
    ``MAX_REASON_CHARS`` each: the receiving side refuses metadata at random above 8 KiB,
    always above 16 KiB (a service has at most six checks: ~6 KB)
    (RESOURCE_EXHAUSTED), so one long driver message would fail every Check the same way."""
    text = " ".join(re.sub(r"[^\x20-\x7e]", "?", part) for part in text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


class ReportingHealthServicer(health.HealthServicer):
    """The standard health service, plus the reasons as trailing metadata."""

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=True)
        self._trailing: tuple[tuple[str, str], ...] = ()

    def set_reasons(self, reasons: list[str]) -> None:
        """``reasons`` as ``run_checks`` gives them: "<check name>: <why>" each."""
        reasons = [_metadata_text(r) for r in reasons]
        self._trailing = (((REASON_KEY, "; ".join(reasons)),
                           (FAILING_KEY, "; ".join(r.split(": ", 1)[0] for r in reasons))) if reasons else ())

    def Check(self, request, context):  # noqa: N802 - gRPC method name
        trailing = self._trailing
        if trailing:
            context.set_trailing_metadata(trailing)
        return super().Check(request, context)


class DependencyMonitor:
    """Runs the registered checks every ``interval_s`` and publishes them (see module).

    Each check runs on a daemon thread of its own and gets ``check_timeout_s``: one still
    running then is a failing dependency ("no answer in N s"), and is not started again
    until it returns (at most one probe per check in flight, so a hung dependency holds
    one thread, never a growing number). Until session 20 the checks ran on the monitor's
    own thread without a bound: with PostgreSQL hung (its processes stopped, a storage
    freeze, a network path dropping packets) the database probe's ``SELECT 1`` waited on
    its socket for as long as the hang lasted, the monitor never published again, and
    every service said SERVING (``hearth_dependency_up{dependency="database"}`` 1, the
    gateway's /health SERVING, kubelet's readiness passing) while every request needing
    the database failed (tests/e2e/test_outages_e2e.py)."""

    def __init__(self, servicer: ReportingHealthServicer, service_names: list[str], interval_s: float = 2.0,
                 check_timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self._servicer = servicer
        self._names = ["", *service_names]
        self._interval = interval_s
        self._check_timeout = check_timeout_s
        self._stop = threading.Event()
        self._last: tuple[bool, list[str]] = (True, [])
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        self._in_flight: dict[str, tuple[Future, float]] = {}

    def start(self) -> "DependencyMonitor":
        self._thread.start()
        return self

    def _run_bounded(self, items: list[Check]) -> tuple[bool, list[str]]:
        now = time.monotonic()
        running: list[tuple[Check, Future, float]] = []
        for check in items:
            future, started = self._in_flight.get(check.name, (None, now))
            if future is None or future.done():
                if self._stop.is_set():   # the server is stopping: nothing to publish, no new probe
                    return self._last
                future, started = _probe_on_daemon_thread(check), now
                self._in_flight[check.name] = (future, started)
            running.append((check, future, started))
        for _, future, started in running:   # they run at once: waiting in turn costs nothing
            left = started + self._check_timeout - time.monotonic()
            if left > 0:
                futures_wait([future], timeout=left)
        results = []
        for check, future, started in running:
            if future.done():
                results.append((check, future.result()))
            else:
                results.append((check, f"no answer in {time.monotonic() - started:.0f} s"))
        return _publish(results)

    def check_once(self) -> tuple[bool, list[str]]:
        serving, reasons = self._run_bounded(checks())
        if self._stop.is_set():
            return serving, reasons   # stopping: NOT_SERVING was set by the server, keep it
        if (serving, reasons) != self._last:
            log.warning("health: %s%s", "SERVING" if serving else "NOT_SERVING",
                        f" (degraded: {'; '.join(reasons)})" if reasons else "")
        self._last = (serving, reasons)
        self._servicer.set_reasons(reasons)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._names:
            self._servicer.set(name, status)
        return serving, reasons

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_once()

    def stop(self) -> None:
        self._stop.set()


def _probe_on_daemon_thread(check: Check) -> Future:
    """Run ``check`` on a daemon thread of its own; its reason arrives in the Future. A
    daemon thread, not a ThreadPoolExecutor's: the interpreter joins an executor's threads
    at exit, so a probe hung on its dependency (a stopped PostgreSQL's socket) kept a
    SIGTERM'd service from exiting for as long as the hang lasted (review20: attribution,
    privacy and feedback still running 60 s after SIGTERM; tests/e2e/test_outages_e2e.py).
    At most one a check is in flight (DependencyMonitor._run_bounded)."""
    future: Future = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        future.set_result(_probe_reason(check))

    threading.Thread(target=run, name=f"health-check {check.name}", daemon=True).start()
    return future


def peer_probe(address: str, timeout_s: float = 1.0) -> Callable[[], str]:
    """A probe asking a peer service's gRPC health (over the same kind of channel the
    service's own clients use)."""
    from grpc_health.v1 import health_pb2_grpc

    from services.common import tls

    # The clients' channel options: without them a peer that was down is retried up to
    # gRPC's default 120 s apart, and health said "failing" that long after it came back.
    channel = tls.channel(address, options=tls.channel_options())
    stub = health_pb2_grpc.HealthStub(channel)

    def probe() -> str:
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"{address} unreachable ({exc.code().name})"
        return "" if r.status == health_pb2.HealthCheckResponse.SERVING else f"{address} not serving"

    return probe
