"""Merkle tree tests against an independent reference written from RFC 9162's text.

The reference below deliberately uses the *recursive* definitions of §2.1.1 (MTH),
§2.1.3.1 (PATH) and §2.1.4.1 (PROOF/SUBPROOF), and verifies proofs by recursion
mirroring those definitions, so it shares no code and no iteration strategy with
``services.privacy.audit.merkle`` (which builds bottom-up and verifies with the
bit-twiddling algorithms of §2.1.3.2/§2.1.4.2).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.privacy.audit import merkle

# --------------------------------------------------------------------------- reference


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _split(n: int) -> int:
    """Largest power of two smaller than n (RFC: k < n <= 2k)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    if len(d) == 0:
        return _h(b"")
    if len(d) == 1:
        return _h(b"\x00" + d[0])
    k = _split(len(d))
    return _h(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _split(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def ref_root_from_path(leaf_hash: bytes, m: int, n: int, path: list[bytes]) -> bytes | None:
    """Rebuild the root by undoing PATH's recursion (the last element is the top sibling)."""
    if n == 1:
        return leaf_hash if not path else None
    if not path:
        return None
    k = _split(n)
    sibling, rest = path[-1], path[:-1]
    if m < k:
        sub = ref_root_from_path(leaf_hash, m, k, rest)
        return None if sub is None else _h(b"\x01" + sub + sibling)
    sub = ref_root_from_path(leaf_hash, m - k, n - k, rest)
    return None if sub is None else _h(b"\x01" + sibling + sub)


def ref_consistency_roots(
    m: int, n: int, proof: list[bytes], b: bool, old_root: bytes
) -> tuple[bytes, bytes] | None:
    """(old subtree root, new subtree root) implied by SUBPROOF(m, D[n], b)."""
    if m == n:
        if b:
            return (old_root, old_root) if not proof else None
        return (proof[0], proof[0]) if len(proof) == 1 else None
    if not proof:
        return None
    k = _split(n)
    last, rest = proof[-1], proof[:-1]
    if m <= k:
        r = ref_consistency_roots(m, k, rest, b, old_root)
        if r is None:
            return None
        return r[0], _h(b"\x01" + r[1] + last)
    r = ref_consistency_roots(m - k, n - k, rest, False, old_root)
    if r is None:
        return None
    return _h(b"\x01" + last + r[0]), _h(b"\x01" + last + r[1])


def ref_verify_consistency(m: int, n: int, old_root: bytes, new_root: bytes, proof) -> bool:
    r = ref_consistency_roots(m, n, list(proof), True, old_root)
    return r is not None and r == (old_root, new_root)


def leaves_of(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(n)]


def flip(h: bytes, bit: int = 0) -> bytes:
    b = bytearray(h)
    b[bit // 8 % 32] ^= 1 << (bit % 8)
    return bytes(b)


# --------------------------------------------------------------------------- published vectors
# Certificate Transparency's reference vectors (google/certificate-transparency
# cpp/merkletree/merkle_tree_test.cc, reused by transparency-dev/merkle testonly).

CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]
CT_PATHS = [
    (0, 1, []),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


@pytest.fixture(scope="module")
def ct_tree() -> merkle.MerkleTree:
    return merkle.MerkleTree.from_leaves(CT_LEAVES)


def test_empty_root_is_sha256_of_nothing():
    assert merkle.EMPTY_ROOT.hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert merkle.MerkleTree().root() == merkle.EMPTY_ROOT
    assert merkle.merkle_root([]) == merkle.EMPTY_ROOT


def test_published_roots(ct_tree):
    for n in range(1, 9):
        assert ct_tree.root(n) == CT_ROOTS[n - 1], n
        assert merkle.merkle_root([merkle.leaf_hash(x) for x in CT_LEAVES[:n]]) == CT_ROOTS[n - 1]


@pytest.mark.parametrize(("index", "size", "path"), CT_PATHS)
def test_published_inclusion_proofs(ct_tree, index, size, path):
    expected = [bytes.fromhex(h) for h in path]
    assert ct_tree.inclusion_proof(index, size) == expected
    assert merkle.verify_inclusion(
        merkle.leaf_hash(CT_LEAVES[index]), index, size, expected, CT_ROOTS[size - 1])


@pytest.mark.parametrize(("old", "new", "proof"), CT_CONSISTENCY)
def test_published_consistency_proofs(ct_tree, old, new, proof):
    expected = [bytes.fromhex(h) for h in proof]
    assert ct_tree.consistency_proof(old, new) == expected
    assert merkle.verify_consistency(old, new, CT_ROOTS[old - 1], CT_ROOTS[new - 1], expected)


# --------------------------------------------------------------------------- exhaustive small sizes


@pytest.fixture(scope="module")
def tree70() -> tuple[list[bytes], merkle.MerkleTree]:
    leaves = leaves_of(70)
    return leaves, merkle.MerkleTree.from_leaves(leaves)


def test_roots_match_reference_for_every_prefix(tree70):
    leaves, tree = tree70
    for n in range(0, 71):
        assert tree.root(n) == ref_mth(leaves[:n]), n


def test_inclusion_all_sizes_and_indices(tree70):
    leaves, tree = tree70
    for n in range(1, 71):
        root = ref_mth(leaves[:n])
        for i in range(n):
            lh = merkle.leaf_hash(leaves[i])
            proof = tree.inclusion_proof(i, n)
            assert proof == ref_path(i, leaves[:n]), (i, n)
            # the independent recursive verifier accepts it
            assert ref_root_from_path(lh, i, n, proof) == root, (i, n)
            # the RFC iterative verifier accepts it ...
            assert merkle.verify_inclusion(lh, i, n, proof, root), (i, n)
            # ... and rejects a wrong leaf, a wrong index and a wrong size
            assert not merkle.verify_inclusion(flip(lh), i, n, proof, root)
            if n > 1:
                assert not merkle.verify_inclusion(lh, (i + 1) % n, n, proof, root), (i, n)
            # other sizes: the hash does not bind the size (the signed tree head does), so
            # a proof may be valid for another shape too; both verifiers must agree
            for other in (n - 1, n + 1, 2 * n + 1):
                expected = i < other and ref_root_from_path(lh, i, other, proof) == root
                assert merkle.verify_inclusion(lh, i, other, proof, root) == expected
            for j in range(len(proof)):
                bad = list(proof)
                bad[j] = flip(bad[j], 8 * j + 3)
                assert not merkle.verify_inclusion(lh, i, n, bad, root), (i, n, j)
            assert not merkle.verify_inclusion(lh, i, n, proof + [root], root)
            if proof:
                assert not merkle.verify_inclusion(lh, i, n, proof[:-1], root)


def test_consistency_all_pairs(tree70):
    leaves, tree = tree70
    roots = [ref_mth(leaves[:n]) for n in range(41)]
    for n in range(1, 41):
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n)
            assert proof == ref_proof(m, leaves[:n]), (m, n)
            assert ref_verify_consistency(m, n, roots[m], roots[n], proof), (m, n)
            assert merkle.verify_consistency(m, n, roots[m], roots[n], proof), (m, n)
            # wrong roots are rejected
            assert not merkle.verify_consistency(m, n, flip(roots[m]), roots[n], proof)
            assert not merkle.verify_consistency(m, n, roots[m], flip(roots[n]), proof)
            for j in range(len(proof)):
                bad = list(proof)
                bad[j] = flip(bad[j], j)
                assert not merkle.verify_consistency(m, n, roots[m], roots[n], bad), (m, n, j)
            if m < n:
                assert not merkle.verify_consistency(m, n, roots[m], roots[n], proof[:-1])
                for other in (n - 1, n + 1, 2 * n):  # verifiers agree on other shapes
                    expected = m < other and ref_verify_consistency(
                        m, other, roots[m], roots[n], proof)
                    assert merkle.verify_consistency(
                        m, other, roots[m], roots[n], proof) == expected, (m, n, other)
                # a tree that rewrote history is not consistent with the old root
                forged = leaves[:n]
                forged[m - 1] = b"rewritten"
                assert not merkle.verify_consistency(
                    m, n, roots[m], ref_mth(forged), ref_proof(m, forged))


def test_consistency_edge_cases(tree70):
    leaves, tree = tree70
    r5, r9 = tree.root(5), tree.root(9)
    assert tree.consistency_proof(0, 9) == []
    assert merkle.verify_consistency(0, 9, merkle.EMPTY_ROOT, r9, [])
    assert tree.consistency_proof(9, 9) == []
    assert merkle.verify_consistency(9, 9, r9, r9, [])
    assert not merkle.verify_consistency(9, 9, r5, r9, [])
    assert not merkle.verify_consistency(9, 5, r9, r5, [])
    assert not merkle.verify_consistency(5, 9, r5, r9, [])  # non-trivial needs a proof
    with pytest.raises(ValueError, match="old_size"):
        tree.consistency_proof(10, 9)
    with pytest.raises(ValueError, match="tree_size"):
        tree.consistency_proof(1, 71)


# --------------------------------------------------------------------------- structure


@given(st.lists(st.binary(max_size=40), max_size=150), st.data())
@settings(max_examples=60, deadline=None)
def test_incremental_appends_equal_bulk_build(leaves, data):
    hashes = [merkle.leaf_hash(x) for x in leaves]
    bulk = merkle.MerkleTree.from_leaf_hashes(hashes)
    inc = merkle.MerkleTree()
    frontier = merkle.Frontier()
    pos = 0
    while pos < len(hashes):  # append in random chunk sizes, including single leaves
        step = data.draw(st.integers(1, 20))
        chunk = hashes[pos : pos + step]
        if len(chunk) == 1:
            inc.append(chunk[0])
            frontier = frontier.append(chunk[0])
        else:
            inc.extend(np.frombuffer(b"".join(chunk), dtype=np.uint8).reshape(-1, 32))
            frontier = frontier.extend(chunk)
        pos += step
        assert inc.root() == frontier.root() == ref_mth(leaves[:pos])
    assert bulk.root() == inc.root() == ref_mth(leaves)
    assert len(frontier.roots) == bin(len(leaves)).count("1")
    assert merkle.Frontier.from_bytes(frontier.to_bytes()) == frontier
    assert np.array_equal(bulk.leaf_hashes(), inc.leaf_hashes())


@given(st.integers(1, 2000), st.data())
@settings(max_examples=40, deadline=None)
def test_random_proofs_in_larger_trees(n, data):
    leaves = leaves_of(n)
    tree = merkle.MerkleTree.from_leaves(leaves)
    i = data.draw(st.integers(0, n - 1))
    size = data.draw(st.integers(i + 1, n))
    proof = tree.inclusion_proof(i, size)
    assert ref_root_from_path(merkle.leaf_hash(leaves[i]), i, size, proof) == tree.root(size)
    assert merkle.verify_inclusion(merkle.leaf_hash(leaves[i]), i, size, proof, tree.root(size))
    m = data.draw(st.integers(1, size))
    cproof = tree.consistency_proof(m, size)
    assert ref_verify_consistency(m, size, tree.root(m), tree.root(size), cproof)
    assert merkle.verify_consistency(m, size, tree.root(m), tree.root(size), cproof)


def test_large_tree_proof_is_logarithmic():
    n = 100_003
    hashes = np.frombuffer(
        b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)), dtype=np.uint8
    ).reshape(-1, 32)
    tree = merkle.MerkleTree.from_leaf_hashes(hashes)
    assert tree.root() == merkle.Frontier().extend(hashes).root()
    for i in (0, 1, 65_535, 65_536, n - 1):
        proof = tree.inclusion_proof(i, n)
        assert len(proof) <= 17  # ceil(log2(100003))
        assert merkle.verify_inclusion(bytes(hashes[i]), i, n, proof, tree.root())
    proof = tree.consistency_proof(70_001, n)
    assert len(proof) <= 2 * 17
    assert merkle.verify_consistency(70_001, n, tree.root(70_001), tree.root(), proof)


