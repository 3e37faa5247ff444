"""The four services wired exactly as their ``__main__`` does, but as gRPC servers inside
one process on free ports: used by the deletion integration tests and by
``bench/privacy.py`` (real servicers, stores, peers and the deletion worker; no
gateway, no subprocesses). Calls made with ``call_as(...)`` carry a principal signed
with this process's service-token key, which the in-process servers accept.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.common import config, identity
from services.common.client import ProcessStub, peer_channel, stub_classes
from services.common.server import RunningServer, build_server
from services.testing.ports import check_exit, free_port, start_on_free_ports

SERVICES = ("privacy", "clustering", "attribution", "feedback")


def serve_service(name: str, settings: Any, port: int = 0) -> tuple[RunningServer, list]:
    """Build service ``name`` as its ``__main__`` does and serve it on ``port`` (0: any
    free one); returns the running server (its stores close when it stops) and the
    ``(add, servicer, full_name)`` entries it serves. ``PortTaken`` when another process
    holds ``port`` (services/testing/ports.py)."""
    module = importlib.import_module(f"services.{name}.__main__")
    servicers, closers = module.build(settings)

    def register(server: grpc.Server) -> list[str]:
        for add, servicer, _ in servicers:
            add(servicer, server)
        return [full for _, _, full in servicers]

    try:
        running = build_server(name, register, port=port, max_workers=16,
                               reflection_stream_s=settings.reflection_stream_s)
    except BaseException as exc:   # its port taken, say: its stores are closed, as a stop would
        for close in closers:
            close()
        if port and isinstance(exc, (RuntimeError, OSError)):   # a drawn port another process took
            check_exit(f"{name} (in process)", str(exc), [port])
        raise
    running.on_stop.extend(closers)
    return running, servicers


@dataclass
class InProcessMesh:
    addresses: dict[str, str]
    servers: dict[str, RunningServer] = field(default_factory=dict)
    servicers: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _channels: list = field(default_factory=list)

    def start_service(self, name: str) -> None:
        """Build ``name`` as its ``__main__`` does and serve it on its port."""
        running, servicers = serve_service(name, self.settings[name], self.ports[name])
        self.servers[name] = running
        self.servicers[name] = servicers[0][1]

    def stop_service(self, name: str) -> None:
        """Stop serving and close its stores, like SIGTERM does (restart with start_service)."""
        self.servers.pop(name).stop(0.2)

    def stub(self, service: str, acting_as: identity.Principal | None = None, stub_cls=None):
        """A stub of ``service`` (its own API, or ``stub_cls`` such as DataHolderStub)
        whose calls act as ``acting_as`` (default: an admin)."""
        principal = acting_as or identity.Principal("test-admin", identity.Role.ADMIN)
        channel = peer_channel(self.addresses[service], "test", timeout_s=30.0, audience=service)
        self._channels.append(channel)
        stub = stub_cls(channel) if stub_cls is not None else ProcessStub(channel, stub_classes(service))
        return _Acting(stub, principal)

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        for name in reversed(list(self.servers)):
            self.servers[name].stop(0.5)
        self.servers.clear()


class _Acting:
    """Wraps a stub so each call runs under ``identity.acting_as(principal)``."""

    def __init__(self, stub, principal: identity.Principal) -> None:
        self._stub = stub
        self._principal = principal

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        def call(*args, **kwargs):
            with identity.acting_as(self._principal):
                return method(*args, **kwargs)

        return call


def start(data_dir: Path, *, storage: str = "sqlite", postgres_dsn: str = "", redis_url: str = "",
          privacy: Mapping[str, Any] | None = None, services: tuple[str, ...] = SERVICES,
          postgres_dsns: Mapping[str, str] | None = None) -> InProcessMesh:
    """Build and start ``services`` on free ports. ``privacy``: overrides of
    ``PrivacySettings`` (the retention purge is off unless given). ``postgres_dsns``:
    a service's own DSN over ``postgres_dsn`` (a login per service, as deployed). A port
    another process took before its server bound it: every server stopped, all the ports
    drawn again and started again (services/testing/ports.py), as a mesh of processes."""
    def attempt(_number: int) -> InProcessMesh:
        ports = {s: free_port() for s in SERVICES}
        addresses = {s: f"127.0.0.1:{p}" for s, p in ports.items()}
        common = dict(data_dir=Path(data_dir), storage=storage, postgres_dsn=postgres_dsn, redis_url=redis_url,
                      metrics_port=0, **{f"{s}_addr": a for s, a in addresses.items()})
        mesh = InProcessMesh(addresses, ports=ports)
        try:
            for name in services:
                own = {"retention_check_s": 0.0, **dict(privacy or {})} if name == "privacy" else {}
                if postgres_dsns and name in postgres_dsns:
                    own["postgres_dsn"] = postgres_dsns[name]
                mesh.settings[name] = config.load(config.service_settings_class(name), service_name=name,
                                                  **{**common, **own})
                mesh.start_service(name)
        except BaseException:
            mesh.stop()
            raise
        return mesh

    return start_on_free_ports(attempt, f"the in-process mesh in {data_dir}")
