"""`hearth rollout run` and `hearth calibrator ...` when the gateway refuses or is not there
(user32, session 32): a refusal (an unknown challenger: 422 `traffic`; a wrong key: 401)
or no gateway at the address ended in an httpx traceback (exit 1), where `hearth keys`
prints the reason and exits 2. Now they print the gateway's answer, or that none came,
on stderr and exit 2."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services import cli

REFUSAL = {"error": {"code": "invalid_argument", "field": "traffic",
                     "message": "traffic: unknown variant 'nosuch'; known: ['gmm', 'kmeans']"}}


class _Refusing(BaseHTTPRequestHandler):
    def _refuse(self):
        length = int(self.headers.get("content-length", "0") or 0)
        self.rfile.read(length)
        data = json.dumps(REFUSAL).encode()
        self.send_response(422)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = _refuse

    def log_message(self, *_args):
        pass


@pytest.fixture
def refusing_gateway():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = [
    ["rollout", "run", "--challenger", "nosuch", "--steps", "5", "--hold-s", "0", "--check-s", "0"],
    ["calibrator", "list", "--variant", "gmm"],
    ["calibrator", "rollback", "--variant", "gmm", "--reason", "r"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_refusal_prints_the_gateways_answer_and_exits_2(refusing_gateway, monkeypatch, capsys, command):
    monkeypatch.setenv("HEARTH_ROLLOUT_API_KEY", "hk_test")
    assert cli.main([*command, "--gateway", refusing_gateway]) == 2
    err = capsys.readouterr().err
    assert "gateway answered 422" in err and "unknown variant 'nosuch'" in err, err


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_no_gateway_at_the_address_says_so_and_exits_2(monkeypatch, capsys, command):
    monkeypatch.setenv("HEARTH_ROLLOUT_API_KEY", "hk_test")
    gateway = f"http://127.0.0.1:{_closed_port()}"
    assert cli.main([*command, "--gateway", gateway]) == 2
    err = capsys.readouterr().err
    assert f"no answer from the gateway at {gateway}" in err, err
