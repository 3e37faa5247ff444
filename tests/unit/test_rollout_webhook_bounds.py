"""`hearth rollout webhook` bounds what a connection may hold (attack30). It serves a thread
per connection and, with the chart's default `rolloutWebhook.from: []`, any pod may connect:
a connection that sent nothing held its thread for ever (no socket timeout), and a body was
read as long as its Content-Length said — 10**12 with the right token allocated for it, a
negative one read until the client closed. Alertmanager's alerts queue behind such
connections, so the kill switch they turn on was late or never set. A real server on a
socket, the handler from ``make_webhook``; the experiment is never reached here."""

from __future__ import annotations

import socket
import threading
import time
from http.server import ThreadingHTTPServer

import pytest

from services import rollout


@pytest.fixture
def webhook(monkeypatch):
    monkeypatch.setattr(rollout, "WEBHOOK_IO_TIMEOUT_S", 1.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), rollout.make_webhook(None, "the-token"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _exchange(port: int, request: bytes, wait_s: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(webhook):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", webhook), timeout=10.0) as s:
        assert s.recv(1) == b""   # closed by the server (a socket.timeout here before)
    assert time.monotonic() - started < 8.0


def test_a_body_larger_than_the_bound_is_refused_before_it_is_read(webhook):
    answer = _exchange(webhook, b"POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer the-token\r\n"
                                b"Content-Length: 1000000000000\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.0 413"), answer[:200]


def test_a_negative_content_length_is_refused(webhook):
    answer = _exchange(webhook, b"POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer the-token\r\n"
                                b"Content-Length: -1\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.0 400"), answer[:200]


def test_a_connection_that_trickles_its_request_is_cut_at_the_deadline(webhook):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", webhook), timeout=10.0) as s:
        try:
            for byte in b"POST /alerts HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                s.sendall(bytes([byte]))   # a byte every 0.2 s: each read well within the timeout
                time.sleep(0.2)
                if time.monotonic() - started > 8.0:
                    break
            got = s.recv(1)
        except OSError:   # reset by the server's shutdown
            got = b""
    assert got == b"" and time.monotonic() - started < 8.0


@pytest.mark.parametrize("body", [b'{"alerts": 5}', b'{"alerts": [{"status": "firing", "labels": ["action"]}]}',
                                  b'{"alerts": [{"status": "firing", "labels": {"action": "rollback"}, '
                                  b'"annotations": "x"}]}'])
def test_an_alert_payload_of_the_wrong_shape_is_400_naming_the_field(webhook, body):
    answer = _exchange(webhook, b"POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer the-token\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert answer.startswith(b"HTTP/1.0 400"), answer[:200]
    assert b"alerts" in answer
