"""The gateway's HTTP/1.1 transport: uvicorn's httptools protocol with a bound on the
bytes of a request's head (request line and headers).

Why: httptools (llhttp) and uvicorn set no bound of their own. Until session 18 one
anonymous connection that sent ``GET / HTTP/1.1`` and then 200 MB of header lines, never
ending the head, grew the gateway by ~195 MB of memory (a few such connections and the
pod is killed for memory); ``HEARTH_MAX_BODY_BYTES`` bounds only the body. Past
``max_header_bytes`` of head the request is answered ``431`` (JSON error body) and the
connection closed, before the application sees it. Envoy at the edge bounds headers as
well (60 KiB by default), but the gateway's port is reachable inside the cluster.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_MAX_HEADER_BYTES = 64 * 1024


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


def bounded_httptools(max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.run(http=...)`` refusing heads over ``max_header_bytes``."""
    if max_header_bytes < 1024:
        raise ValueError("max_header_bytes: at least 1024")
    body = json.dumps({"error": {"code": "headers_too_large", "field": "headers",
                                 "message": f"request head exceeds {max_header_bytes} bytes"}}).encode()
    response = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        # Bytes received since the last head ended; counted only while a head is being
        # read (between requests, and before on_headers_complete), so bodies are not.
        _head_bytes = 0
        _in_head = True

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # Checked after parsing: a chunk that completes a head and carries body bytes
            # (or a whole small request) has reset the count by now.
            if self._in_head and self._head_bytes > max_header_bytes and not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_complete()

    return BoundedHttpToolsProtocol