def test_leaf_and_node_domains_are_separated():
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    node = merkle.node_hash(a, b)
    # an interior node's preimage presented as leaf data does not hash to the node
    assert merkle.leaf_hash(a + b) != node
    tree = merkle.MerkleTree.from_leaves([b"a", b"b"])
    assert tree.root() == node


def test_bad_inputs_raise_value_errors_naming_the_argument():
    tree = merkle.MerkleTree.from_leaves(leaves_of(4))
    with pytest.raises(ValueError, match="index"):
        tree.inclusion_proof(4)
    with pytest.raises(ValueError, match="index"):
        tree.inclusion_proof(-1)
    with pytest.raises(ValueError, match="leaf_hash"):
        tree.append(b"short")
    with pytest.raises(ValueError, match="leaf_hashes"):
        merkle.MerkleTree.from_leaf_hashes(np.zeros((3, 31), dtype=np.uint8))
    with pytest.raises(ValueError, match="leaf_hashes"):
        merkle.MerkleTree.from_leaf_hashes(b"x" * 33)
    with pytest.raises(ValueError, match=r"proof\[1\]"):
        merkle.verify_inclusion(bytes(32), 0, 4, [bytes(32), b"x"], bytes(32))
    with pytest.raises(ValueError, match="root"):
        merkle.verify_inclusion(bytes(32), 0, 4, [], b"")
    with pytest.raises(ValueError, match="tree_size"):
        merkle.verify_inclusion(bytes(32), 0, -1, [], bytes(32))
    with pytest.raises(ValueError, match="roots"):
        merkle.Frontier(3, (bytes(32),))
    with pytest.raises(ValueError, match="data"):
        merkle.Frontier.from_bytes((3).to_bytes(8, "big") + bytes(32))
    # an index outside the tree is a failed proof, not an exception
    assert not merkle.verify_inclusion(bytes(32), 4, 4, [], bytes(32))


