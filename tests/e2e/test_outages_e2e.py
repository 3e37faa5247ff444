"""Outages ridden out, each a fault test through real processes (docs/operations.md,
"Outages"): the mesh runs as its own processes on a PostgreSQL cluster and a
redis-server that this module starts itself, so it can kill and restart them.

* Redis killed under load: reads and assignments keep answering from PostgreSQL (no
  5xx), health says "redis" is degraded, and Redis is used again once it is back.
* The privacy service (the audit log) down: nothing audited meanwhile is lost; the
  records wait in the services' disk outboxes and arrive after its restart.
* PostgreSQL restarted: requests during the restart get 503 with Retry-After (never
  another 5xx), the pools reconnect, and every acknowledged event is stored.
* A service down: the gateway stays ready and keeps serving the other services' routes
  (tests/e2e/test_mesh.py::test_sigterm_drains_and_restart_keeps_data).
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from services.common.server import STOP_CLOSE_MARGIN_S
from services.testing.mesh import SERVICE_MODULES, running_mesh
from services.testing.servers import MissingServer, PostgresServer, RedisServer
from tests.helpers.waiting import SLOW_MACHINE_S, retry_after_503, wait_for
from tests.helpers.timestamps import iso_utc as _iso

RUN = uuid.uuid4().hex[:6]
# The services' drain grace: no test here SIGTERMs a service with calls under way, and the
# last one waits out grace + 3 s for the closers stuck on a frozen PostgreSQL (10 s would
# cost 6 s more of the suite).
GRACE_S = 4.0
DAY = 86400.0


@pytest.fixture(scope="module")
def servers():
    """This module's own PostgreSQL and Redis (the tests stop and restart them)."""
    try:
        pg, rd = PostgresServer(), RedisServer()
    except MissingServer as exc:
        pytest.fail(str(exc))
    pg.init().start()
    rd.start()
    yield pg, rd
    rd.kill()
    pg.remove()


@pytest.fixture(scope="module")
def omesh(servers, tmp_path_factory):
    pg, rd = servers
    base = tmp_path_factory.mktemp("outages")
    # The rate limiter off: these tests count the statuses requests get during an outage, and
    # on an idle machine the loops below send fast enough to draw 429s, which are not the
    # behaviour under test (the limiter has its own tests).
    env = {"HEARTH_STORAGE": "postgres", "HEARTH_POSTGRES_DSN": pg.dsn, "HEARTH_REDIS_URL": rd.url,
           "HEARTH_RETENTION_CHECK_S": "0", "HEARTH_HEALTH_CHECK_INTERVAL_S": "0.5",
           "HEARTH_RATE_LIMIT_ENABLED": "false", "HEARTH_GRACE_SECONDS": str(GRACE_S)}
    with running_mesh(base, {"olivia": "admin"}, timeout_s=SLOW_MACHINE_S, extra_env=env) as m:
        yield m


@pytest.fixture
def client(omesh):
    # The last test stops the services (SIGTERM with PostgreSQL hung); a test run after it
    # gets them back, healthy.
    stopped = [name for name in SERVICE_MODULES if name not in omesh.processes]
    for name in stopped:
        omesh.start_service(name)
    if stopped:
        omesh.wait_healthy(SLOW_MACHINE_S)
    with httpx.Client(base_url=omesh.url, headers={"X-API-Key": omesh.api_key}, timeout=30) as c:
        yield c


def post_events(client, account: str, n: int, start: float, prefix: str) -> httpx.Response:
    return client.post("/v1/events", json={"events": [{
        "event_id": f"{prefix}-{i}", "account_id": account, "device_id": "tv", "device_type": "tv",
        "ts": _iso(start + i * 3 * 3600), "kind": "play_start", "title_id": "t", "genres": ["drama"],
        "duration_s": 1800, "maturity": "adult"} for i in range(n)]})


