"""The transport floor: what one HTTP/JSON -> gRPC hop costs on this machine, with no
Hearth logic at all, measured beside the mesh in the same `make verify` run.

Two processes, started like the mesh's (``python -m bench.floor echo|gateway``):

* ``echo``: a gRPC server built like every Hearth service's (same thread pool size and
  channel options, no interceptors) with one unary method that returns its request
  bytes;
* ``gateway``: a FastAPI app on the gateway's uvicorn settings
  (``gateway.__main__.uvicorn_options``) whose ``POST /v1/assign`` parses the same JSON
  body with the gateway's own pydantic model (``AssignIn``), builds the same protobuf
  request, makes one ``grpc.aio`` unary call to the echo server and answers JSON. No
  authentication, rate limit, tracing, metrics or audit.

The ratio mesh/floor is the figure to watch: everything above the floor is Hearth's own
work (auth, permissions, audit, storage, the model).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path

# The gateway's own request model, at module level so FastAPI resolves the annotation.
from gateway.routes.clustering import AssignIn

ECHO_SERVICE = "hearth.bench.v1.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"


def serve_echo(port: int, max_workers: int) -> None:
    import signal
    import threading

    import grpc

    def echo(request: bytes, _context) -> bytes:
        return request

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="echo-rpc"),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                 ("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)])
    # No (de)serialisers: the request bytes come back as they are.
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"Failed to bind to address 127.0.0.1:{port}")   # the words ports.bind_failures knows
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


def create_floor_app(echo_addr: str):
    import grpc
    from fastapi import FastAPI

    from hearth.clustering.v1 import clustering_pb2 as cpb
    from services.common.tls import channel_options

    state: dict = {}

    @asynccontextmanager
    async def lifespan(_app):
        channel = grpc.aio.insecure_channel(echo_addr, options=channel_options())
        state["echo"] = channel.unary_unary(ECHO_METHOD)
        yield
        await channel.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/assign")
    async def assign(body: AssignIn):
        request = cpb.AssignSessionRequest(account_id=body.account_id)
        if body.session_id is not None:
            request.session_id = body.session_id
        reply = await state["echo"](request.SerializeToString(), timeout=5.0)
        return {"account_id": body.account_id, "echoed_bytes": len(reply)}

    @app.get("/health")
    async def health():
        return {"status": "SERVING"}

    return app


def start_floor(log_dir: Path, timeout_s: float = 60.0) -> tuple[dict[str, subprocess.Popen], str]:
    """Start the floor's two processes on free ports (logs in ``log_dir``), tied to this
    process (PR_SET_PDEATHSIG, like the mesh: a killed benchmark leaves no floor server
    behind); returns them by role and the floor's URL once it answers /health. Each is
    returned once it listens on its port itself, started again on a new one if another
    process took it first (services/testing/ports.py ``serve_on_free_port``; until session
    36 a fixed 0.3 s apart, unprotected)."""
    from bench._common import answers_health
    from services.testing.ports import serve_on_free_port

    root = Path(__file__).resolve().parents[1]
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = {}

    def command(role: str, *argv: str):
        return lambda port: [sys.executable, "-m", "bench.floor", role, "--port", str(port), *argv]

    try:
        procs["echo"], echo_port = serve_on_free_port(command("echo"), log_dir / "floor-echo.log", "the floor's echo",
                                                      timeout_s, cwd=root, env=env)
        procs["gateway"], http_port = serve_on_free_port(
            command("gateway", "--echo-addr", f"127.0.0.1:{echo_port}"), log_dir / "floor-gateway.log",
            "the floor's gateway", timeout_s, cwd=root, env=env)
        url = f"http://127.0.0.1:{http_port}"
        if answers_health(url, timeout_s):
            return procs, url
    except BaseException:
        for proc in procs.values():
            proc.kill()
        raise
    for proc in procs.values():
        proc.kill()
    raise RuntimeError(f"the transport floor did not start (see {log_dir}/floor-*.log)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["echo", "gateway"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--echo-addr", default="")
    parser.add_argument("--max-workers", type=int, default=int(os.environ.get("HEARTH_MAX_WORKERS", "16")))
    args = parser.parse_args()
    if args.role == "echo":
        serve_echo(args.port, args.max_workers)
        return
    import uvicorn

    from gateway.__main__ import uvicorn_options

    uvicorn.run(create_floor_app(args.echo_addr), host="127.0.0.1", port=args.port,
                **uvicorn_options("warning"))


if __name__ == "__main__":
    main()
