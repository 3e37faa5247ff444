"""Privacy domain: pure logic, no gRPC, no SQL, no I/O.

Modules:
    merkle      RFC 9162 Merkle tree hash, inclusion / consistency proofs, Frontier
    audit       audit entries, canonical bytes, hash chain, append_batch, signed tree
                heads, verify_log, JSONL export format
    suspicious  sliding-window detector of suspicious activity over audit entries
    keys        Ed25519 key loading (PEM / raw base64) and key ids
    receipts    signed deletion receipts, offline verification
    crypto      envelope encryption (AES-256-GCM DEKs wrapped by KEKs), KEK rotation,
                crypto-shredding
    deletion    deletion scopes, job state machine, retry schedule, receipt contents

docs/privacy.md describes the formats for operators and offline verifiers.
"""
