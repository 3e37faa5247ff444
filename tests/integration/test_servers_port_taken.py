"""The PostgreSQL and Redis fixtures' servers (services/testing/servers.py) on a drawn port
another process takes before they bind it (a second test suite on the machine) still start,
on a port drawn anew, and only their own server counts as started: another suite's Redis
answering on the port ours failed to bind is not ours."""

from __future__ import annotations

import logging
import socket

import psycopg
import redis

from services.testing.servers import PostgresServer, RedisServer
from tests.helpers.servers import cluster_base


def test_a_postgres_cluster_whose_drawn_port_is_taken_starts_on_another(caplog):
    server = PostgresServer(cluster_base(), durable=False).init()
    taken = server.port
    with socket.socket() as other:   # another suite's server took it since the draw
        other.bind(("127.0.0.1", taken))
        other.listen()
        try:
            with caplog.at_level(logging.WARNING, logger="hearth.testing.ports"):
                server.start()
            assert server.port != taken
            with psycopg.connect(server.dsn) as conn:
                assert conn.execute("SHOW data_directory").fetchone()[0] == str(server.data_dir)
            assert any(f"port {taken} was taken" in r.getMessage() for r in caplog.records), caplog.text
            # A restart keeps the port it started on (its clients hold the address).
            port = server.port
            server.restart()
            assert server.port == port
        finally:
            server.remove()


def test_a_redis_whose_drawn_port_another_redis_took_starts_on_another(caplog):
    ours, theirs = RedisServer(), RedisServer()
    theirs.port = ours.port   # another suite drew the same port and bound it first
    theirs.start()
    try:
        theirs_client = redis.Redis(port=theirs.port)
        theirs_client.set("whose", "theirs")
        with caplog.at_level(logging.WARNING, logger="hearth.testing.ports"):
            ours.start()
        try:
            assert ours.port != theirs.port
            with redis.Redis(port=ours.port) as client:
                assert client.info("server")["process_id"] == ours.proc.pid
                assert client.get("whose") is None
            assert any(f"port {theirs.port} was taken" in r.getMessage() for r in caplog.records), caplog.text
        finally:
            ours.stop()
        theirs_client.close()
    finally:
        theirs.stop()