def test_redis_down_reads_and_assigns_fall_back_to_the_sql_store_and_redis_is_used_again(servers, omesh, client):
    import redis

    _, rd = servers
    account = f"out-redis-{RUN}"
    assert post_events(client, account, 12, time.time() - 5 * DAY, account).status_code == 200
    session = client.get(f"/v1/household/{account}").json()["sessions"][0]["session_id"]
    assert client.post("/v1/assign", json={"account_id": account, "session_id": session}).status_code == 200
    wait_for(lambda: redis.Redis(port=rd.port).exists(f"hearth:clustering:model:{account}"), what="cached model")

    rd.kill()
    try:
        statuses: list[int] = []
        degraded = None
        # At least 6 s and 20 requests with Redis down (a loaded machine answers slower).
        t_end, hard_end = time.monotonic() + 6, time.monotonic() + SLOW_MACHINE_S
        while (time.monotonic() < t_end or len(statuses) < 20) and time.monotonic() < hard_end:
            statuses.append(client.get(f"/v1/household/{account}").status_code)
            statuses.append(client.post("/v1/assign", json={"account_id": account, "session_id": session}).status_code)
            health = client.get("/health").json()
            if "redis" in health["reasons"].get("clustering", ""):
                degraded = health
        assert len(statuses) >= 20
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert degraded is not None and degraded["status"] == "DEGRADED", degraded
        assert degraded["services"]["clustering"] == "SERVING"   # degraded, still serving
    finally:
        # Empty, on the same port; also when an assertion failed, so that the module's
        # other tests do not start on a mesh whose Redis is gone.
        rd.start()
    wait_for(lambda: client.get("/health").json()["status"] == "SERVING", what="health back to SERVING")
    assert client.post("/v1/assign", json={"account_id": account, "session_id": session}).status_code == 200
    wait_for(lambda: redis.Redis(port=rd.port).exists(f"hearth:clustering:model:{account}"),
             what="the model cached in Redis again")


def test_audit_records_wait_in_the_disk_outbox_while_privacy_is_down_and_none_is_lost(omesh, client):
    account = f"out-audit-{RUN}"
    assert post_events(client, account, 3, time.time() - 2 * DAY, account).status_code == 200
    assert client.get(f"/v1/household/{account}").status_code == 200   # data key cached (<= 60 s)

    omesh.stop_process("privacy")
    # A route of the stopped service: 503 + Retry-After, and gRPC's transport text (which
    # names the service's internal address) is not passed on to the client.
    down = client.put(f"/v1/consent/{account}", json={"processing": True, "attribution": True})
    assert down.status_code == 503 and down.headers["retry-after"].isdigit(), down.text
    assert f":{omesh.grpc_ports['privacy']}" not in down.text and "ipv4" not in down.text, down.text
    reads = 0
    t_end = time.monotonic() + 8   # far beyond the ~3 s after which records used to be dropped
    while time.monotonic() < t_end:
        assert client.get(f"/v1/household/{account}").status_code == 200
        reads += 1
        time.sleep(0.1)
    outbox = omesh.data_dir / "audit-outbox-clustering.db"
    assert outbox.exists()
    # /health answers anyone (no credentials, and it is behind the ingress): it names the
    # failing check ("peer privacy: failing") but not the peer's address and port, which
    # the services' own reasons carry for the operators (until session 18 it passed
    # "peer privacy: 127.0.0.1:<port> unreachable (UNAVAILABLE)" on to anyone).
    health = wait_for(lambda: (lambda h: h if "peer privacy" in h.text else None)(
        httpx.get(omesh.url + "/health", timeout=10)), what="/health naming the privacy peer")
    assert health.status_code == 200 and health.json()["status"] == "DEGRADED", health.text
    assert "peer privacy: failing" in health.json()["reasons"]["clustering"], health.text
    assert f":{omesh.grpc_ports['privacy']}" not in health.text and "127.0.0.1" not in health.text, health.text
    omesh.start_service("privacy")
    omesh.wait_healthy(SLOW_MACHINE_S)

    def audited() -> list[dict]:
        r = client.get("/v1/audit", params={"resource_prefix": f"household:{account}",
                                            "event_type": "read_household", "limit": 10_000})
        assert r.status_code == 200, r.text
        records = r.json()["records"]
        return records if len(records) >= reads + 1 else []

    records = wait_for(audited, what="the spooled audit records")
    assert len(records) == reads + 1   # every read, once (idempotent record ids)
    assert len({r["seq"] for r in records}) == len(records)


