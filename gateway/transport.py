"""The gateway's HTTP/1.1 transport: uvicorn's httptools protocol with a bound on the
bytes of a request's head (request line and headers).

Why: httptools (llhttp) and uvicorn set no bound of their own. Until session 18 one
anonymous connection that sent ``GET / HTTP/1.1`` and then 200 MB of header lines, never
ending the head, grew the gateway by ~195 MB of memory (a few such connections and the
pod is killed for memory); ``HEARTH_MAX_BODY_BYTES`` bounds only the body. Past
``max_header_bytes`` of head the request is answered ``431`` (JSON error body) and the
connection closed, before the application sees it. Envoy at the edge bounds headers as
well (60 KiB by default), but the gateway's port is reachable inside the cluster.

The head has a deadline too (``head_timeout_s``, HEARTH_HEAD_TIMEOUT_S). Until session 19
a client that trickled a head (a byte a second, never finishing it) held its connection,
and 64 KiB of buffer, for as long as it liked: httptools has no timer, and uvicorn's only
one (``timeout_keep_alive``) runs between a response and the next request's first byte,
never while a head is being read nor before a connection's first request (h11, uvicorn's
other protocol, has none either; the body has its own, ``BodyDeadline``). The deadline
runs while the gateway waits on the client for a head: from the connection's start, and
from the end of each response, until the head is complete. Past it a head that had begun
is answered ``408`` (JSON error body) and the connection closed; a connection that sent
nothing since its last response is closed without a word (an unasked-for 408 on an idle
keep-alive connection could be read as the answer to a request the client sends at that
moment).

A response must be taken too (session 26, attack26). The gateway hands a response to the
transport whole, and what the kernel's socket buffer does not take waits in the process:
until session 26 a client that asked for a large answer (a household page of 10,000
sessions is 5.2 MB) and never read it held the rest of it for as long as it kept the
connection open (the head deadline's ``close()`` waits for the buffer to drain, which it
never does): 150 such connections of one caller grew the gateway by 207 MB and held it;
a few hundred and the pod (512 MiB) is killed. Now, whenever the transport holds more than
its high-water mark of unsent bytes (uvicorn stops writing then) or the connection is
closing with bytes unsent, the client must take at least ``SEND_MIN_BYTES`` (or all that
is left) in every ``head_timeout_s``; a connection that does not is aborted (its buffer
dropped, the connection reset), which also ends a streamed response's handler.
"""

from __future__ import annotations

import json
import logging

from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("hearth.gateway.transport")

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_HEAD_TIMEOUT_S = 10.0
# What a client must take of a response waiting in the gateway's buffer in every head
# deadline (10 s by default: ~100 KiB/s), else the connection is aborted. The gateway's
# clients are the edge (Envoy, a load balancer) and services in the cluster, which read at
# network speed; a 64 MiB export needs at most ~11 minutes at this floor.
SEND_MIN_BYTES = 1024 * 1024
# No route label: the connection may be between requests, and the cut is the client's pace.
RESPONSES_NOT_TAKEN = Counter("hearth_gateway_responses_not_taken_total",
                              "Connections aborted because their client took less than 1 MiB of a waiting "
                              "response in HEARTH_HEAD_TIMEOUT_S")


def replaying_receive(body: bytes, more_body: bool, receive):
    """An ASGI ``receive`` that hands out a body already read, then defers to ``receive``.

    For middleware that must read a request's body before the application does (the body
    deadline before admission, the body-size bound): the application still reads it once,
    through the usual message, and a disconnect after it still reaches it.
    """
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": more_body}
        return await receive()

    return replay


def _close_response(status: bytes, code: str, field: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "field": field, "message": message}}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def bounded_httptools(max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                      head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.run(http=...)`` refusing heads over ``max_header_bytes``
    (431) and heads not complete ``head_timeout_s`` after the gateway began waiting for
    them (408, or a silent close if none had begun)."""
    if max_header_bytes < 1024:
        raise ValueError("max_header_bytes: at least 1024")
    if head_timeout_s <= 0:
        raise ValueError("head_timeout_s: must be positive")
    too_large = _close_response(b"431 Request Header Fields Too Large", "headers_too_large", "headers",
                                f"request head exceeds {max_header_bytes} bytes")
    too_slow = _close_response(b"408 Request Timeout", "request_timeout", "headers",
                               f"request head not received within {head_timeout_s:g} s")

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        # Bytes received since the last head ended; counted only while a head is being
        # read (between requests, and before on_headers_complete), so bodies are not.
        _head_bytes = 0
        _in_head = True
        _head_timer = None
        _send_timer = None
        _send_unsent = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # Checked after parsing: a chunk that completes a head and carries body bytes
            # (or a whole small request) has reset the count by now.
            if self._in_head and self._head_bytes > max_header_bytes and not self.transport.is_closing():
                self._disarm_head_timer()
                self.transport.write(too_large)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_complete()

        def on_response_complete(self) -> None:
            # The gateway waits on the client again unless a pipelined request (its head
            # already complete) is next; while the application runs, no deadline runs.
            waiting = not self.pipeline
            super().on_response_complete()
            if waiting and self._in_head and not self.transport.is_closing():
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head:
                return
            if self.transport.is_closing():   # closed after a response (keep-alive timeout)
                self._watch_send()
                return
            if self._head_bytes:
                self.transport.write(too_slow)
            self.transport.close()
            # close() waits for unsent bytes to drain: the client must still take them.
            self._watch_send()

        def pause_writing(self) -> None:
            # More than the high-water mark unsent: uvicorn writes nothing more to this
            # connection until it drains, so the unsent bytes only shrink from here.
            super().pause_writing()
            self._watch_send()

        def resume_writing(self) -> None:
            # Below the low-water mark: the client took the bytes over it. A streamed
            # response writes again now, so the count starts afresh at the next pause.
            if self._send_timer is not None and not self.transport.is_closing():
                self._send_timer.cancel()
                self._send_timer = None
            super().resume_writing()

        def _watch_send(self) -> None:
            if self._send_timer is None and self.transport.get_write_buffer_size():
                self._send_unsent = self.transport.get_write_buffer_size()
                self._send_timer = self.loop.call_later(head_timeout_s, self._send_check)

        def _send_check(self) -> None:
            self._send_timer = None
            unsent = self.transport.get_write_buffer_size()
            if not unsent or not (self.flow.write_paused or self.transport.is_closing()):
                return   # taken, or below the low-water mark while the response goes on
            if self._send_unsent - unsent < min(SEND_MIN_BYTES, self._send_unsent):
                log.info("a response was not taken by its client (%d bytes unsent, %d taken in %g s): "
                         "connection aborted", unsent, self._send_unsent - unsent, head_timeout_s)
                RESPONSES_NOT_TAKEN.inc()
                self.transport.abort()
                return
            self._send_unsent = unsent
            self._send_timer = self.loop.call_later(head_timeout_s, self._send_check)

    return BoundedHttpToolsProtocol
