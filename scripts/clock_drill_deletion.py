"""The deletion workers' clock drill of docs/operations.md, "Clock steps" (session 25).

Two deletion workers, A and B, each a process of its own, on one PostgreSQL schema; one of
the three (B, or the postmaster) runs under libfaketime (``apt-get install faketime``). Three
household jobs are requested and the workers run for 25 s; then the claims, Erase calls and
each job's state are printed.

    python scripts/clock_drill_deletion.py behind   # B 2 h behind; every peer refuses B (its tokens)
    python scripts/clock_drill_deletion.py down     # the same with a peer down for A too
    python scripts/clock_drill_deletion.py server   # PostgreSQL 1 h behind, A and B right
    python scripts/clock_drill_deletion.py mesh     # a real mesh on PostgreSQL: a second privacy
                                                    # replica 2 h behind, attribution stopped, 40 s

Peers are in process (A's answer after 1 s, or refuse while down); the retry policy is the
test default (8 attempts from 1 s); lease 10 s. Not part of ``make test``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FAKETIME = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
ROOT = Path(__file__).resolve().parent.parent


def worker(name: str, dsn: str, schema: str, refuse: bool) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from hearth.common.v1 import common_pb2

    from services.common.erasure import ids_digest
    from services.common.errors import Unavailable
    from services.common.storage.sql import PostgresDatabase
    from services.privacy.deletion.app import DeletionCoordinator
    from services.privacy.deletion.store import DeletionJobStore

    class Peers:
        def erase(self, service, scope, job_id):
            print(f"{name} erase {service} {job_id}", flush=True)
            if refuse:
                raise Unavailable(f"{service} refused")
            time.sleep(1.0)
            return common_pb2.ErasureResult(service=service, deleted_ids_sha256=ids_digest([]), already_erased=True)

        def export(self, service, account_id):
            return {}

        def close(self):
            pass

    class Jobs(DeletionJobStore):
        def claim(self, job_id, now, lease_s, future_bound_s=None):
            got = super().claim(job_id, now, lease_s, future_bound_s)
            if got is not None:
                print(f"{name} claimed {job_id}", flush=True)
            return got

    DeletionCoordinator(Jobs(PostgresDatabase(dsn, schema, max_size=2)), Peers(), None,
                        Ed25519PrivateKey.generate(), lease_s=10.0, poll_s=0.2).start()
    threading.Event().wait()


def drill(scenario: str) -> None:
    from services.common.erasure import ErasureScope
    from services.common.identity import Principal
    from services.common.ids import Role
    from services.common.storage.sql import PostgresDatabase
    from services.privacy.consent.store import ConsentStore
    from services.privacy.deletion.store import DeletionJobStore
    from services.privacy.deletion.app import DeletionCoordinator
    from services.testing.servers import PostgresServer
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    work = Path(tempfile.mkdtemp(prefix="hearth-clock-drill-"))
    work.chmod(0o755)   # PostgreSQL runs as its own user when we are root
    stamp = work / "faketime"
    stamp.write_text("-1h\n" if scenario == "server" else "-2h\n")
    faked = {**os.environ, **FAKETIME, "FAKETIME_TIMESTAMP_FILE": str(stamp)}
    saved = dict(os.environ)
    if scenario == "server":
        os.environ.update(faked)          # the postmaster (and its backends) inherit it
    pg = PostgresServer(work / "pg", durable=False).init().start()
    os.environ.clear()
    os.environ.update(saved)
    procs = []
    try:
        db = PostgresDatabase(pg.dsn, "drill", max_size=2)
        ConsentStore(db, None).migrate()
        jobs = DeletionJobStore(db)
        log = open(work / "workers.log", "w")
        for name, env, refuse in (("A", os.environ, scenario == "down"),
                                  ("B", faked if scenario != "server" else os.environ, scenario != "server")):
            procs.append(subprocess.Popen([sys.executable, __file__, "worker", name, pg.dsn, "drill", str(refuse)],
                                          cwd=ROOT, env=dict(env), stdout=log, stderr=log))
        time.sleep(3)
        requester = DeletionCoordinator(jobs, None, None, Ed25519PrivateKey.generate())
        ids = [requester.request(ErasureScope(f"acct-{i}", "household"), principal=Principal("o", Role("admin")))
               .job.job_id for i in range(3)]
        time.sleep(25)
        for p in procs:
            p.terminate()
            p.wait(10)
        log.close()
        lines = (work / "workers.log").read_text().splitlines()
        for name in "AB":
            print(f"{name}: {sum(x.startswith(name + ' claimed') for x in lines)} claims, "
                  f"{sum(x.startswith(name + ' erase') for x in lines)} Erase calls")
        for job_id in ids:
            job = jobs.get(job_id).job
            print(job_id, job.state.value, {s: (p.status.value, p.attempts) for s, p in job.services.items()})
        for line in sorted({x for x in lines if "hearth.privacy.deletion" in x and "erase in" not in x}):
            print(" ", line[:200])
        db.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        pg.remove()
        shutil.rmtree(work, ignore_errors=True)


def mesh_drill() -> None:
    """The real mesh: privacy-2 beside privacy, under libfaketime 2 h behind; attribution
    stopped, so every job retries; three household deletions through the gateway."""
    import re

    import httpx

    from services.testing.mesh import running_mesh
    from services.testing.servers import PostgresServer

    work = Path(tempfile.mkdtemp(prefix="hearth-clock-drill-"))
    work.chmod(0o755)
    stamp = work / "faketime"
    stamp.write_text("-2h\n")
    pg = PostgresServer(work / "pg", durable=False).init().start()

    def metric(port: int, name: str) -> str | None:
        found = re.search(rf"^{name} (\S+)$", httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text, re.M)
        return found.group(1) if found else None

    try:
        env = {"HEARTH_STORAGE": "postgres", "HEARTH_POSTGRES_DSN": pg.dsn, "HEARTH_RETENTION_CHECK_S": "0"}
        with running_mesh(work, {"olivia": "admin"}, timeout_s=240, extra_env=env,
                          process_env={"privacy-2": {**FAKETIME, "FAKETIME_TIMESTAMP_FILE": str(stamp)}}) as mesh:
            metrics_2 = mesh.spawn_on_free_ports("privacy-2", "services.privacy", mesh.env(),
                                                 ("HEARTH_GRPC_PORT", "HEARTH_METRICS_PORT"))["HEARTH_METRICS_PORT"]
            deadline = time.monotonic() + 120
            while True:
                try:
                    metric(metrics_2, "hearth_deletion_oldest_open_job_age_seconds")
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            mesh.stop_process("attribution")
            client = httpx.Client(base_url=mesh.url, headers={"x-api-key": mesh.api_key}, timeout=30)
            ids = [client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": f"acct-drill-{i}"}})
                   .json()["job_id"] for i in range(3)]
            time.sleep(40)
            for job_id in ids:
                services = client.get(f"/v1/delete/{job_id}").json()["services"]
                print(job_id, {s["service"]: s["attempts"] for s in services})
            print("privacy-2: hearth_deletion_clock_disagrees", metric(metrics_2, "hearth_deletion_clock_disagrees"),
                  "offset", metric(metrics_2, "hearth_deletion_clock_offset_seconds"))
            for name in ("privacy", "privacy-2"):
                text = (work / "logs" / f"{name}.log").read_text(errors="replace")
                print(name, {k: text.count(k) for k in ("erase in attribution failed", "another worker took it",
                                                        "takes no deletion job")})
    finally:
        pg.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "worker":
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "True")
    elif sys.argv[1] == "mesh":
        mesh_drill()
    else:
        drill(sys.argv[1])
