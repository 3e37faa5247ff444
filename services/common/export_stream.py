"""A JSON export streamed in bounded chunks (``hearth.common.v1.ExportChunk``): the
household export's wire form since session 26, from each data holder
(``DataHolder/ExportAccountStream``, services/common/erasure.py) through privacy
(``ExportHouseholdStream``) to the gateway's ``GET /v1/household/{id}/export``.

Until then an export was one gRPC message per hop, so a household whose export passed
the 64 MiB response limit (~240,000 events) could never be exported, and privacy and the
gateway each held the whole household in memory (docs/privacy.md §9).

Three pieces, shared by every hop so that all of them write and check the same way:

* ``json_pieces(value)``: the JSON text ``json.dumps(value, sort_keys=True,
  ensure_ascii=False)`` would write, byte for byte, in pieces; a *lazy* iterable in
  ``value`` (a generator paging a table) is written one item at a time and never held
  whole. ``materialised(value)`` turns the same value into plain lists (the unary call).
* ``chunks(pieces, chunk_bytes)``: the pieces as messages of at most ``chunk_bytes`` data
  each, the last one marked ``complete`` with the SHA-256 and length of all the data.
* ``verified(messages, source)``: the data of a received stream, checked as it goes; a
  stream that ends without the completion marker, or whose digest or length disagree,
  raises ``IncompleteExport`` instead of ending quietly: a part cut short never passes
  for a whole one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from hearth.common.v1 import common_pb2
from services.common.errors import ResourceExhausted, Unavailable

# HEARTH_EXPORT_CHUNK_BYTES's default: far below the 64 MiB response limit, large enough
# that a chunk's per-message cost (~20 µs) is nothing beside its bytes.
CHUNK_BYTES = 1024 * 1024
_chunk_bytes = CHUNK_BYTES


# How many exports one process streams at once (``bounded``): HEARTH_MAX_WORKERS / 4.
STREAMS_AT_ONCE = 4
_streams = threading.BoundedSemaphore(STREAMS_AT_ONCE)
_streams_at_once = STREAMS_AT_ONCE


def configure(chunk_bytes: int, max_workers: int | None = None) -> None:
    """HEARTH_EXPORT_CHUNK_BYTES (and HEARTH_MAX_WORKERS: ``bounded``), from the bootstrap
    (config.configure_process)."""
    global _chunk_bytes, _streams, _streams_at_once
    _chunk_bytes = chunk_bytes
    if max_workers is not None:
        _streams_at_once = max(1, max_workers // 4)
        _streams = threading.BoundedSemaphore(_streams_at_once)


def bounded(messages: Iterable[common_pb2.ExportChunk]) -> Iterator[common_pb2.ExportChunk]:
    """``messages`` streamed while this process streams fewer than HEARTH_MAX_WORKERS / 4
    exports, else RESOURCE_EXHAUSTED (field ``account_id``) before the first one. A streamed
    export holds its RPC worker for as long as its reader takes to read it — a reader that
    reads nothing, for as long as it keeps the call open — and the same workers serve
    every other call (privacy's GetDataKey for every store write): until review26 sixteen
    unread export streams held all of privacy's workers, and a new household's first
    events answered 504. The slot is taken at the first message and given back when the
    stream ends, however it ends (the generator is closed: a cancelled call too)."""
    streams, at_once = _streams, _streams_at_once
    if not streams.acquire(blocking=False):
        raise ResourceExhausted(f"{at_once} household exports are being streamed by this process already: "
                                "retry when one has finished", "account_id")
    try:
        yield from messages
    finally:
        streams.release()


def chunk_bytes() -> int:
    return _chunk_bytes


class IncompleteExport(Unavailable):
    """A streamed export ended before its completion marker, or its bytes disagree with
    the marker's digest or length: no export is given (UNAVAILABLE: export again)."""


def _is_lazy(value: object) -> bool:
    return (not isinstance(value, (str, bytes, bytearray, list, tuple, Mapping))
            and isinstance(value, Iterable))


def json_pieces(value: Any) -> Iterator[str]:
    """``value``'s JSON text in pieces (see the module docstring): objects with sorted
    keys and the default separators, so the joined pieces equal ``json.dumps(value,
    sort_keys=True, ensure_ascii=False)`` of the materialised value."""
    if isinstance(value, Mapping):
        yield "{"
        for i, key in enumerate(sorted(value)):
            yield (", " if i else "") + json.dumps(key, ensure_ascii=False) + ": "
            yield from json_pieces(value[key])
        yield "}"
    elif _is_lazy(value):
        yield "["
        for i, item in enumerate(value):
            yield (", " if i else "") + json.dumps(item, sort_keys=True, ensure_ascii=False)
        yield "]"
    else:
        yield json.dumps(value, sort_keys=True, ensure_ascii=False)


def materialised(value: Any) -> Any:
    """``value`` with every lazy iterable read into a list (the unary ExportAccount)."""
    if isinstance(value, Mapping):
        return {key: materialised(item) for key, item in value.items()}
    if _is_lazy(value):
        return list(value)
    return value


def chunks(pieces: Iterable[str | bytes], size: int | None = None) -> Iterator[common_pb2.ExportChunk]:
    """``pieces`` (UTF-8 text, or bytes already encoded) as ExportChunk messages of at most
    ``size`` data bytes each (default: HEARTH_EXPORT_CHUNK_BYTES); the last one is marked complete with the SHA-256 and byte
    count of all of it. Holds at most one chunk plus one piece."""
    size = size or _chunk_bytes
    if size < 1:
        raise ValueError("size must be positive")
    digest = hashlib.sha256()
    total = 0
    pending = bytearray()
    for piece in pieces:
        data = piece.encode("utf-8") if isinstance(piece, str) else piece
        digest.update(data)
        total += len(data)
        pending += data
        while len(pending) >= size:
            yield common_pb2.ExportChunk(data=bytes(pending[:size]))
            del pending[:size]
    yield common_pb2.ExportChunk(data=bytes(pending), complete=True, sha256=digest.digest(), total_bytes=total)


class Verifier:
    """The running check of one received stream (``verified``; the gateway's async reader of
    privacy's stream): ``take`` each message in order, then ``finish``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.total = 0
        self.done = False
        self._digest = hashlib.sha256()

    def take(self, message: common_pb2.ExportChunk) -> bytes:
        """The message's data; IncompleteExport for data after the completion marker or a
        marker whose digest or length disagree with the bytes taken."""
        if self.done:
            raise IncompleteExport(f"{self.source}'s export sent data after its completion marker", "account_id")
        if message.data:
            self._digest.update(message.data)
            self.total += len(message.data)
        if message.complete:
            if message.total_bytes != self.total or message.sha256 != self._digest.digest():
                raise IncompleteExport(f"{self.source}'s export does not match its completion marker "
                                       f"({self.total} bytes received, {message.total_bytes} sent)", "account_id")
            self.done = True
        return message.data

    def finish(self) -> None:
        """IncompleteExport unless the completion marker was taken."""
        if not self.done:
            raise IncompleteExport(f"{self.source}'s export ended before its completion marker ({self.total} bytes); "
                                   "no partial export is given", "account_id")


def verified(messages: Iterable[common_pb2.ExportChunk], source: str) -> Iterator[bytes]:
    """The data of a streamed export as it arrives, checked (``Verifier``): IncompleteExport
    (naming ``source``) when the stream ends without the completion marker, when the
    marker's digest or length disagree with the bytes received, or when anything follows
    it. The caller must read to the end: only then is the part known to be whole."""
    check = Verifier(source)
    for message in messages:
        data = check.take(message)
        if data:
            yield data
    check.finish()
