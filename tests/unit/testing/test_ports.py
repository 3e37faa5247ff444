"""services/testing/ports.py: a server's exit on a port another process took is recognised
from what the server itself prints, and what started it starts again on new ports, a bounded
number of times (session 34's final checks: two suites on one machine, "Failed to bind to
address 127.0.0.1:14712", a whole fixture failed)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from services.common import telemetry
from services.testing import ports
from services.testing.ports import PortTaken, check_exit, free_port, listened_by, start_on_free_ports


@pytest.fixture
def taken():
    """A drawn port another process holds (bound and listening, as a second suite's server)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", free_port()))
        other.listen()
        yield other.getsockname()[1]


def _raised(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return f"{type(info.value).__name__}: {info.value}"


def test_what_grpc_python_and_the_metrics_port_say_on_a_taken_port_is_recognised(taken):
    """Real messages, got by binding the taken port the way each server does."""
    other = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    grpc_said = _raised(lambda: server.add_insecure_port(f"127.0.0.1:{taken}"))
    with pytest.raises(PortTaken) as info:
        check_exit("privacy", grpc_said, [other, taken])
    assert info.value.port == taken and "Failed to bind" in info.value.line

    # The metrics port's OSError chained to the socket's (a traceback prints both): the line
    # naming the port is the one reported.
    metrics_said = _raised(lambda: telemetry.serve_metrics(taken, "127.0.0.1"))
    assert f"127.0.0.1:{taken}" in metrics_said
    with pytest.raises(PortTaken) as info:
        check_exit("gateway", "OSError: [Errno 98] Address already in use\n\nThe above exception was the direct "
                   f"cause of the following exception:\n\n{metrics_said}", [other, taken])
    assert info.value.port == taken


def test_other_exits_are_not_taken_for_a_port_clash():
    check_exit("privacy", "HEARTH_API_KEYS_FILE: cannot read API keys from /x: No such file", [12345])
    check_exit("privacy", "", [12345])
    # A server of one port that names none (PostgreSQL): that port.
    with pytest.raises(PortTaken) as info:
        check_exit("PostgreSQL", 'LOG:  could not bind IPv4 address "127.0.0.1": Address already in use', [23456])
    assert info.value.port == 23456


def test_a_clash_is_started_again_each_attempt_logged_with_its_port(caplog):
    calls = []

    def start(attempt: int) -> str:
        calls.append(attempt)
        if attempt < 3:
            raise PortTaken("privacy", 20000 + attempt, f"Failed to bind to address 127.0.0.1:{20000 + attempt}")
        return "up"

    with caplog.at_level(logging.WARNING, logger="hearth.testing.ports"):
        assert start_on_free_ports(start, "a mesh") == "up"
    assert calls == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "port 20001 was taken" in warnings[0] and "attempt 2 of 4" in warnings[0]
    assert "port 20002 was taken" in warnings[1] and "attempt 3 of 4" in warnings[1]


def test_a_clash_that_persists_is_a_clear_error_after_the_attempts():
    calls = []

    def start(attempt: int):
        calls.append(attempt)
        raise PortTaken("privacy", 30000 + attempt, "Failed to bind")

    with pytest.raises(PortTaken) as info:
        start_on_free_ports(start, "a mesh")
    assert calls == list(range(1, ports.ATTEMPTS + 1))
    assert info.value.port == 30000 + ports.ATTEMPTS
    assert f"a port was taken at start-up on each of {ports.ATTEMPTS} attempts" in str(info.value)


def test_anything_but_a_clash_is_raised_at_once():
    calls = []

    def start(attempt: int):
        calls.append(attempt)
        raise RuntimeError("privacy exited with code 1 during start-up")

    with pytest.raises(RuntimeError, match="code 1"):
        start_on_free_ports(start, "a mesh")
    assert calls == [1]


def test_a_port_answered_by_another_process_is_not_ours():
    """Another suite's server on our drawn port answers as ours would: only /proc tells
    whose listening socket it is."""
    mine, theirs = free_port(), free_port()
    other = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                              f"s.bind(('127.0.0.1', {theirs})); s.listen(); print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        with socket.socket() as s:
            s.bind(("127.0.0.1", mine))
            s.listen()
            assert listened_by(os.getpid(), [mine, theirs]) == {mine}
            assert listened_by(other.pid, [mine, theirs]) == {theirs}
    finally:
        other.kill()
        other.wait()
