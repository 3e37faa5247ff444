"""A deletion worker in a process of its own, for tests that kill it with SIGKILL
(tests/integration/test_deletion_lease.py): it claims the due jobs of a privacy store
(``python -m tests.helpers.deletion_holder sqlite PATH LEASE_S`` or ``postgres DSN SCHEMA
LEASE_S``) and sends each Erase to a peer that never answers, printing ``erase <service>
<job_id>`` as each call starts. Its lease's heartbeat is the real one."""

from __future__ import annotations

import sys
import threading

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.storage.sql import PostgresDatabase, SqliteDatabase
from services.privacy.deletion.app import DeletionCoordinator
from services.privacy.deletion.store import DeletionJobStore


class _HungPeers:
    def erase(self, service, scope, job_id):
        print(f"erase {service} {job_id}", flush=True)
        threading.Event().wait()

    def export(self, service, account_id):
        return {}

    def close(self):
        pass


def main(argv: list[str]) -> None:
    if argv[0] == "sqlite":
        db, lease_s = SqliteDatabase(argv[1]), float(argv[2])
    else:
        db, lease_s = PostgresDatabase(argv[1], argv[2], max_size=2), float(argv[3])
    coordinator = DeletionCoordinator(DeletionJobStore(db), _HungPeers(), None, Ed25519PrivateKey.generate(),
                                      lease_s=lease_s, poll_s=0.05)
    coordinator.start()
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
