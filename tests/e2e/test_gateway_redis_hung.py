"""The gateway's rate limiter with its Redis hung, not down (the process stopped, a
network path dropping packets): the TCP handshake completes and no answer ever comes, so
each call waits out the client's 0.5 s socket timeout. After one failure the limiter uses
its per-replica buckets alone for a second (gateway/ratelimit.py, REDIS_RETRY_AFTER_S),
as the services' cache does. Until session 20 it asked Redis on every request, and every
API request of every gateway pod paid the 0.5 s for as long as Redis hung (docs/operations.md,
"Outages")."""

from __future__ import annotations

import socket
import time

import httpx

from services.testing.mesh import Mesh, write_api_key
from tests.helpers.waiting import wait_for


def test_a_hung_redis_costs_the_rate_limiter_one_timeout_a_second_not_one_per_request(tmp_path):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(128)   # never accepted, never answered: the kernel completes the handshakes
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs", extra_env={
        "HEARTH_REDIS_URL": f"redis://127.0.0.1:{hung.getsockname()[1]}/0",
        "HEARTH_RATE_LIMIT_DEFAULT": '{"per_s": 1000, "burst": 1000}'})
    mesh.data_dir.mkdir(parents=True)
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "limits-admin", "admin")
    try:
        # The gateway alone: the services are down, so a request is the limiter's check
        # (Redis) and then a fast 503 from the refused connection to its service.
        mesh.start_listening(["gateway"])
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=30) as client:
            def answered():
                assert mesh.processes["gateway"].poll() is None, mesh.log_tail("gateway")
                try:
                    return client.get("/v1/household/acc-1")
                except httpx.TransportError:
                    return None

            assert wait_for(answered, what="the gateway answering").status_code == 503
            latencies, started = [], time.monotonic()
            for _ in range(20):
                t0 = time.monotonic()
                assert client.get("/v1/household/acc-1").status_code == 503
                latencies.append(time.monotonic() - t0)
            elapsed = time.monotonic() - started
        slow = sum(1 for s in latencies if s >= 0.45)
        # At most one Redis timeout per second of the run (plus the one it starts in);
        # before, all 20 requests waited it out (>= 10 s in all).
        assert slow <= 1 + elapsed, (slow, round(elapsed, 2), [round(s, 2) for s in latencies])
    finally:
        mesh.stop()
        hung.close()
