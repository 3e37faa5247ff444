"""The rollout guard reads at most ``PROMETHEUS_MAX_ANSWER_BYTES`` of a Prometheus answer,
decompressed (attack31). httpx inflates a ``Content-Encoding: gzip`` body and reads a body
of any length: whatever answers at the configured Prometheus address (a replaced Service,
a compromised pod on its name) could send 64 MiB of zeros as 64 KB of gzip, and the guard
— the rollout-webhook pod has 128 MiB — inflated it whole before the JSON parse failed.
A real HTTP server on a socket."""

from __future__ import annotations

import functools
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services import rollout

SMALL = json.dumps({"status": "success", "data": {"result": [{"value": [0, "0.25"]}]}}).encode()


@functools.cache
def _bomb() -> bytes:
    """64 MiB of spaces as ~64 KB of gzip: made when first sent, not when the suite is
    collected (0.2 s of CPU in each of make test's workers otherwise)."""
    return gzip.compress(b" " * (64 << 20), compresslevel=9)


class _Prometheus(BaseHTTPRequestHandler):
    def do_GET(self):   # noqa: N802 - http.server's name
        bomb = "bomb" in self.path
        body = _bomb() if bomb else gzip.compress(SMALL)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def prometheus():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Prometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answer_inflating_past_the_bound_is_refused_without_reading_it_all(prometheus):
    # Before: the 64 MiB were inflated, then json failed on them (a JSONDecodeError).
    with pytest.raises(RuntimeError, match="more than 1048576 bytes"):
        rollout.prometheus_value(prometheus + "/bomb", "up")


def test_a_compressed_answer_within_the_bound_is_read(prometheus):
    assert rollout.prometheus_value(prometheus, "up") == 0.25
