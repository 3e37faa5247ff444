"""A reflection stream is cancelled ``reflection_stream_s`` after it opened
(HEARTH_REFLECTION_STREAM_S, 10 s by default; a constant until session 23): a server built
by build_server and a real channel, a client that opens a stream and never sends."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2_grpc

from services.common import config
from services.common.server import REFLECTION_STREAM_S, build_server


def test_an_idle_reflection_stream_ends_after_the_configured_time():
    running = build_server("reflection-bound", lambda server: [], port=0, reflection_stream_s=1.0)
    release = threading.Event()

    def idle():
        release.wait(60)
        return
        yield  # a request iterator that never sends a request

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        started = time.monotonic()
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(idle())
        with pytest.raises(grpc.RpcError) as ended:
            next(call)   # no request, so no response: the stream ends when the server cancels it
        elapsed = time.monotonic() - started
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        assert 0.9 <= elapsed < REFLECTION_STREAM_S - 2, elapsed
    finally:
        release.set()
        channel.close()
        running.stop(0)


def test_the_reflection_stream_time_is_a_service_setting():
    assert config.ServiceSettings.model_fields["reflection_stream_s"].default == REFLECTION_STREAM_S == 10.0
    assert config.load(config.ServiceSettings, reflection_stream_s=2.5).reflection_stream_s == 2.5
    for bad in (0, -1, 601):
        with pytest.raises(config.ConfigError, match="HEARTH_REFLECTION_STREAM_S"):
            config.load(config.ServiceSettings, reflection_stream_s=bad)
