"""`make run`: start the mesh on SQLite under ./var, print where it listens, stop all on Ctrl-C."""

from __future__ import annotations

import signal
import sys
import time

from services.testing.mesh import ROOT, Mesh, write_api_key


def main() -> int:
    mesh = Mesh(ROOT / "var", log_dir=ROOT / "var" / "logs")
    key = write_api_key(mesh.data_dir / "gateway-keys.json")
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("starting clustering, attribution, privacy, feedback and the gateway ...", flush=True)
    mesh.start()
    try:
        health = mesh.wait_healthy(120)
        print(f"\nHearth is up: gateway {mesh.url}   (logs in var/logs/, data in var/)")
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
            for name, proc in mesh.processes.items():
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; see var/logs/{name}.log",
                          file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    except (TimeoutError, RuntimeError) as exc:
        print(f"start-up failed: {exc}\nsee var/logs/", file=sys.stderr)
        return 1
    finally:
        print("\nstopping ...", flush=True)
        mesh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
