"""What serving one unary RPC costs the server process, by gRPC server kind (issue #11).

    python -m bench.grpc_server [--seconds 6] [--rounds 3] [--concurrency 16]
                                [--variants sync16,sync4,aio,aio-pool,hearth] [--baseline REF]

A question the assign hot path raised: clustering spends ~0.4 ms per assign in grpcio's
sync server loop (``_serve``, the thread that takes every call's events from the core and
hands the call to the pool) besides its interceptor and its own work. Would grpc.aio's
server, or fewer threads, be cheaper? Each variant is an echo server in its own process
(``python -m bench.grpc_server serve VARIANT PORT``) returning its request bytes:

* ``sync16`` / ``sync4``: ``grpc.server`` with a 16- / 4-thread pool, no interceptor (the
  transport floor's echo, ``bench/floor.py``, is ``sync16``);
* ``aio``: ``grpc.aio.server`` with an ``async def`` handler (one event loop thread);
* ``aio-pool``: ``grpc.aio.server(migration_thread_pool=16 threads)`` running the same
  *sync* handler in the pool: what the services would get by switching the server and
  keeping their blocking servicers;
* ``hearth``: ``services.common.server.build_server`` as every service runs it (16
  threads, ``HearthInterceptor``: span, metrics, drain, deadline check, signed service
  token, permission check, the audit record of the RPC into an ``AuditSink`` whose
  transport keeps the records in memory), the echo registered as clustering's
  ``AssignSession`` (audited as ``assign``).

``--baseline REF`` adds ``hearth@REF``: the ``hearth`` variant served from commit REF's
tree (``git archive``; this file copied in), to measure a change of the interceptor.

The client (this process, grpc.aio, ``--concurrency`` calls in flight, a 200-byte
request with a signed gateway principal and a W3C traceparent, as the gateway sends)
drives each variant closed loop for ``--seconds``; the server's CPU (utime + stime from
/proc) over the run divided by the calls answered is the figure. Variants alternate
within each round; medians over rounds. Prints one JSON object last:
``{"variants": {name: {"cpu_us_per_call": median, "calls_per_s": median, "runs": [...]}}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

from bench._common import cpu_model, log
from bench.verify import proc_sample

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("sync16", "sync4", "aio", "aio-pool", "hearth")
ECHO_METHOD = "/hearth.clustering.v1.ClusteringService/AssignSession"
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)]


def _echo(request: bytes, _context) -> bytes:
    return request


async def _echo_async(request: bytes, _context) -> bytes:
    return request


def _handlers(grpc, fn):
    service, method = ECHO_METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(fn)})


def _wait_for_signal() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


def serve(variant: str, port: int) -> None:
    import grpc

    address = f"127.0.0.1:{port}"
    if variant in ("sync16", "sync4"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16 if variant == "sync16" else 4),
                             options=_OPTIONS)
        server.add_generic_rpc_handlers([_handlers(grpc, _echo)])
        server.add_insecure_port(address)
        server.start()
        _wait_for_signal()
        server.stop(0)
        return
    if variant == "hearth":
        from services.common import audit, config, server as hearth_server, telemetry

        settings = config.load(config.ServiceSettings, service_name="clustering")
        config.configure_process(settings)
        telemetry.setup_telemetry("clustering", "none", "WARNING")
        audit.install(audit.AuditSink(audit.MemoryAuditTransport(), component="clustering"))

        def register(server):
            server.add_generic_rpc_handlers([_handlers(grpc, _echo)])
            return []

        running = hearth_server.build_server("clustering", register, port=port, max_workers=16)
        _wait_for_signal()
        running.server.stop(0)
        return

    async def main() -> None:
        pool = futures.ThreadPoolExecutor(max_workers=16) if variant == "aio-pool" else None
        server = grpc.aio.server(migration_thread_pool=pool, options=_OPTIONS)
        server.add_generic_rpc_handlers([_handlers(grpc, _echo if pool else _echo_async)])
        server.add_insecure_port(address)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(address: str, seconds: float, concurrency: int, metadata) -> tuple[int, int]:
    import grpc

    payload = os.urandom(200)
    async with grpc.aio.insecure_channel(address, options=_OPTIONS) as channel:
        call = channel.unary_unary(ECHO_METHOD)
        await asyncio.wait_for(channel.channel_ready(), 30)
        for _ in range(50):   # warm: connection, the server's first-call paths
            await call(payload, metadata=metadata, timeout=10)
        done = errors = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                try:
                    await call(payload, metadata=metadata, timeout=10)
                    done += 1
                except grpc.RpcError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, errors


def _metadata():
    from services.common import config, identity

    config.configure_process(config.load(config.ServiceSettings, service_name="gateway"))
    return (*identity.service_principal("gateway").metadata("clustering"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))


def measure(variant: str, seconds: float, concurrency: int, trees: dict[str, Path] | None = None) -> dict:
    port = _free_port()
    name, _, ref = variant.partition("@")
    root = (trees or {}).get(ref, ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "bench.grpc_server", "serve", name, str(port)],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        metadata = _metadata()
        # Warm-up calls first (inside _drive), then the measured window.
        asyncio.run(_drive(f"127.0.0.1:{port}", 0.5, concurrency, metadata))
        before, t0 = proc_sample(proc.pid), time.monotonic()
        done, errors = asyncio.run(_drive(f"127.0.0.1:{port}", seconds, concurrency, metadata))
        after, wall = proc_sample(proc.pid), time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"cpu_us_per_call": round(1e6 * (after[0] - before[0]) / max(done, 1), 1),
            "calls_per_s": round(done / wall, 1), "errors": errors}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="server CPU per unary call, by gRPC server kind")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--baseline", default="", help="git commit whose build_server runs as hearth@REF")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}, known {list(VARIANTS)}")
    os.environ.setdefault("HEARTH_SERVICE_TOKEN_KEY", os.urandom(32).hex())
    with tempfile.TemporaryDirectory(prefix="hearth-grpc-server-") as tmp:
        trees = {}
        if args.baseline:
            from bench.assign_cpu import extract

            trees[args.baseline] = extract(args.baseline, Path(tmp) / "baseline")
            shutil.copy(Path(__file__), trees[args.baseline] / "bench" / "grpc_server.py")
            variants.append(f"hearth@{args.baseline}")
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for variant in variants:
                run = measure(variant, args.seconds, args.concurrency, trees)
                runs[variant].append(run)
                log(f"round {r + 1} {variant}: {run}")
    report = {"machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "load_average": os.getloadavg()},
              "seconds": args.seconds, "rounds": args.rounds, "concurrency": args.concurrency,
              "variants": {v: {"cpu_us_per_call": statistics.median(x["cpu_us_per_call"] for x in rs),
                               "calls_per_s": statistics.median(x["calls_per_s"] for x in rs),
                               "errors": sum(x["errors"] for x in rs), "runs": rs}
                           for v, rs in runs.items()}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
