"""The test harness's free ports stay out of the kernel's ephemeral range, where any
outgoing connection on the machine could take them before the server binds."""

from __future__ import annotations

import socket

from services.testing.ports import _ephemeral_ports, free_port


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    low, high = _ephemeral_ports()
    assert 1024 < low <= high
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50   # a mesh asks for ports before any server binds: never the same twice
    assert all(10000 <= p < low for p in ports), sorted(ports)
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))   # free indeed


def test_a_port_in_use_is_never_handed_out():
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken = held.getsockname()[1]
        assert all(free_port() != taken for _ in range(500))


def test_a_port_is_never_handed_out_twice_in_one_process():
    """A mesh draws ~10 ports before anything binds; 2,000 draws from ~22,000 random
    ports would repeat one with near certainty if draws were independent."""
    drawn = [free_port() for _ in range(2000)]
    assert len(set(drawn)) == len(drawn)
