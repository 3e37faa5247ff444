"""A service stopped (SIGTERM) while one of its calls waits on a hung peer, through real
processes: clustering ingests events while privacy (the consent check and the audit log)
is SIGSTOPped. Until session 21 the stop waited out the request's deadline in the drain
and then the audit sink's flush to the frozen privacy: 19.5 s, past the 15 s a pod has
after its preStop (terminationGracePeriodSeconds 20 = preStop 5 + grace 10 + margin 5),
so Kubernetes would SIGKILL it before its database was closed. Now the peers the calls
wait on are asked for their health after a short wait and the hung one's calls are
cancelled: the request is a 503 with Retry-After, the audit record waits in the disk
outbox, and the process exits in a few seconds (services/common/server.py,
RunningServer.stop). The gateway's own stop with a frozen privacy does the same since
session 22 (gateway/__main__.py, GatewayServer)."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import threading
import time
import uuid

import httpx

from tests.helpers.waiting import SLOW_MACHINE_S, wait_for

RUN = uuid.uuid4().hex[:6]
# What the pod has after its preStop sleep (docs/deploy.md, "Graceful shutdown"); the
# stop must take well under it.
POD_BUDGET_AFTER_PRESTOP_S = 15.0


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _gauge(port: int, name: str, label: str, value: str) -> float:
    """``name{label="value"}`` on the /metrics page at ``port`` (0 when unreachable)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    match = re.search(r'^%s\{%s="%s"\} (\S+)$' % (name, label, value), text, re.M)
    return float(match.group(1)) if match else 0.0


def _in_flight(mesh, service: str) -> float:
    return _gauge(mesh.metrics_ports[service], "hearth_rpc_in_flight", "service", service)


def _stop_timed(mesh, name: str) -> float:
    """SIGTERM a process of the mesh; the seconds until it exited."""
    process = mesh.processes.pop(name)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    return time.monotonic() - signalled


def test_clustering_stops_promptly_while_an_ingest_waits_on_a_frozen_privacy(mesh):
    """On the session's mesh (tests/e2e/conftest.py): privacy is resumed and clustering
    started again whatever happens here, and the mesh is healthy before the next test."""
    client = httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=60)
    acct = f"e2e-stop-hung-{RUN}"
    privacy = mesh.processes["privacy"]
    answer: dict[str, httpx.Response] = {}
    log_from = len((mesh.log_dir / "clustering.log").read_text())
    try:
        os.kill(privacy.pid, signal.SIGSTOP)
        try:
            sender = threading.Thread(target=lambda: answer.setdefault("r", client.post("/v1/events", json={
                "events": [{"event_id": f"{acct}-0", "account_id": acct, "device_id": "tv-1", "device_type": "tv",
                            "ts": _iso(time.time() - 3600), "kind": "heartbeat", "title_id": "t", "genres": [],
                            "duration_s": 10}]})))
            sender.start()
            # The ingest is in clustering's handler, waiting on the consent check.
            wait_for(lambda: _in_flight(mesh, "clustering") >= 1, what="clustering serving the ingest",
                     interval_s=0.05)
            took = _stop_timed(mesh, "clustering")
            sender.join(60)
        finally:
            os.kill(privacy.pid, signal.SIGCONT)
        # This stop's lines only: the log file is appended to by every start of clustering.
        log = (mesh.log_dir / "clustering.log").read_text()[log_from:]
        assert took < POD_BUDGET_AFTER_PRESTOP_S / 2, f"clustering took {took:.1f} s to exit{mesh.log_tail('clustering')}"
        # The ingest's call is cancelled, and with it any other call of clustering's waiting on
        # the frozen privacy at that moment (e.g. its audit sink shipping an earlier request's
        # record): the fresh-clone CI of 3ef432f logged "cancelling its 2 calls in flight".
        assert "did not answer in" in log and re.search(r"cancelling its [1-9]\d* calls in flight", log), log[-3000:]
        r = answer["r"]
        assert r.status_code == 503 and r.headers["retry-after"].isdigit(), (r.status_code, r.text)
        assert r.json()["error"]["code"] == "unavailable"
        # Nothing audited is lost: the record waits in the disk outbox for the next start.
        assert "records to the disk outbox" in log
    finally:
        client.close()
        if "clustering" not in mesh.processes:
            mesh.start_service("clustering")
        mesh.wait_healthy(SLOW_MACHINE_S)


def _gateway_in_flight(mesh, upstream: str) -> float:
    return _gauge(mesh.gateway_metrics_port, "hearth_gateway_in_flight", "upstream", upstream)


def test_the_gateway_stops_promptly_while_requests_wait_on_a_frozen_privacy(mesh):
    """The gateway's own stop with a frozen backend (session 22): uvicorn waits for the
    requests in flight up to HEARTH_GRACE_SECONDS and then runs the app's shutdown, whose
    audit sink flushes to privacy. With privacy SIGSTOPped, two consent updates in flight
    and a refusal to audit, the gateway took 14.6-16.0 s to exit (the requests' 10 s
    deadline, 504s, then 3 s of flush and 3 s of join, the records left unsent): past the
    15 s a pod has after its preStop; requests to a frozen attribution (60 s deadline) were
    cancelled at the grace's end as 500s. Now the services the requests wait on are asked
    for their health 2 s into the stop and the calls to one that does not answer are
    cancelled (503, Retry-After), and a hung privacy is asked before the audit flush
    (gateway/__main__.py GatewayServer, ServiceClients.abandon_hung). On the session's
    mesh: privacy is resumed and the gateway started again whatever happens here."""
    client = httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=60)
    privacy = mesh.processes["privacy"]
    answers: list[httpx.Response] = []
    log_from = len((mesh.log_dir / "gateway.log").read_text())
    try:
        os.kill(privacy.pid, signal.SIGSTOP)
        try:
            assert httpx.get(mesh.url + "/v1/household/nobody", timeout=10).status_code == 401   # audited via privacy
            senders = [threading.Thread(target=lambda i=i: answers.append(client.put(
                f"/v1/consent/e2e-gw-stop-{RUN}-{i}", json={"processing": True, "attribution": True})))
                for i in range(2)]
            for sender in senders:
                sender.start()
            wait_for(lambda: _gateway_in_flight(mesh, "privacy") >= 2, what="the gateway waiting on privacy",
                     interval_s=0.05)
            took = _stop_timed(mesh, "gateway")
            for sender in senders:
                sender.join(60)
        finally:
            os.kill(privacy.pid, signal.SIGCONT)
        # This stop's lines only: the log file is appended to by every start of the gateway.
        log = (mesh.log_dir / "gateway.log").read_text()[log_from:]
        assert took < POD_BUDGET_AFTER_PRESTOP_S / 2, f"the gateway took {took:.1f} s to exit{mesh.log_tail('gateway')}"
        assert "privacy did not answer in" in log, log[-3000:]
        assert [r.status_code for r in answers] == [503, 503], [(r.status_code, r.text) for r in answers]
        assert all(r.headers["retry-after"].isdigit() for r in answers)
        # The refusal's audit record waits in the gateway's disk outbox for its next start.
        assert "stay in the disk outbox until the next start" in log, log[-3000:]
    finally:
        client.close()
        if "gateway" not in mesh.processes:
            mesh._spawn("gateway", "gateway", {**mesh.env(), "HEARTH_METRICS_PORT": str(mesh.gateway_metrics_port)})
        mesh.wait_healthy(SLOW_MACHINE_S)
