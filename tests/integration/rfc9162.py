"""An independent verifier for the audit log's proofs and tree heads, written from
RFC 9162 (§2.1.1 Merkle tree hash, §2.1.3.2 inclusion, §2.1.4.2 consistency) and from
docs/privacy.md (signed tree head payload). It deliberately shares no code with
services/privacy/audit/merkle.py: a bug there must not be mirrored here."""

from __future__ import annotations

import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def leaf_hash(data: bytes) -> bytes:
    return sha256(b"\x00" + data)


def node(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) of §2.1.1 over raw leaf data, by the recursive definition."""
    n = len(leaves)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return node(mth(leaves[:k]), mth(leaves[k:]))


def verify_inclusion(leaf_index: int, tree_size: int, leaf: bytes, path: list[bytes], root: bytes) -> bool:
    """§2.1.3.2, step by step."""
    if leaf_index >= tree_size:
        return False
    fn, sn, r = leaf_index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes,
                       path: list[bytes]) -> bool:
    """§2.1.4.2, step by step; m == n and m == 0 as docs/privacy.md defines them."""
    if first > second:
        return False
    if first == second:
        return not path and first_hash == second_hash
    if first == 0:
        return not path
    path = list(path)
    if first & (first - 1) == 0:  # an exact power of two: prepend first_hash
        path.insert(0, first_hash)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    if fn & 1:
        while fn & 1:
            fn >>= 1
            sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node(c, fr)
            sr = node(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


def verify_sth_json(sth_json: str, public_key_pem: str) -> dict:
    """Check an STH's Ed25519 signature over the canonical JSON of its other fields and
    its key id; returns the STH object. Raises AssertionError when it does not verify."""
    sth = json.loads(sth_json)
    signature = bytes.fromhex(sth.pop("signature"))
    payload = json.dumps(sth, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    key = serialization.load_pem_public_key(public_key_pem.encode())
    assert isinstance(key, Ed25519PublicKey)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert sth["key_id"] == hashlib.sha256(raw).hexdigest()[:16]
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        raise AssertionError("tree head signature does not verify") from None
    return sth
