"""A handler whose call to a peer is refused UNAUTHENTICATED — the peer refused this
service's token: their clocks disagree by more than the tokens' skew, or their keys do
(clock24; docs/operations.md, "Clock steps") — answers UNAVAILABLE as for a peer that is
down, not INTERNAL with a traceback (the gateway's 502 "upstream error" for every request
that needed the peer: a privacy replica 40 s behind, every POST /v1/events)."""

from __future__ import annotations

import logging

import grpc
import pytest

from services.common.errors import ERROR_CODE_KEY
from services.common.server import _map_error


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.trailing = ()
        self.status = None

    def set_trailing_metadata(self, trailing) -> None:
        self.trailing = trailing

    def abort(self, code, details):
        self.status = (code, details)
        raise _Aborted


class _PeerRefused(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self):
        return "x-hearth-token: invalid service token"


def test_a_peer_refusing_this_services_token_is_unavailable_not_internal(caplog):
    context = _Context()
    with caplog.at_level(logging.WARNING, logger="hearth.server"), pytest.raises(_Aborted):
        try:
            raise _PeerRefused()
        except _PeerRefused as exc:
            _map_error(exc, context, "/hearth.clustering.v1.ClusteringService/IngestEvents")
    assert context.status[0] == grpc.StatusCode.UNAVAILABLE
    assert dict(context.trailing)[ERROR_CODE_KEY] == "unavailable"
    assert "refused this service's token" in caplog.text and "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
