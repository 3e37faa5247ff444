"""python -m gateway: validate settings, then serve the FastAPI app with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from gateway.app import create_app
from gateway.transport import DEFAULT_HEAD_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES, bounded_httptools
from gateway.config import GatewaySettings
from services.common import config, telemetry
from services.common.server import PEER_PROBE_TIMEOUT_S, STOP_PEER_WAIT_S

log = logging.getLogger("hearth.gateway")


def uvicorn_options(log_level: str, grace_seconds: float = 10.0,
                    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S) -> dict:
    """The uvicorn settings of the gateway (the transport floor in bench/floor.py uses
    the same, so the two are comparable): uvloop and httptools, the C event loop and
    HTTP parser, measured cheaper per request than asyncio and h11 (docs/benchmarks.md);
    uvicorn's own access log off (the gateway writes its own, with trace ids, hearth.access).
    On SIGTERM requests in flight get ``grace_seconds`` (HEARTH_GRACE_SECONDS) to finish.
    httptools through ``gateway.transport``: a request head over ``max_header_bytes``
    (HEARTH_MAX_HEADER_BYTES) is a 431 and the connection closed, one not complete within
    ``head_timeout_s`` (HEARTH_HEAD_TIMEOUT_S) a 408 (uvicorn has no setting for either)."""
    return {"loop": "uvloop", "http": bounded_httptools(max_header_bytes, head_timeout_s), "log_level": log_level.lower(), "access_log": False,
            "timeout_graceful_shutdown": grace_seconds, "server_header": False,
            # No logging config of uvicorn's own: its loggers propagate to the root
            # handler setup_telemetry installed, so its lines are JSON like every other.
            "log_config": None}


class GatewayServer(uvicorn.Server):
    """uvicorn's server, whose stop also looks after requests waiting on a backend that no
    longer answers. On SIGTERM uvicorn waits for the requests in flight (up to
    HEARTH_GRACE_SECONDS), then cancels them — a 500 with a traceback each — and runs the
    app's shutdown. With a backend frozen (SIGSTOP, a partition) that meant: requests to a
    frozen attribution (60 s deadline) held the stop the whole grace and got 500s, and a
    frozen privacy held it for the requests' 10 s deadline plus the audit sink's flush and
    join (3 s each): 14.6 s measured, up to ~16 s, past the 15 s a pod has after its
    preStop. Now, every ``STOP_PEER_WAIT_S`` while requests are still in flight, the
    services they wait on are asked for their health (``PEER_PROBE_TIMEOUT_S``) and the
    calls to one that does not answer are cancelled: their requests get 503 with
    Retry-After (``ServiceClients.abandon_hung``), as a service's stop does with a hung
    peer (``services.common.server.RunningServer.stop``)."""

    def __init__(self, config: uvicorn.Config, clients) -> None:
        super().__init__(config)
        self._clients = clients

    async def shutdown(self, sockets=None) -> None:
        watcher = asyncio.create_task(self._abandon_hung_services())
        try:
            await super().shutdown(sockets)
        finally:
            watcher.cancel()

    async def _abandon_hung_services(self) -> None:
        while True:
            await asyncio.sleep(STOP_PEER_WAIT_S)
            try:
                await self._clients.abandon_hung(PEER_PROBE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the channels closed under it: nothing left to do
                log.debug("abandoning hung services stopped", exc_info=True)
                return


def main() -> None:
    config.keep_files_private()   # the audit outbox in HEARTH_DATA_DIR: owner only
    settings = config.load(GatewaySettings)   # exits naming a bad or unknown HEARTH_* variable
    config.configure_process(settings, "gateway")   # service tokens, mutual TLS, log pseudonyms
    # /metrics on its own port (settings.metrics_port), like the services.
    telemetry.setup_telemetry("gateway", settings.trace_export, settings.log_level,
                              settings.metrics_port or None, settings.host)
    config.warn_if_shared(settings.data_dir)
    telemetry.watch_data_dir(settings.data_dir, settings.data_dir_size_limit)
    # HTTPS when a certificate is configured (HEARTH_HTTPS_CERT / HEARTH_HTTPS_KEY);
    # Python's ssl defaults set the floor at TLS 1.2; HTTP clients need no certificate.
    tls = ({"ssl_certfile": str(settings.https_cert), "ssl_keyfile": str(settings.https_key)}
           if settings.https_cert is not None else {})
    for name, path in (("HEARTH_HTTPS_CERT", settings.https_cert), ("HEARTH_HTTPS_KEY", settings.https_key)):
        if path is not None and not path.is_file():
            raise SystemExit(f"invalid configuration:\n  {name}: no such file {path}")
    options = uvicorn_options(settings.log_level, settings.grace_seconds, settings.max_header_bytes,
                              settings.head_timeout_s)
    app = create_app(settings)
    server = GatewayServer(uvicorn.Config(app, host=settings.host, port=settings.gateway_port, **options, **tls),
                           app.state.clients)
    if not settings.edge_authorizer_port:
        server.run()
    else:
        # The Envoy edge's authorizer on a listener of its own (gateway/routes/edge.py): one
        # server, one app and event loop, two sockets; the app tells them apart by port.
        server.run(sockets=[listening_socket(settings.host, settings.gateway_port),
                            listening_socket(settings.host, settings.edge_authorizer_port)])
    if not server.started:
        raise SystemExit(3)   # uvicorn.run's startup-failure status


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``uvicorn.Server.run(sockets=...)`` (uvicorn listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    main()
