"""A mesh whose drawn ports another process takes before its servers bind them (a second
test suite on the machine: session 34's final checks saw "privacy exited ... Failed to bind
to address 127.0.0.1:14712" fail a whole fixture, twice in ~15 minutes of two suites) still
comes up: ``Mesh.start_healthy``, which ``running_mesh`` and every fixture use, stops it,
draws all its ports again and starts it again. A port taken at every attempt is a clear
error after the bounded attempts, not a hang."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from services.testing import ports
from services.testing.mesh import Mesh, PortTaken, write_api_key
from tests.helpers.waiting import SLOW_MACHINE_S


class _ServingGateway(BaseHTTPRequestHandler):
    """Another suite's gateway, as ours would be seen from outside: /health says SERVING."""

    def do_GET(self):   # noqa: N802 - http.server's name
        body = json.dumps({"status": "SERVING", "services": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002
        pass


def test_a_mesh_whose_drawn_ports_another_suite_takes_comes_up_on_new_ports(tmp_path, caplog):
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "clash-admin", "admin")
    taken_grpc, taken_gateway = mesh.grpc_ports["privacy"], mesh.gateway_port
    # Between the draw and the bind, another suite takes two of the ports: privacy's gRPC
    # port (a plain listener) and the gateway's, where ITS gateway answers /health SERVING.
    other_grpc = socket.socket()
    other_grpc.bind(("127.0.0.1", taken_grpc))
    other_grpc.listen()
    other_gateway = ThreadingHTTPServer(("127.0.0.1", taken_gateway), _ServingGateway)
    threading.Thread(target=other_gateway.serve_forever, daemon=True).start()
    try:
        with caplog.at_level(logging.WARNING, logger="hearth.testing.ports"):
            health = mesh.start_healthy(SLOW_MACHINE_S)
        try:
            assert health["status"] == "SERVING" and set(health["services"]) == set(mesh.grpc_ports)
            assert mesh.grpc_ports["privacy"] != taken_grpc and mesh.gateway_port != taken_gateway
            assert all(proc.poll() is None for proc in mesh.processes.values())
            # Our gateway, in front of our services: an authenticated request answered.
            r = httpx.get(mesh.url + "/v1/household/clash-acc", headers={"X-API-Key": key}, timeout=SLOW_MACHINE_S)
            assert r.status_code in (200, 404), r.text
            retries = [r.getMessage() for r in caplog.records]
            assert retries and any(f"port {port} was taken" in m for m in retries for port in
                                   (taken_grpc, taken_gateway)), retries
        finally:
            mesh.stop()
    finally:
        other_gateway.shutdown()
        other_gateway.server_close()
        other_grpc.close()


def test_a_port_taken_at_every_attempt_is_a_clear_error_after_the_attempts(tmp_path, monkeypatch):
    """The other suite wins every race: each time the mesh draws its ports, privacy's gRPC
    port is taken before privacy binds it."""
    monkeypatch.setattr(ports, "ATTEMPTS", 2)   # the bound, not its size, is what is tested
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
    write_api_key(mesh.data_dir / "gateway-keys.json", "clash-admin", "admin")
    others: list[socket.socket] = []
    taken: list[int] = []

    def take_privacy_port() -> None:
        other = socket.socket()
        other.bind(("127.0.0.1", mesh.grpc_ports["privacy"]))
        other.listen()
        others.append(other)
        taken.append(mesh.grpc_ports["privacy"])

    take_privacy_port()
    draw = mesh.draw_ports

    def draw_then_take() -> None:
        draw()
        take_privacy_port()

    monkeypatch.setattr(mesh, "draw_ports", draw_then_take)
    started = time.monotonic()
    try:
        with pytest.raises(PortTaken) as info:
            mesh.start_healthy(SLOW_MACHINE_S)
    finally:
        for other in others:
            other.close()
    assert "a port was taken at start-up on each of 2 attempts" in str(info.value)
    assert info.value.what == "privacy" and info.value.port == taken[-1], str(info.value)
    assert len(taken) == 2 and not mesh.processes   # every attempt's processes stopped
    assert time.monotonic() - started < SLOW_MACHINE_S


def test_a_process_stopped_to_be_restarted_keeps_its_port_from_other_suites(tmp_path):
    """A process restarted on its own port (its peers hold the address: outage tests,
    rolling upgrades) cannot move, so while it is down no other suite may take the port:
    the mesh holds every port it gave (``ports.hold_port``) until it stops. Another suite's
    draw (``free_port``'s check, a plain bind) fails on it; our process binds it again."""
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
    try:
        mesh.start_listening(["privacy"], SLOW_MACHINE_S)
        port = mesh.grpc_ports["privacy"]
        mesh.stop_process("privacy")
        other = socket.socket()   # what another suite's free_port() does before handing it out
        try:
            with pytest.raises(OSError, match="in use"):
                other.bind(("127.0.0.1", port))
        finally:
            other.close()
        mesh.start_service("privacy")
        mesh.wait_bound(["privacy"], SLOW_MACHINE_S)
        assert ports.listened_by(mesh.processes["privacy"].pid, [port]) == {port}
    finally:
        mesh.stop()
    free = socket.socket()   # let go when the mesh stops
    try:
        free.bind(("127.0.0.1", port))
    finally:
        free.close()
