"""What the mesh's processes write into the data dir is readable by their owner only
(attack25). Until then every SQLite file (viewing histories: account and device ids,
times, feature vectors, in clear), its WAL, the audit outboxes and the databases'
copies were created 0644 under the default umask, so any local user of a machine running
``make run`` read them, while the backups (``services/common/backup.py``) and the key
files were already 0600 (found by listing ``scripts/run.py``'s data dir)."""

from __future__ import annotations

import stat

from tests.helpers.mesh_calls import ingest_heartbeats

# Written by the launcher, not by the mesh's processes: the components' public keys
# (public by nature) in the keyset the test process generates.
PUBLIC = {"public-keys.json"}


def test_every_file_the_mesh_writes_in_its_data_dir_is_its_owners_only(mesh):
    ingest_heartbeats(mesh, "private-files-1")
    entries = [p for p in mesh.data_dir.rglob("*") if p.name not in PUBLIC]
    names = {p.name for p in entries}
    # the scan sees what the services write (so an empty listing cannot pass)
    assert {"clustering.db", "privacy.db", "attribution.db", "feedback.db", "privacy-keks",
            "audit-outbox-gateway.db"} <= names, sorted(names)
    shared = {str(p.relative_to(mesh.data_dir)): oct(stat.S_IMODE(p.stat().st_mode))
              for p in [mesh.data_dir, *entries] if p.stat().st_mode & 0o077}
    assert not shared, f"readable by group or others: {shared}"
