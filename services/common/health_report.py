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
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import Gauge

log = logging.getLogger("hearth.health")
REASON_KEY = "hearth-health-reason"
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


def run_checks(items: list[Check]) -> tuple[bool, list[str]]:
    """(serving, reasons) after running each probe once."""
    serving, reasons = True, []
    for check in items:
        try:
            reason = check.probe()
        except Exception as exc:  # noqa: BLE001 - a probe that raises is a failing dependency
            reason = f"{type(exc).__name__}: {exc}"[:200]
        DEPENDENCY_UP.labels(check.name).set(0 if reason else 1)
        if reason:
            reasons.append(f"{check.name}: {reason}")
            serving = serving and not check.critical
    return serving, reasons


class ReportingHealthServicer(health.HealthServicer):
    """The standard health service, plus the reasons as trailing metadata."""

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=True)
        self._trailing: tuple[tuple[str, str], ...] = ()

    def set_reasons(self, reasons: list[str]) -> None:
        """``reasons`` as ``run_checks`` gives them: "<check name>: <why>" each."""
        self._trailing = (((REASON_KEY, "; ".join(reasons)),
                           (FAILING_KEY, "; ".join(r.split(": ", 1)[0] for r in reasons))) if reasons else ())

    def Check(self, request, context):  # noqa: N802 - gRPC method name
        trailing = self._trailing
        if trailing:
            context.set_trailing_metadata(trailing)
        return super().Check(request, context)


class DependencyMonitor:
    """Runs the registered checks every ``interval_s`` and publishes them (see module)."""

    def __init__(self, servicer: ReportingHealthServicer, service_names: list[str], interval_s: float = 2.0) -> None:
        self._servicer = servicer
        self._names = ["", *service_names]
        self._interval = interval_s
        self._stop = threading.Event()
        self._last: tuple[bool, list[str]] = (True, [])
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)

    def start(self) -> "DependencyMonitor":
        self._thread.start()
        return self

    def check_once(self) -> tuple[bool, list[str]]:
        serving, reasons = run_checks(checks())
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
