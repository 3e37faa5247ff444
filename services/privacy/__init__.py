"""The privacy service: one process, four rooms, each a gRPC service of its own
(protos/hearth/privacy/v1/privacy.proto) with its domain, store, app and servicer.

    deletion/   Deletion: durable erasure jobs fanned out to every DataHolder, retries,
                signed receipts (receipts.py), the household export
    consent/    Consent: per-household consent the data-holding services check
    audit/      AuditLog: the tamper-evident log (domain.py entries, hash chain, signed
                tree heads; merkle.py RFC 9162 tree and proofs; suspicious.py detector;
                store.py rows and queries; writer.py group commit; proofs.py proofs and
                verification)
    keys/       Keys: envelope encryption (domain.py AES-256-GCM DEKs wrapped by KEKs,
                rotation, crypto-shredding), Ed25519 signing keys (signing.py)

``__main__`` builds the rooms, injecting each one's dependencies through its
constructor, and serves the four services. Domain modules are pure (no gRPC, SQL or
I/O); docs/privacy.md describes the formats for operators and offline verifiers.
"""
