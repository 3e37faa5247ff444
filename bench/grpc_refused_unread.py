"""Does grpcio's client survive large request messages a server answers without reading them?

docs/security.md, "Attacker's review (session 21)", Left: once (session 22's from-nothing
drill) the pytest process died of SIGSEGV in a grpcio core thread just after four
concurrent 15 MiB calls had been answered UNAUTHENTICATED before the server read them and
their channels were closed. The gateway meets the same client-core path when a service
refuses its token (a keyset mismatch during a rotation) while the request is larger than
the HTTP/2 flow-control window: the server's interceptor answers before it reads the
message (services/common/server.py, ``_Unread``), the client still has bytes to send.

This starts a mesh of real processes and, in a child process of its own (a crash must not
take this one with it), sends ``--iterations`` rounds of ``--calls`` concurrent
``Attribute`` calls whose message is ``--mib`` MiB, carrying a token signed with a key the
service does not know (refused in the auth step, the message never read), in one of these
client shapes:

* ``aio``: the gateway's: one ``grpc.aio`` channel with the gateway's options for the whole
  run; after each round a small call (health ``Check``) on the same channel must succeed;
* ``aio-fresh``: a new ``grpc.aio`` channel a round, closed after it;
* ``sync``: the test's (item 7): a synchronous channel per call, on threads, closed after
  the round;
* ``sync-reuse``: one synchronous channel for the whole run, shared by the threads (the
  services' ``Peer``);
* ``sync-keep``: ``sync`` without closing: every round's channels are kept open.

``--spawn`` has the child start processes (``true``, fork + exec) on a thread throughout,
as the pytest process of the incident starts meshes and senders; ``--tls`` runs the mesh
with mutual TLS, the child holding the gateway's certificate.

``--child-env NAME=VALUE`` sets the child's environment: ``BUSY_THREAD=1`` (a thread busy in
Python, no fork: the control for ``--spawn``), ``SPAWN_WITH_FORK=1`` (``--spawn`` with
``fork()`` instead of ``vfork()``), ``GRPC_ENABLE_FORK_SUPPORT=1``, ``PYTHONPATH=<dir>`` (another
grpcio, installed with ``pip install --no-deps --target <dir> grpcio==X``, for the child
only); ``--gdb`` runs the child under gdb and keeps the crashing thread's backtrace.

    .venv/bin/python -m bench.grpc_refused_unread --mode aio --iterations 300 --calls 4 --mib 15
    .venv/bin/python -m bench.grpc_refused_unread --mode sync --spawn --children 3 --iterations 300

Prints one JSON line per child run: grpcio version, mode, iterations done, status codes
seen, the child's exit code (negative: the signal that killed it), seconds. What it found
(session 23): docs/security.md, "Attacker's review (session 21)", Left.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.testing.mesh import ROOT, running_mesh

_CHILD = r"""
import asyncio, collections, json, os, sys, threading, time
import grpc
from hearth.attribution.v1 import attribution_pb2 as apb
from services.common import tls
from services.common import identity
from services.common.identity import Principal, Role, ServiceTokenSigner

address, mode, iterations, calls, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
spawn = sys.argv[6] == "1"
METHOD = "/hearth.attribution.v1.AttributionService/Attribute"
payload = apb.AttributeRequest(account_ids=["a" * int(mib * 1024 * 1024)]).SerializeToString()
gateway = Principal("svc:gateway", Role.SERVICE)
# Signed with a key the mesh does not hold (a keyset mismatch): refused before the message is read.
metadata = [(identity.PRINCIPAL_KEY, gateway.id), (identity.ROLE_KEY, gateway.role.value),
            (identity.TOKEN_KEY, ServiceTokenSigner(os.urandom(32)).sign(gateway, audience="attribution"))]
options = tls.channel_options() + [("grpc.max_send_message_length", -1)]
codes = collections.Counter()
details = {}   # the first details text per status code
done = 0
started = time.monotonic()

if spawn:
    # Processes started beside the calls (fork + exec from a process whose grpc core
    # threads are busy), as the pytest process of the incident started meshes.
    import subprocess
    if os.environ.get("SPAWN_WITH_FORK") == "1":
        subprocess._USE_VFORK = False   # fork(), not vfork(): tells which one matters
    def spawning():
        while True:
            subprocess.run(["true"])
    threading.Thread(target=spawning, daemon=True).start()

if os.environ.get("BUSY_THREAD") == "1":
    # A control for --spawn: a thread as busy in Python, without forking.
    def busy():
        while True:
            sum(range(100_000))
    threading.Thread(target=busy, daemon=True).start()

def report(note=""):
    # (stdout: the parent reads the last JSON line)
    print(json.dumps({"grpcio": grpc.__version__, "iterations_done": done, "codes": dict(codes), "details": details, "note": note}), flush=True)

async def aio_round(channel):
    rpc = channel.unary_unary(METHOD)
    async def one():
        try:
            await rpc(payload, metadata=metadata, timeout=30)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
            details.setdefault(exc.code().name, exc.details())
    await asyncio.gather(*(one() for _ in range(calls)))

