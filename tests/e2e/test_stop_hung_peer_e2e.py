"""A service stopped (SIGTERM) while one of its calls waits on a hung peer, through real
processes: clustering ingests events while privacy (the consent check and the audit log)
is SIGSTOPped. Until session 21 the stop waited out the request's deadline in the drain
and then the audit sink's flush to the frozen privacy: 19.5 s, past the 15 s a pod has
after its preStop (terminationGracePeriodSeconds 20 = preStop 5 + grace 10 + margin 5),
so Kubernetes would SIGKILL it before its database was closed. Now the peers the calls
wait on are asked for their health after a short wait and the hung one's calls are
cancelled: the request is a 503 with Retry-After, the audit record waits in the disk
outbox, and the process exits in a few seconds (services/common/server.py,
RunningServer.stop)."""

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


def _in_flight(mesh, service: str) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports[service]}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    match = re.search(r'^hearth_rpc_in_flight\{service="%s"\} (\S+)$' % service, text, re.M)
    return float(match.group(1)) if match else 0.0


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
            clustering = mesh.processes.pop("clustering")
            signalled = time.monotonic()
            clustering.send_signal(signal.SIGTERM)
            clustering.wait(60)
            took = time.monotonic() - signalled
            sender.join(60)
        finally:
            os.kill(privacy.pid, signal.SIGCONT)
        # This stop's lines only: the log file is appended to by every start of clustering.
        log = (mesh.log_dir / "clustering.log").read_text()[log_from:]
        assert took < POD_BUDGET_AFTER_PRESTOP_S / 2, f"clustering took {took:.1f} s to exit{mesh.log_tail('clustering')}"
        assert "did not answer in" in log and "cancelling its 1 calls in flight" in log, log[-3000:]
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
