"""A slow PostgreSQL through real processes (docs/operations.md, "Outages"): another
session holds an ACCESS EXCLUSIVE lock on clustering's ``sessions`` table (a migration,
a purge's VACUUM FULL, an operator's transaction). Requests that need the table end at
their deadline (504, or 503 + Retry-After while the pool is busy) — and so does their
wait in PostgreSQL: once the gateway's deadline has passed, no connection of the
service still waits for the lock, so the service stays SERVING while the lock lasts.
Until session 18 eight requests kept waiting (each holding one of the eight pooled
connections) until the lock went, the service went NOT_SERVING with "database
unavailable: PoolTimeout" and the abandoned writes committed afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg

from services.testing.mesh import running_mesh
from tests.helpers.servers import running_postgres
from tests.helpers.waiting import SLOW_MACHINE_S, wait_for
from tests.helpers.timestamps import iso_utc as _iso

RPC_TIMEOUT_S = 3.0


def test_requests_blocked_by_a_lock_stop_waiting_in_postgres_at_their_deadline(tmp_path):
    with running_postgres() as pg:
        env = {"HEARTH_STORAGE": "postgres", "HEARTH_POSTGRES_DSN": pg.dsn, "HEARTH_RETENTION_CHECK_S": "0",
               "HEARTH_HEALTH_CHECK_INTERVAL_S": "0.5", "HEARTH_RATE_LIMIT_ENABLED": "false",
               "HEARTH_RPC_TIMEOUT_S": str(RPC_TIMEOUT_S)}
        with running_mesh(tmp_path, {"olivia": "admin"}, timeout_s=SLOW_MACHINE_S, extra_env=env) as mesh, \
                httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=60) as client:
            start = time.time() - 5 * 86400
            r = client.post("/v1/events", json={"events": [{
                "event_id": f"lk-{i}", "account_id": "acc-lock", "device_id": "tv", "device_type": "tv",
                "ts": _iso(start + i * 3 * 3600), "kind": "play_start", "title_id": "t", "genres": ["drama"],
                "duration_s": 1800, "maturity": "adult"} for i in range(4)]})
            assert r.status_code == 200, r.text
            # The household's first model is saved in the background after the POST; taken
            # under the lock, that save (no caller, so no deadline) waits for it like any
            # writer and is not what this test is about (on a loaded machine it came late).
            wait_for(lambda: client.get("/v1/household/acc-lock").json()["status"]["settled"],
                     SLOW_MACHINE_S, "the household's model to settle before the lock")
            with psycopg.connect(pg.dsn) as locker, psycopg.connect(pg.dsn, autocommit=True) as watcher:
                locker.execute("LOCK TABLE hearth_clustering.sessions IN ACCESS EXCLUSIVE MODE")
                with ThreadPoolExecutor(12) as pool:   # more than the service's 8 pooled connections
                    answers = list(pool.map(lambda _: client.get("/v1/household/acc-lock"), range(12)))
                statuses = {a.status_code for a in answers}
                assert statuses <= {503, 504}, [a.text for a in answers]
                assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)

                def waiting() -> int:
                    return watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = current_user AND pid <> "
                        "pg_backend_pid() AND wait_event_type = 'Lock' AND pid <> %s",
                        (locker.info.backend_pid,)).fetchone()[0]

                # The lock is still held: nobody is left waiting for it, and the service serves.
                wait_for(lambda: waiting() == 0, 2 * RPC_TIMEOUT_S, "the abandoned waits to end")
                health = wait_for(lambda: (h := client.get("/health").json())["services"]["clustering"] == "SERVING"
                                  and h, 2 * RPC_TIMEOUT_S, "clustering SERVING while the table is locked")
                assert health["services"]["clustering"] == "SERVING"
                locker.rollback()
            r = client.get("/v1/household/acc-lock")
            assert r.status_code == 200 and len(r.json()["sessions"]) == 4, r.text
