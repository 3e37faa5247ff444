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

import pytest

from services import rollout
from tests.helpers.http_peer import QuietHandler, answer, serving

SMALL = json.dumps({"status": "success", "data": {"result": [{"value": [0, "0.25"]}]}}).encode()


@functools.cache
def _bomb() -> bytes:
    """64 MiB of spaces as ~64 KB of gzip: made when first sent, not when the suite is
    collected (0.2 s of CPU in each of make test's workers otherwise)."""
    return gzip.compress(b" " * (64 << 20), compresslevel=9)


class _Prometheus(QuietHandler):
    def do_GET(self):   # noqa: N802 - http.server's name
        answer(self, _bomb() if "bomb" in self.path else gzip.compress(SMALL), "application/json",
               content_encoding="gzip")


@pytest.fixture(scope="module")
def prometheus():
    with serving(_Prometheus) as url:
        yield url


def test_an_answer_inflating_past_the_bound_is_refused_without_reading_it_all(prometheus):
    # Before: the 64 MiB were inflated, then json failed on them (a JSONDecodeError).
    with pytest.raises(RuntimeError, match="more than 1048576 bytes"):
        rollout.prometheus_value(prometheus + "/bomb", "up")


def test_a_compressed_answer_within_the_bound_is_read(prometheus):
    assert rollout.prometheus_value(prometheus, "up") == 0.25