# --------------------------------------------------------------------------- pruned tree (leaves read back)


class _Stored:
    """Leaf hashes 'in the database', counting the reads a pruned tree makes."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.reads = 0

    def __call__(self, start: int, end: int) -> bytes:
        self.reads += 1
        return bytes(self.raw[start * 32 : end * 32])


@given(st.integers(0, 700), st.integers(1, 4), st.data())
@settings(max_examples=40, deadline=None)
def test_pruned_tree_answers_like_the_full_tree(n, resident_level, data):
    """Appended in random batches (each stored before the next, like the audit writer),
    a tree that keeps only levels >= resident_level gives the same roots, frontiers,
    leaves and proofs for every size as the tree that keeps everything."""
    hashes = [merkle.leaf_hash(x) for x in leaves_of(n)]
    stored = _Stored()
    pruned = merkle.MerkleTree(leaf_source=stored, resident_level=resident_level)
    pos = 0
    while pos < n:
        step = data.draw(st.integers(1, 40))
        batch = b"".join(hashes[pos : pos + step])
        pruned.extend(batch)
        stored.raw += batch
        pos += len(batch) // 32
    full = merkle.MerkleTree.from_leaf_hashes(b"".join(hashes))
    assert pruned.size == n and pruned.root() == full.root()
    assert np.array_equal(pruned.leaf_hashes(), full.leaf_hashes())
    for _ in range(5 if n else 0):
        size = data.draw(st.integers(1, n))
        i = data.draw(st.integers(0, size - 1))
        m = data.draw(st.integers(0, size))
        assert pruned.root(size) == full.root(size)
        assert pruned.frontier(size) == full.frontier(size)
        assert pruned.leaf_hash_at(i) == hashes[i]
        assert pruned.inclusion_proof(i, size) == full.inclusion_proof(i, size)
        assert pruned.consistency_proof(m, size) == full.consistency_proof(m, size)
    # Truncating (into a pruned chunk or not) and appending again gives the same tree.
    cut = data.draw(st.integers(0, n))
    pruned.truncate(cut)
    stored.raw = stored.raw[: cut * 32]
    assert pruned.size == cut and pruned.root() == full.root(cut)
    pruned.extend(b"".join(hashes[cut:]))
    assert pruned.root() == full.root()


def test_pruned_tree_memory_stays_bounded_and_proofs_read_one_chunk():
    stored = _Stored()
    tree = merkle.MerkleTree(leaf_source=stored, resident_level=10)
    full_bytes = []
    for batch in range(200):   # 200 batches of 500 leaves, like a busy audit writer
        raw = b"".join(hashlib.sha256(b"%d-%d" % (batch, i)).digest() for i in range(500))
        tree.extend(raw)
        stored.raw += raw
        full_bytes.append(tree.resident_bytes)
    n = tree.size
    assert n == 100_000
    # ~64 bytes per leaf kept whole (6.4 MB); pruned: 64 bytes per 1024 leaves plus one
    # chunk of at most 2 * 1024 leaves' nodes and the batch appended last.
    assert tree.resident_bytes < 64 * (n // 1024) + 2 * 64 * 1024 + 64 * 500
    assert max(full_bytes[100:]) < 300_000
    stored.reads = 0
    proof = tree.inclusion_proof(5, n)
    assert merkle.verify_inclusion(tree.leaf_hash_at(5), 5, n, proof, tree.root())
    assert stored.reads == 1   # the proof's chunk, read once (leaf_hash_at hit the cache)
    old = 54_321
    proof = tree.consistency_proof(old, n)
    assert merkle.verify_consistency(old, n, tree.root(old), tree.root(), proof)


def test_pruned_tree_refuses_altered_stored_leaves():
    stored = _Stored()
    tree = merkle.MerkleTree(leaf_source=stored, resident_level=3)
    raw = b"".join(merkle.leaf_hash(x) for x in leaves_of(40))
    for k in range(0, 40, 8):
        tree.extend(raw[k * 32 : (k + 8) * 32])
        stored.raw += raw[k * 32 : (k + 8) * 32]
    stored.raw[3 * 32] ^= 1   # a stored leaf hash altered after its append
    with pytest.raises(merkle.LeafSourceMismatch, match="altered"):
        tree.inclusion_proof(3, 40)
    stored.raw = stored.raw[: 20 * 32]   # rows deleted
    with pytest.raises(merkle.LeafSourceMismatch, match="source returned"):
        tree.inclusion_proof(17, 40)
    # a tree without a source never prunes
    whole = merkle.MerkleTree(resident_level=3)
    whole.extend(raw)
    whole.extend(raw)
    assert whole.resident_bytes >= 80 * 32
    with pytest.raises(ValueError, match="resident_level"):
        merkle.MerkleTree(resident_level=0)
