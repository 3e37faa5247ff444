"""python -m gateway: validate settings, then serve the FastAPI app with uvicorn."""

from __future__ import annotations

import socket

import uvicorn

from gateway.app import create_app
from gateway.transport import DEFAULT_HEAD_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES, bounded_httptools
from gateway.config import GatewaySettings
from services.common import config, telemetry


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


def main() -> None:
    settings = config.load(GatewaySettings)   # exits naming a bad or unknown HEARTH_* variable
    config.configure_process(settings)        # service tokens, mutual TLS, log pseudonyms
    # /metrics on its own port (settings.metrics_port), like the services.
    telemetry.setup_telemetry("gateway", settings.trace_export, settings.log_level,
                              settings.metrics_port or None, settings.host)
    # HTTPS when a certificate is configured (HEARTH_HTTPS_CERT / HEARTH_HTTPS_KEY);
    # Python's ssl defaults set the floor at TLS 1.2; HTTP clients need no certificate.
    tls = ({"ssl_certfile": str(settings.https_cert), "ssl_keyfile": str(settings.https_key)}
           if settings.https_cert is not None else {})
    for name, path in (("HEARTH_HTTPS_CERT", settings.https_cert), ("HEARTH_HTTPS_KEY", settings.https_key)):
        if path is not None and not path.is_file():
            raise SystemExit(f"invalid configuration:\n  {name}: no such file {path}")
    options = uvicorn_options(settings.log_level, settings.grace_seconds, settings.max_header_bytes,
                              settings.head_timeout_s)
    if not settings.edge_authorizer_port:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.gateway_port, **options, **tls)
        return
    # The Envoy edge's authorizer on a listener of its own (gateway/routes/edge.py): one
    # server, one app and event loop, two sockets; the app tells them apart by port.
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host,
                                           port=settings.gateway_port, **options, **tls))
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