def test_postgres_restart_requests_get_503_with_retry_after_and_nothing_acknowledged_is_lost(servers, omesh, client):
    pg, _ = servers
    account = f"out-pg-{RUN}"
    assert post_events(client, account, 1, time.time() - 3 * DAY, f"{account}-warm").status_code == 200
    acknowledged, refused, other = [], [], []
    start = time.time() - 3 * DAY + 3600

    def one(i: int) -> None:
        r = post_events(client, account, 1, start + i * 4 * 3600, f"{account}-{i}")
        if r.status_code == 200:
            acknowledged.append(f"{account}-{i}-0")
        elif r.status_code == 503 and r.headers.get("retry-after", "").isdigit():
            refused.append(i)
        else:
            other.append((r.status_code, r.text))

    i = 0
    for _ in range(5):
        one(i)
        i += 1
    pg.stop()
    down_until = time.monotonic() + 3
    while time.monotonic() < down_until:
        one(i)
        i += 1
        time.sleep(0.05)
    pg.start()
    # Each service's pool reconnects with backoff (psycopg_pool: 1 s, doubling); on a
    # loaded machine that and PostgreSQL's own start-up take a while.
    recovered = time.monotonic() + SLOW_MACHINE_S
    while time.monotonic() < recovered:
        one(i)
        i += 1
        if len(acknowledged) >= 10 and acknowledged[-1] == f"{account}-{i - 1}-0":
            break
        time.sleep(0.1)
    assert other == [], other[:3]
    assert refused, "no request met the restart"
    assert acknowledged[-1] == f"{account}-{i - 1}-0", "the service did not recover"
    # The export reads every service's store: a pool still reconnecting answers 503 +
    # Retry-After, and a client retries as told.
    export = retry_after_503(lambda: client.get(f"/v1/household/{account}/export"))
    assert export.status_code == 200, export.text
    stored = {e["event_id"] for e in export.json()["services"]["clustering"]["events"]}
    assert set(acknowledged) <= stored, sorted(set(acknowledged) - stored)[:5]


