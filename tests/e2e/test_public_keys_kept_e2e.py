"""A privacy service whose signing key changed keeps the public key it published before
(attack25). In development the receipt and audit signing keys live in the data dir, and
their public halves (``privacy-receipt-signing.pub``, ``audit-signing-key.pub``) are what
``hearth verify-receipt`` and ``hearth audit verify`` are given. Until then a start with
another key — the private file lost and generated anew, or another
``HEARTH_RECEIPT_SIGNING_KEY`` configured — wrote the new public key over the old one, and
with it went the only copy that verified every receipt and tree head signed before (found
by deleting the private key files of ``scripts/run.py``'s data dir and restarting). Now the
old one is kept beside it as ``<name>.<key id>.pub``."""

from __future__ import annotations

from services.privacy.keys.signing import key_id, load_public_key
from services.testing.mesh import Mesh
from tests.helpers.waiting import wait_for

PUBLISHED = {"privacy-receipt-signing.key": "privacy-receipt-signing.pub",
             "audit-signing-key.pem": "audit-signing-key.pub"}


def start_privacy_until_published(data_dir, log_dir) -> None:
    alone = Mesh.on_free_ports(data_dir, log_dir=log_dir)
    try:
        alone.start_listening(["privacy"])
        wait_for(lambda: all((data_dir / name).exists() for name in PUBLISHED.values())
                 and b'"serving"' in (log_dir / "privacy.log").read_bytes(),
                 what="privacy serving with its public keys published")
    finally:
        alone.stop()


def test_a_new_signing_key_keeps_the_public_key_published_before(tmp_path):
    data_dir, log_dir = tmp_path / "var", tmp_path / "logs"
    start_privacy_until_published(data_dir, log_dir)
    before = {name: (data_dir / name).read_text() for name in PUBLISHED.values()}
    for private in PUBLISHED:   # the development private keys lost
        (data_dir / private).unlink()
    (log_dir / "privacy.log").unlink()
    start_privacy_until_published(data_dir, log_dir)
    for public, pem in before.items():
        assert (data_dir / public).read_text() != pem, f"{public}: a new key was generated"
        stem = public.removesuffix(".pub")
        kept = data_dir / f"{stem}.{key_id(load_public_key(pem))}.pub"
        assert kept.exists() and kept.read_text() == pem, \
            f"{public}: the earlier public key is gone: {sorted(p.name for p in data_dir.iterdir())}"