async def aio_main(fresh):
    global done
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    channel = None if fresh else tls.aio_channel(address, options=options)
    for _ in range(iterations):
        if fresh:
            channel = tls.aio_channel(address, options=options)
        await aio_round(channel)
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        codes["health_" + health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)] += 1
        if fresh:
            await channel.close()
        done += 1
    if not fresh:
        await channel.close()

kept = []

def sync_main(reuse, keep=False):
    global done
    shared = tls.channel(address, options=options) if reuse else None
    for _ in range(iterations):
        channels, lock = [], threading.Lock()
        def one():
            channel = shared or tls.channel(address, options=options)
            with lock:
                channels.append(channel)
            try:
                channel.unary_unary(METHOD)(payload, metadata=metadata, timeout=30)
                with lock:
                    codes["OK"] += 1
            except grpc.RpcError as exc:
                with lock:
                    codes[exc.code().name] += 1
                    details.setdefault(exc.code().name, exc.details())
        threads = [threading.Thread(target=one) for _ in range(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if keep:
            kept.extend(channels)   # never closed nor collected while the child runs
        elif shared is None:
            for channel in channels:
                channel.close()
        done += 1
    if shared is not None:
        shared.close()

try:
    if mode in ("sync", "sync-reuse", "sync-keep"):
        sync_main(reuse=(mode == "sync-reuse"), keep=(mode == "sync-keep"))
    else:
        asyncio.run(aio_main(fresh=(mode == "aio-fresh")))
finally:
    report()
"""


def run_child(address: str, mode: str, iterations: int, calls: int, mib: float, timeout_s: float,
              spawn: bool = False, env: dict[str, str] | None = None, gdb: bool = False) -> dict:
    started = time.monotonic()
    wrap = (["gdb", "-q", "-batch", "-ex", "set pagination off", "-ex", "handle SIGPIPE nostop noprint",
             "-ex", "run", "-ex", "bt 40", "-ex", "info threads", "--args"] if gdb else [])
    child = subprocess.run([*wrap, sys.executable, "-c", _CHILD, address, mode, str(iterations), str(calls), str(mib),
                            "1" if spawn else "0"], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                           env={**os.environ, **(env or {})})
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"iterations_done": None, "codes": {}}
    out.update(mode=mode, calls=calls, mib=mib, iterations=iterations, spawn=spawn, tls="HEARTH_TLS_CERT" in (env or {}),
               env={k: v for k, v in (env or {}).items() if not k.startswith("HEARTH_TLS")},
               returncode=child.returncode,
               seconds=round(time.monotonic() - started, 1))
    if child.returncode != 0:
        out["stderr"] = child.stderr[-3000:]
    if gdb:   # gdb's own exit code; its report of the signal and the backtrace
        signal_line = [line for line in child.stdout.splitlines() if "received signal" in line]
        out["gdb_signal"] = signal_line[-1] if signal_line else ""
        out["gdb"] = child.stdout[child.stdout.find("received signal"):][:6000] if signal_line else ""
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", action="append", choices=["aio", "aio-fresh", "sync", "sync-reuse", "sync-keep"],
                    help="client shape (repeatable; default: all three)")
    ap.add_argument("--iterations", type=int, default=50, help="rounds per child process")
    ap.add_argument("--children", type=int, default=1, help="child processes per mode")
    ap.add_argument("--calls", type=int, default=4, help="concurrent calls a round")
    ap.add_argument("--mib", type=float, default=15.0, help="request message size (under the 16 MiB limit)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a child may take")
    ap.add_argument("--spawn", action="store_true", help="the child starts processes (fork + exec) throughout")
    ap.add_argument("--tls", action="store_true", help="mutual TLS in the mesh; the child holds the gateway's "
                                                      "certificate")
    ap.add_argument("--child-env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in the child's environment (GRPC_ENABLE_FORK_SUPPORT=1, GRPC_POLL_STRATEGY=poll, "
                         "SPAWN_WITH_FORK=1: fork() instead of vfork() for --spawn, BUSY_THREAD=1: a busy "
                         "Python thread, the control for --spawn)")
    ap.add_argument("--gdb", action="store_true", help="run the child under gdb: the crashing thread's backtrace")
    args = ap.parse_args()
    child_env = dict(item.split("=", 1) for item in args.child_env)
    with tempfile.TemporaryDirectory(prefix="grpc-refused-") as work, \
            running_mesh(Path(work), extra_env={"HEARTH_LOG_LEVEL": "WARNING"},
                         **({"tls_dir": Path(work) / "certs"} if args.tls else {})) as mesh:
        address = f"127.0.0.1:{mesh.grpc_ports['attribution']}"
        env = {**(mesh.tls_env("gateway") if args.tls else {}), **child_env}
        for mode in args.mode or ["aio", "aio-fresh", "sync"]:
            for _ in range(args.children):
                print(json.dumps(run_child(address, mode, args.iterations, args.calls, args.mib, args.timeout,
                                           args.spawn, env, args.gdb)), flush=True)
        alive = {name: process.poll() is None for name, process in mesh.processes.items()}
        print(json.dumps({"mesh_processes_alive_after": alive}), flush=True)


if __name__ == "__main__":
    main()