def _grpc_health(port: int, service: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def test_postgres_down_takes_services_out_of_readiness_but_their_liveness_stays_serving(servers, omesh, client):
    """What kubelet sees during a PostgreSQL outage (the chart's probes, docs/deploy.md,
    "Probes and shutdown"): readiness (the overall "" status) NOT_SERVING, so no traffic
    is routed to a pod that cannot answer; liveness (the "liveness" status) SERVING, so no
    pod is restarted for its database's outage. Until session 20 the liveness probe asked
    "" too: an outage longer than 3 x 10 s restarted every service pod."""
    pg, _ = servers
    ports = {s: omesh.grpc_ports[s] for s in ("clustering", "attribution", "privacy", "feedback")}
    assert {s: _grpc_health(p, "liveness") for s, p in ports.items()} == dict.fromkeys(ports, "SERVING")
    pg.stop()
    try:
        wait_for(lambda: all(_grpc_health(p, "") == "NOT_SERVING" for p in ports.values()),
                 what="every service NOT_SERVING (readiness) with PostgreSQL down")
        assert {s: _grpc_health(p, "liveness") for s, p in ports.items()} == dict.fromkeys(ports, "SERVING")
        # The gateway's own probes: readiness (/health) says no service serves, liveness
        # (/openapi.json) never depends on the mesh.
        assert httpx.get(omesh.url + "/health", timeout=10).status_code == 503
        assert httpx.get(omesh.url + "/openapi.json", timeout=10).status_code == 200
    finally:
        pg.start()
    wait_for(lambda: all(_grpc_health(p, "") == "SERVING" for p in ports.values()),
             what="every service SERVING again once PostgreSQL is back")
    assert retry_after_503(lambda: client.get("/v1/calibration")).status_code == 200


def test_postgres_hung_sets_the_services_not_serving_and_they_serve_again_when_it_resumes(servers, omesh, client):
    """PostgreSQL hung, not down (every process of it stopped: a storage freeze, a
    network path that drops packets): nothing refuses a connection, a query just never
    answers. Each service's database check gets a bounded time (health_report.
    CHECK_TIMEOUT_S); until session 20 the check's `SELECT 1` waited as long as the hang,
    the health monitor never published again, and every service said SERVING (and
    `hearth_dependency_up{dependency="database"}` 1, the gateway's /health SERVING) while
    every request needing the database failed."""
    import signal

    from tests.helpers.processes import descendants, signal_each

    pg, _ = servers
    ports = {s: omesh.grpc_ports[s] for s in ("clustering", "attribution", "privacy", "feedback")}
    wait_for(lambda: all(_grpc_health(p, "") == "SERVING" for p in ports.values()), what="every service SERVING")
    pids = signal_each([pg.proc.pid, *descendants(pg.proc.pid)], signal.SIGSTOP)
    try:
        wait_for(lambda: all(_grpc_health(p, "") == "NOT_SERVING" for p in ports.values()),
                 what="every service NOT_SERVING with PostgreSQL hung")
        health = httpx.get(omesh.url + "/health", timeout=10)
        assert health.status_code == 503 and "database: failing" in health.json()["reasons"]["clustering"], health.text
        metrics = httpx.get(f"http://127.0.0.1:{omesh.metrics_ports['clustering']}/metrics", timeout=10).text
        assert 'hearth_dependency_up{dependency="database"} 0.0' in metrics
        # Liveness (the chart's probe) never follows a dependency: no pod restarted for it.
        assert {s: _grpc_health(p, "liveness") for s, p in ports.items()} == dict.fromkeys(ports, "SERVING")
    finally:
        signal_each(pids, signal.SIGCONT)
    wait_for(lambda: all(_grpc_health(p, "") == "SERVING" for p in ports.values()),
             what="every service SERVING again once PostgreSQL resumes")
    assert retry_after_503(lambda: client.get("/v1/calibration")).status_code == 200


def test_postgres_read_only_refuses_writes_with_503_and_retry_after_and_reads_keep_working(servers, omesh, client):
    """PostgreSQL accepting reads only — a standby the DSN still points at after a
    failover, or `default_transaction_read_only` set while its disk is nearly full: writes
    get 503 + Retry-After naming the cause (retry later; they land once it takes writes
    again), reads keep answering. Until session 20 every write was 502 "upstream error"
    (INTERNAL: nothing to retry on, a traceback logged per request)."""
    import psycopg

    pg, _ = servers
    account = f"out-ro-{RUN}"
    assert post_events(client, account, 3, time.time() - 2 * DAY, account).status_code == 200

    def read_only(on: bool) -> None:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
            conn.execute("SELECT pg_reload_conf()")

    read_only(True)
    try:
        n = iter(range(10_000))
        # The reload reaches every backend within moments; the first refused write tells.
        refused = wait_for(lambda: (lambda r: r if r.status_code != 200 else None)(
            post_events(client, account, 1, time.time() - DAY, f"{account}-ro-{next(n)}")),
            what="a write refused by the read-only database")
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit(), refused.text
        assert "read-only" in refused.json()["error"]["message"], refused.text
        assert client.get(f"/v1/household/{account}").status_code == 200
        # Health says so (session 24): clustering stays SERVING (reads work; NOT_SERVING
        # would empty the Service) with its `database writes` check failing.
        port = omesh.grpc_ports["clustering"]
        wait_for(lambda: "database writes: writes refused: the database is read-only"
                 in _grpc_health_reasons(port), what="clustering's health naming the refused writes")
        assert _grpc_health(port, "") == "SERVING"
    finally:
        read_only(False)
    wait_for(lambda: post_events(client, account, 1, time.time() - DAY / 2,
                                 f"{account}-back-{time.monotonic()}").status_code == 200,
             what="writes accepted again")


def _grpc_health_reasons(port: int) -> str:
    """The ``hearth-health-reason`` trailer of a service's overall health check ("" when none)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.health_report import REASON_KEY

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            _, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError:
            return ""
    return dict(call.trailing_metadata() or ()).get(REASON_KEY, "")


def test_a_service_whose_database_check_hangs_still_exits_on_sigterm(servers, omesh):
    """review20: the bounded health checks (session 20) ran each probe on a
    ThreadPoolExecutor's thread, which the interpreter joins at exit: with PostgreSQL hung,
    a service's `SELECT 1` probe never returned, so after SIGTERM the service drained and
    then did not exit for as long as the hang lasted (attribution, privacy and feedback
    still running 60 s later; kubelet would SIGKILL them at the grace period's end, a
    plain `docker stop` / systemd likewise). The probes now run on daemon threads.
    stop22 (session 22): after the module's earlier outages the closers themselves hung on
    the frozen database (clustering's last prediction forward, privacy's audit writer: a
    pooled connection's check, no timeout) and clustering/privacy never exited; now a
    closer still running at the grace's end + 3 s is left behind and the process exits
    (services/common/server.py `RunningServer._close`, `_exit_by`). On the
    module's PostgreSQL and mesh, last in the module (it stops every service: the `client`
    fixture starts them again for any test after it); until session 22 it started a
    PostgreSQL cluster and a mesh of its own, ~8 s of a loaded machine's 24."""
    import signal

    from tests.helpers.processes import descendants, signal_each

    pg, _ = servers
    mesh = omesh
    ports = {s: mesh.grpc_ports[s] for s in ("clustering", "attribution", "privacy", "feedback")}
    # A healthy mesh to start from (the tests before this one restart and freeze its PostgreSQL).
    wait_for(lambda: all(_grpc_health(p, "") == "SERVING" for p in ports.values()), what="every service SERVING")
    pids = signal_each([pg.proc.pid, *descendants(pg.proc.pid)], signal.SIGSTOP)
    try:
        # Every service NOT_SERVING, and some database probe stuck on its socket ("no
        # answer in N s"; a service whose pooled connections are all held by hung work
        # fails its probe with PoolTimeout instead, which holds no thread).
        reasons: dict[str, str] = {}

        def hung() -> bool:
            reasons.update({s: _grpc_health_reasons(p) for s, p in ports.items()})
            return (all("database:" in r for r in reasons.values())
                    and any("database: no answer in" in r for r in reasons.values()))

        deadline = time.monotonic() + SLOW_MACHINE_S
        while not hung():
            assert time.monotonic() < deadline, f"no database probe hung with PostgreSQL stopped: {reasons}"
            time.sleep(0.5)
        procs = {s: mesh.processes.pop(s) for s in ports}
        signalled = time.monotonic()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        exited: dict[str, float] = {}
        deadline = signalled + 30   # twice a pod's 15 s (grace 10 s + margin 5 s)
        while time.monotonic() < deadline and len(exited) < len(procs):
            exited.update({s: time.monotonic() - signalled for s, p in procs.items()
                           if s not in exited and p.poll() is not None})
            time.sleep(0.2)
        running = [s for s, p in procs.items() if p.poll() is None]
        for s in running:
            procs[s].kill()
        assert not running, f"still running 30 s after SIGTERM with PostgreSQL hung: {running} ({reasons})"
        # The services leave closers stuck on the frozen database behind at the grace's end
        # + 3 s (STOP_CLOSE_MARGIN_S), inside a pod's grace + 5 s margin; + 3 s here for a
        # loaded machine (the signal's delivery, the process's teardown).
        slow = {s: round(t, 1) for s, t in exited.items() if t > GRACE_S + STOP_CLOSE_MARGIN_S + 3}
        assert not slow, f"exited past grace + margin after SIGTERM with PostgreSQL hung: {slow} ({reasons})"
    finally:
        signal_each(pids, signal.SIGCONT)
