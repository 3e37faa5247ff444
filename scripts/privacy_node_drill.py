"""Privacy on another server: the drill of docs/operations.md "Database roles" (session 30).

Two PostgreSQL clusters on two ports of this machine (the machine's PostgreSQL, or
``--bin-dir`` another's), a database ``hearth`` on each; clustering, attribution and
feedback's DSNs name the first, privacy's the second. Then, with real processes:

1. ``hearth db provision-roles`` as one run (the admin DSN on the first server) — refused
   since session 30 (until then: exit 0, privacy's role and schema made on the first server);
2. a run per server (``--service``), each with its own admin DSN;
3. the mesh (services.testing.mesh) with a DSN per service: a household's events written,
   the household erased through privacy on the second server, its job followed;
4. ``hearth backup`` over the four DSNs, then ``hearth restore`` (refused: one server's).

Prints each step with the UTC time. Not part of ``make test``
(tests/integration/test_postgres_roles_two_servers.py is, in process).

    python scripts/privacy_node_drill.py [--bin-dir DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from services.common.storage.roles import SERVICES, service_dsn_variable  # noqa: E402
from services.testing.mesh import running_mesh  # noqa: E402
from services.testing.servers import PostgresServer  # noqa: E402


def log(*parts) -> None:
    print(time.strftime("[%H:%M:%S UTC]", time.gmtime()), *parts, flush=True)


def hearth(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


def made_on(database: str) -> tuple[list[str], list[str]]:
    with psycopg.connect(database) as conn:
        return ([r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'hearth\\_%' ORDER BY 1")],
                [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'hearth\\_%' "
                                            "ORDER BY 1")])


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, default=None, help="the PostgreSQL binaries (default: the machine's)")
    parser.add_argument("--work", type=Path, default=None, help="where the clusters and the mesh go (removed after)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hearth-privacy-node-"))
    work.chmod(0o755)   # as root the clusters run as the postgres user, which must enter it
    first = PostgresServer(work / "pg-first", durable=False, bin_dir=args.bin_dir).init().start()
    second = PostgresServer(work / "pg-second", durable=False, bin_dir=args.bin_dir).init().start()
    try:
        for server in (first, second):
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("CREATE DATABASE hearth")
                log(f"server on port {server.port}:", conn.execute("SELECT version()").fetchone()[0])
        main_db, privacy_db = (make_conninfo(s.dsn, dbname="hearth") for s in (first, second))
        dsns = {s: make_conninfo(privacy_db if s == "privacy" else main_db, user=f"hearth_{s}", password=f"pw-{s}")
                for s in SERVICES}

        log("1. one run, the admin DSN on the first server, privacy's DSN on the second")
        rc, out, err = hearth("db", "provision-roles", env={"HEARTH_POSTGRES_ADMIN_DSN": main_db,
                                                          **{service_dsn_variable(s): d for s, d in dsns.items()}})
        log(f"   exit {rc}", err or out[:200])
        log("   first server:", made_on(main_db), "second:", made_on(privacy_db))

        log("2. a run per server")
        for admin, services in ((main_db, [s for s in SERVICES if s != "privacy"]), (privacy_db, ["privacy"])):
            rc, out, err = hearth("db", "provision-roles", *(a for s in services for a in ("--service", s)),
                                  env={"HEARTH_POSTGRES_ADMIN_DSN": admin,
                                       **{service_dsn_variable(s): dsns[s] for s in services}})
            log(f"   {services}: exit {rc}", err or f"provisioned {sorted(json.loads(out))}")
        log("   first server:", made_on(main_db), "second:", made_on(privacy_db))

        log("3. the mesh, privacy on the second server")
        env = {"HEARTH_STORAGE": "postgres", "HEARTH_POSTGRES_DSN": main_db, "HEARTH_RETENTION_CHECK_S": "0",
               "HEARTH_DELETION_POLL_S": "0.1", "HEARTH_DELETION_RETRY_BASE_S": "0.1"}
        with running_mesh(work / "mesh", {"olivia": "admin"}, timeout_s=120, extra_env=env,
                          process_env={s: {"HEARTH_POSTGRES_DSN": d} for s, d in dsns.items()}) as mesh:
            client = httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30)
            account, t0 = f"hh-{uuid.uuid4().hex[:6]}", time.time() - 3 * 86400
            r = client.post("/v1/events", json={"events": [
                {"event_id": f"{account}-{i}", "account_id": account, "device_id": "tv-1", "device_type": "tv",
                 "ts": iso(t0 + i * 300), "kind": "heartbeat", "title_id": f"t{i}", "genres": ["drama"],
                 "duration_s": 300, "maturity": "adult"} for i in range(5)]})
            log(f"   POST /v1/events {r.status_code}", r.text[:120])
            r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": account},
                                                "reason": "gdpr_art17"})
            log(f"   POST /v1/delete {r.status_code}")
            job = {}
            for _ in range(600):
                job = client.get(f"/v1/delete/{r.json()['job_id']}").json()
                if job.get("state") in ("completed", "failed"):
                    break
                time.sleep(0.1)
            log(f"   job {job.get('state')}:", {s["service"]: s["confirmed"] for s in job.get("services", [])})
            with psycopg.connect(main_db) as conn:
                left = conn.execute("SELECT count(*) FROM hearth_clustering.events WHERE account_id = %s",
                                    (account,)).fetchone()[0]
            with psycopg.connect(privacy_db) as conn:
                jobs = conn.execute("SELECT count(*) FROM hearth_privacy.deletion_jobs").fetchone()[0]
            log(f"   events of the household left on the first server: {left}; jobs on the second: {jobs}")
            backup_env = {**env, "HEARTH_DATA_DIR": str(mesh.data_dir), "HEARTH_POSTGRES_DSN": dsns["privacy"],
                          **{service_dsn_variable(s): d for s, d in dsns.items()}}
            rc, out, err = hearth("backup", "--out", str(work / "backups"), env=backup_env)
            log(f"4. hearth backup: exit {rc}", err or out.splitlines()[-1][:200])
        if rc == 0:
            snapshot = json.loads(out.splitlines()[-1])["snapshot"]
            rc, out, err = hearth("restore", snapshot, env={**backup_env, "HEARTH_POSTGRES_DSN": main_db})
            log(f"   hearth restore (services stopped): exit {rc}", err or out[-200:])
    finally:
        first.remove()
        second.remove()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
