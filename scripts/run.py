"""`make run`: start the mesh on SQLite under ./var, print where it listens, stop all on Ctrl-C."""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

import gen_protos   # scripts/, beside this file


def regenerate_if_stale() -> None:
    """Generate hearth/ from protos/ when it is missing or older than them, as `make run`
    does: run alone after a merge that changed a .proto, this started the old generated code,
    and privacy crashed at start (AttributeError: no DATA_KEY_OUTCOME_ERASED, session 28)."""
    reason = gen_protos.stale_reason()
    if reason is None:
        return
    print(f"{reason}: regenerating it (scripts/gen_protos.py)", flush=True)
    if gen_protos.main() != 0:
        raise SystemExit("scripts/gen_protos.py failed (above); the mesh was not started")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=gen_protos.ROOT / "var",
                        help="where the SQLite files, keys and logs go (default ./var)")
    parser.add_argument("--free-ports", action="store_true",
                        help="listen on free ports instead of 8080/50051-50054/9100-9104 "
                             "(a second mesh beside a running one; all drawn again if another "
                             "process takes one before it binds)")
    # Defaults: services.testing.mesh.LOG_MAX_BYTES / LOG_BACKUPS (importable only after
    # regenerate_if_stale, below).
    parser.add_argument("--log-max-bytes", type=int, default=None, metavar="N",
                        help="a process's log (<data dir>/logs/<name>.log) is copied to <name>.log.1 "
                             "and emptied past N bytes (default 10000000; docs/operations.md, Logs)")
    parser.add_argument("--log-backups", type=int, default=None, metavar="K",
                        help="rotated logs kept per process, <name>.log.1 to .K (default 3)")
    args = parser.parse_args(argv)
    if (args.log_max_bytes is not None and args.log_max_bytes < 1) or \
            (args.log_backups is not None and args.log_backups < 0):
        parser.error("--log-max-bytes must be >= 1 and --log-backups >= 0")
    regenerate_if_stale()
    # Only now: these import the generated code.
    from services.common.config import keep_files_private
    from services.testing.mesh import LOG_BACKUPS, LOG_MAX_BYTES, Mesh, write_api_key

    log_max_bytes = LOG_MAX_BYTES if args.log_max_bytes is None else args.log_max_bytes
    log_backups = LOG_BACKUPS if args.log_backups is None else args.log_backups

    keep_files_private()   # the data dir, its logs and the keys file: the owner's only
    # One `make run` per data dir (attack25): a second one came up beside the first on the
    # same files and replaced the demo key, so the first mesh's printed key answered 401.
    # The kernel drops the lock when this process ends, however it ends.
    args.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(args.data_dir / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        print(f"a mesh is already running on {args.data_dir} (scripts/run.py, pid {holder}): stop it "
              "(Ctrl-C) or give this one another --data-dir", file=sys.stderr)
        return 1
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    log_dir = args.data_dir / "logs"
    mesh = (Mesh.on_free_ports(args.data_dir, log_dir=log_dir) if args.free_ports
            else Mesh(args.data_dir, log_dir=log_dir))
    key = write_api_key(mesh.data_dir / "gateway-keys.json")
    stopping = False
    exited = False   # one of the mesh's processes ended on its own: make run fails (exit 1)
    # `make run` is the parent; if it is killed (a terminal closed, `timeout make run`), nothing
    # else tells us, and the mesh would keep running with nobody to stop it. Re-parenting is the
    # signal: stop the same way Ctrl-C does.
    launcher_pid = os.getppid()

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("starting clustering, attribution, privacy, feedback and the gateway ...", flush=True)
    try:
        health = mesh.start_healthy(120)
        print(f"\nHearth is up: gateway {mesh.url}   (logs in {log_dir}/, data in {args.data_dir}/)")
        for name, status in health["services"].items():
            print(f"  {name:<12} grpc 127.0.0.1:{mesh.grpc_ports[name]}  "
                  f"metrics http://127.0.0.1:{mesh.metrics_ports[name]}/metrics  {status}")
        print(f"  gateway      metrics http://127.0.0.1:{mesh.gateway_metrics_port}/metrics")
        print(f"  API docs     {mesh.url}/docs   OpenAPI {mesh.url}/openapi.json")
        print(f"\nDemo API key (admin): {key}\n\nTry:\n"
              f"  curl -s -X POST {mesh.url}/v1/events -H 'X-API-Key: {key}' "
              "-H 'Content-Type: application/json' -d '{\"events\": [{\"event_id\": \"e1\", "
              "\"account_id\": \"acc-1\", \"device_id\": \"tv-1\", \"device_type\": \"tv\", "
              "\"ts\": \"2026-11-01T20:15:00Z\", \"kind\": \"play_start\", \"title_id\": \"t-42\", "
              "\"genres\": [\"drama\"], \"duration_s\": 1800, \"maturity\": \"adult\"}]}'\n"
              f"  curl -s {mesh.url}/v1/household/acc-1 -H 'X-API-Key: {key}'\n"
              "\nCtrl-C stops everything.", flush=True)
        while not stopping:
            if os.getppid() != launcher_pid:
                print("the launcher exited; stopping the mesh", file=sys.stderr, flush=True)
                stopping = True
            for name, proc in mesh.processes.items():
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; see {log_dir}/{name}.log",
                          file=sys.stderr)
                    stopping = exited = True
            # Bounded logs (ops33): every 401 wrote ~650 bytes and nothing rotated them.
            mesh.rotate_logs(log_max_bytes, log_backups)
            time.sleep(0.5)
    except (TimeoutError, RuntimeError) as exc:
        print(f"start-up failed: {exc}\nsee {log_dir}/", file=sys.stderr)
        return 1
    finally:
        print("\nstopping ...", flush=True)
        mesh.stop()
    return 1 if exited else 0


if __name__ == "__main__":
    sys.exit(main())
