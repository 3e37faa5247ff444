"""In-process servers on port 0 built by the same code path as production (build_server
+ each service's build()), for contract tests."""

from __future__ import annotations

import importlib

import grpc
import pytest

from services.common import config
from services.common.identity import Principal, Role
from services.common.server import build_server

ADMIN = Principal("test-admin", Role.ADMIN)


@pytest.fixture
def start_service(tmp_path):
    started = []

    def start(name: str, **overrides):
        settings = config.load(service_name=name, data_dir=tmp_path / name, **overrides)
        module = importlib.import_module(f"services.{name}.__main__")
        servicers, closers = module.build(settings)

        def register(server):
            for add, servicer, _ in servicers:
                add(servicer, server)
            return [full for _, _, full in servicers]

        running = build_server(name, register, port=0)
        running.on_stop.extend(closers)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, channel

    yield start
    for running, channel in started:
        channel.close()
        running.stop(0)
