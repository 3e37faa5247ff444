"""`make run`: start the mesh on SQLite under ./var, print where it listens, stop all on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from services.common.config import keep_files_private
from services.testing.mesh import ROOT, Mesh, write_api_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var",
                        help="where the SQLite files, keys and logs go (default ./var)")
    parser.add_argument("--free-ports", action="store_true",
                        help="listen on free ports instead of 8080/50051-50054/9100-9104 "
                             "(a second mesh beside a running one)")
    args = parser.parse_args(argv)
    keep_files_private()   # the data dir, its logs and the keys file: the owner's only
    log_dir = args.data_dir / "logs"
    mesh = (Mesh.on_free_ports(args.data_dir, log_dir=log_dir) if args.free_ports
            else Mesh(args.data_dir, log_dir=log_dir))
    key = write_api_key(mesh.data_dir / "gateway-keys.json")
    stopping = False
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
    mesh.start()
    try:
        health = mesh.wait_healthy(120)
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
                    stopping = True
            time.sleep(0.5)
    except (TimeoutError, RuntimeError) as exc:
        print(f"start-up failed: {exc}\nsee {log_dir}/", file=sys.stderr)
        return 1
    finally:
        print("\nstopping ...", flush=True)
        mesh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
