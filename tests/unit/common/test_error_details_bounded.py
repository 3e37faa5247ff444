"""A refusal's message is cut to ``MAX_STATUS_DETAILS_CHARS`` (attack31): gRPC refuses
trailers over 16 KiB, so a message that echoed a long input (``position_weights`` of a
million values: 5 MB) reached the caller as RESOURCE_EXHAUSTED naming no field instead of
the INVALID_ARGUMENT naming it. Through a real server and channel on loopback."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import ERROR_FIELD_KEY, InvalidArgument
from services.common.server import MAX_STATUS_DETAILS_CHARS, _map_error


def _refuse(request, context):
    try:
        raise InvalidArgument("got " + ", ".join(["0.1"] * 1_000_000), "position_weights")
    except InvalidArgument as exc:
        _map_error(exc, context, "/t.T/Refuse")


@pytest.fixture(scope="module")
def server_port():
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.T", {"Refuse": grpc.unary_unary_rpc_method_handler(_refuse)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_a_long_refusal_message_is_cut_and_keeps_its_code_and_field(server_port):
    with grpc.insecure_channel(f"127.0.0.1:{server_port}") as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/t.T/Refuse")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert dict(info.value.trailing_metadata())[ERROR_FIELD_KEY] == "position_weights"
    details = info.value.details()
    assert details.startswith("position_weights: got 0.1, 0.1") and len(details) <= MAX_STATUS_DETAILS_CHARS
    assert details.endswith("characters in all)")
