"""A real HTTP server on a loopback socket for the tests that need a peer answering
fixed bytes (a Prometheus or an OTLP collector answering a gzip bomb, the OTLP receiver):
``answer`` writes one whole response, ``serving`` runs a handler class on a free port
for the block."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not log every request to stderr."""

    def log_message(self, *_args) -> None:
        pass


def answer(handler: BaseHTTPRequestHandler, body: bytes, content_type: str, *, status: int = 200,
           content_encoding: str | None = None) -> None:
    """One response with its length (and ``Content-Encoding`` when given: the body is sent
    as it is, already encoded)."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if content_encoding:
        handler.send_header("Content-Encoding", content_encoding)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
