"""What large gRPC messages cost a service process's memory: ``--calls`` concurrent calls
of ``--mib`` MiB each (one string field of ``AttributeRequest``) to a service's gRPC port
of a mesh of real processes, without a token (``--caller anonymous``, the attacker of
docs/security.md "Attacker's review (session 21)") or as an analyst signed as the
gateway signs a person (``--caller analyst``); the service process's RSS
(``/proc/<pid>/status``) before, at its peak (polled every 5 ms) and after, and the
status codes the calls got.

    .venv/bin/python -m bench.grpc_message_rss --calls 8 --mib 60
    .venv/bin/python -m bench.grpc_message_rss --root /tmp/base-tree   # an older tree

``--root``: the source tree the mesh runs from (e.g. ``git archive <ref>`` with this
checkout's generated ``hearth/`` copied in), to measure a commit before a change.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from services.common import identity
from services.common.identity import Principal, Role
from services.testing.mesh import ROOT, running_mesh

METHOD = "/hearth.attribution.v1.AttributionService/Attribute"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def message(mib: float) -> bytes:
    """An AttributeRequest whose ``account_ids`` holds one string of ``mib`` MiB."""
    size = int(mib * 1024 * 1024)
    length, n = bytearray(), size
    while True:
        length.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return b"\x0a" + bytes(length) + b"a" * size


def measure(address: str, pid: int, calls: int, mib: float, metadata: list[tuple[str, str]]) -> dict:
    payload = message(mib)
    before = rss_mb(pid)
    peak, stop = [before], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.005)

    codes: Counter = Counter()
    details: set[str] = set()
    lock = threading.Lock()

    def call() -> None:
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
            try:
                channel.unary_unary(METHOD)(payload, metadata=metadata, timeout=60)
                code, text = "OK", ""
            except grpc.RpcError as exc:
                code, text = exc.code().name, exc.details() or ""
        with lock:
            codes[code] += 1
            details.add(text[:100])

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - started
    time.sleep(1.0)
    stop.set()
    poller.join()
    return {"calls": calls, "mib_each": mib, "rss_before_mb": round(before), "rss_peak_mb": round(peak[0]),
            "rss_after_mb": round(rss_mb(pid)), "seconds": round(took, 2), "codes": dict(codes),
            "details": sorted(details)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="source tree the mesh runs from")
    ap.add_argument("--service", default="attribution")
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--mib", type=float, default=60.0)
    ap.add_argument("--caller", choices=("anonymous", "analyst"), default="anonymous")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="grpc-rss-") as work, \
            running_mesh(Path(work), root=args.root.resolve(), extra_env={"HEARTH_LOG_LEVEL": "WARNING"}) as mesh:
        metadata: list[tuple[str, str]] = []
        if args.caller == "analyst":
            analyst = Principal("bench-analyst", Role.ANALYST)
            metadata = [(identity.PRINCIPAL_KEY, analyst.id), (identity.ROLE_KEY, analyst.role.value),
                        (identity.TOKEN_KEY, mesh.signer("gateway").sign(analyst, audience=args.service))]
        pid = mesh.processes[args.service].pid
        time.sleep(2.0)   # start-up settles
        result = measure(f"127.0.0.1:{mesh.grpc_ports[args.service]}", pid, args.calls, args.mib, metadata)
        print(json.dumps({"root": str(args.root), "service": args.service, "caller": args.caller, **result},
                         indent=1))


if __name__ == "__main__":
    main()
