"""A privacy service started with a KEK that does not open the stored data keys refuses
to start (attack25). Until then it started SERVING: a lost development KEK file
(``privacy-keks``) was silently regenerated under the same id ``dev-1``, or a
``HEARTH_KEKS`` secret replaced by other bytes under the same id was taken as it was;
every household that already had a data key answered 500 on every read, write and
export, while each new household got a key under the wrong KEK, so restoring the right
one afterwards made those unreadable instead (found by hand on ``scripts/run.py``).

Each case copies the shared mesh's ``privacy.db`` (SQLite's backup API: a consistent copy
of a live database) into a data dir of its own and starts one privacy process on it, as
an operator restarting privacy would."""

from __future__ import annotations

import base64
import os
import sqlite3
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.testing.mesh import Mesh
from services.testing.ports import listened_by, start_on_free_ports
from tests.helpers.mesh_calls import ingest_heartbeats
from tests.helpers.waiting import SLOW_MACHINE_S

ACCOUNT = "kek-guard-1"


@pytest.fixture(scope="module")
def stored_privacy_db(mesh, tmp_path_factory):
    """A copy of the shared mesh's privacy.db holding a live data key (ACCOUNT's)."""
    ingest_heartbeats(mesh, ACCOUNT)
    copy = tmp_path_factory.mktemp("kek-guard") / "privacy.db"
    with sqlite3.connect(mesh.data_dir / "privacy.db") as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with sqlite3.connect(copy) as db:
        live = db.execute("SELECT kek_id FROM data_keys WHERE account_id = ? AND destroyed_at IS NULL",
                          (ACCOUNT,)).fetchall()
    assert live == [("dev-1",)], live   # the development KEK file's id (the case the operator meets)
    return copy


def start_privacy(tmp_path, db_copy, kek_file_text: str | None) -> tuple[Mesh, str]:
    """Privacy alone on a copy of the stored data keys, and its ``outcome``. Its exit is
    what the refusal cases assert, so an exit because another process took its port first
    (its log says so: the mesh's ``check_port_taken``) is not taken for one: privacy is
    started again on newly drawn ports (``ports.start_on_free_ports``, as ``start_healthy``
    does for a mesh; session 36 — it was the one test left starting a process unprotected)."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "privacy.db").write_bytes(db_copy.read_bytes())
    if kek_file_text is not None:
        fd = os.open(data_dir / "privacy-keks", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(kek_file_text)
    alone = Mesh.on_free_ports(data_dir, log_dir=tmp_path / "logs")

    def attempt(number: int) -> str:
        if number > 1:
            alone.draw_ports()
        alone.start_service("privacy")
        result = outcome(alone)
        if result == "exited":
            alone.check_port_taken("privacy")
        return result

    try:
        return alone, start_on_free_ports(attempt, f"privacy alone in {data_dir}")
    except BaseException:
        alone.stop()
        raise


def outcome(alone: Mesh) -> str:
    """'exited' once the process has ended, 'serving' if its health answers SERVING
    first (the defect: it must not serve), within SLOW_MACHINE_S. SERVING counts only from
    our own process listening on the port itself (``ports.listened_by``): another suite's
    server on a port ours failed to bind answers too."""
    proc = alone.processes["privacy"]
    port = alone.grpc_ports["privacy"]
    deadline = time.monotonic() + SLOW_MACHINE_S
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "exited"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING and listened_by(proc.pid, [port]):
                    return "serving"
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return "still starting"


@pytest.mark.parametrize("case", ["other bytes under the same KEK id", "the KEK file lost"])
def test_privacy_refuses_to_start_when_its_kek_does_not_open_the_stored_data_keys(
        case, stored_privacy_db, tmp_path):
    other = "dev-1=" + base64.b64encode(os.urandom(32)).decode() if case.startswith("other") else None
    alone, result = start_privacy(tmp_path, stored_privacy_db, other)
    try:
        log = alone.log_tail("privacy", 4000)
        assert result == "exited", f"{case}: privacy {result} with a KEK that opens no stored data key{log}"
        assert alone.processes["privacy"].returncode != 0
        assert "HEARTH_KEKS" in log and ACCOUNT not in log, log
        if other is None:   # nothing generated in place of the lost file: the operator restores it
            assert not (alone.data_dir / "privacy-keks").exists()
            assert "privacy-keks" in log and "missing" in log, log
        else:
            assert "does not open" in log, log
    finally:
        alone.stop()


def test_privacy_starts_with_the_kek_that_wrapped_the_stored_data_keys(mesh, stored_privacy_db, tmp_path):
    """The control: the mesh's own KEK file opens them, and privacy serves."""
    alone, result = start_privacy(tmp_path, stored_privacy_db, (mesh.data_dir / "privacy-keks").read_text())
    try:
        assert result == "serving", alone.log_tail("privacy", 4000)
    finally:
        alone.stop()
