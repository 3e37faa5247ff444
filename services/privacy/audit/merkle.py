"""Merkle tree hashing, inclusion and consistency proofs as in RFC 9162 (RFC 6962 bis).

Conventions (RFC 9162 §2.1, hash = SHA-256, 32-byte digests):

* ``MTH({})        = SHA-256()``                      (the empty tree)
* ``MTH({d0})      = SHA-256(0x00 || d0)``            (leaf hash)
* ``MTH(D[n])      = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))`` for n > 1, where k is
  the largest power of two *strictly smaller* than n.

The 0x00 / 0x01 prefixes separate leaves from interior nodes so that no interior node
can be passed off as a leaf (second-preimage resistance).

Two structures:

``Frontier``
    The compact state an append-only writer needs: the roots of the perfect subtrees
    that make up the binary decomposition of ``size`` (largest first; there are
    ``popcount(size)`` of them). Appending a leaf is O(log n) (amortised O(1)), and the
    root is the right fold of the frontier. This is what the audit writer persists.

``MerkleTree``
    All leaf hashes plus every *perfect aligned* interior node (level j holds the roots
    of leaves [i*2^j, (i+1)*2^j)), in contiguous ``bytearray`` buffers (about 64 bytes
    per leaf in total). Any subtree root MTH(D[a:b]) that the RFC recursion asks for is
    then O(log n) work, so inclusion and consistency proofs for any historical tree size
    cost O(log^2 n) hashes at most, even at millions of leaves.

Proof generation follows RFC 9162 §2.1.3.1 (PATH) and §2.1.4.1 (PROOF/SUBPROOF);
verification follows the iterative algorithms of §2.1.3.2 and §2.1.4.2 verbatim.
Consistency between sizes m == n is the empty proof with equal roots, and from the
empty tree (m == 0) is the empty proof; the RFC leaves both cases to the implementation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data: expected bytes, got {type(data).__name__}")
    return _sha256(LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha256(NODE_PREFIX + left + right).digest()


def _check_hash(value: object, argument: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        size = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise ValueError(f"{argument}: expected {HASH_SIZE} bytes, got {size}")
    return bytes(value)


def _check_size(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{argument}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{argument}: must be >= 0, got {value}")
    return int(value)


def _largest_power_of_two_below(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def hashes_to_bytes(hashes: object, argument: str = "leaf_hashes") -> bytes:
    """Concatenated 32-byte hashes from an (n, 32) uint8 array, a sequence of 32-byte
    strings, or already-concatenated bytes whose length is a multiple of 32."""
    if isinstance(hashes, np.ndarray):
        if hashes.dtype != np.uint8 or hashes.ndim != 2 or hashes.shape[1] != HASH_SIZE:
            raise ValueError(
                f"{argument}: expected an (n, {HASH_SIZE}) uint8 array, "
                f"got {hashes.shape} {hashes.dtype}"
            )
        return np.ascontiguousarray(hashes).tobytes()
    if isinstance(hashes, (bytes, bytearray, memoryview)):
        raw = bytes(hashes)
        if len(raw) % HASH_SIZE:
            raise ValueError(f"{argument}: length {len(raw)} is not a multiple of {HASH_SIZE}")
        return raw
    if isinstance(hashes, Iterable):
        parts = []
        for i, h in enumerate(hashes):
            parts.append(_check_hash(h, f"{argument}[{i}]"))
        return b"".join(parts)
    raise ValueError(f"{argument}: expected hashes, got {type(hashes).__name__}")


def _hash_pairs(level: bytes | bytearray | memoryview) -> bytearray:
    """Parent hashes of consecutive (left, right) pairs in a buffer of 64-byte pairs."""
    out = bytearray()
    view = memoryview(level)
    for off in range(0, len(view), 2 * HASH_SIZE):
        h = _sha256(NODE_PREFIX)
        h.update(view[off : off + 2 * HASH_SIZE])
        out += h.digest()
    return out


# --------------------------------------------------------------------------- frontier


@dataclass(frozen=True, slots=True)
class Frontier:
    """Roots of the perfect subtrees covering leaves [0, size), largest first.

    Invariant: ``len(roots) == popcount(size)`` and ``roots[i]`` covers the i-th set
    bit of ``size`` from the most significant. ``root()`` is the RFC 9162 MTH.
    """

    size: int = 0
    roots: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_size(self.size, "size")
        if len(self.roots) != self.size.bit_count():
            raise ValueError(
                f"roots: a frontier of size {self.size} needs {self.size.bit_count()} "
                f"subtree roots, got {len(self.roots)}"
            )
        for i, r in enumerate(self.roots):
            _check_hash(r, f"roots[{i}]")

    def root(self) -> bytes:
        """MTH of the leaves appended so far (``EMPTY_ROOT`` for size 0)."""
        if not self.roots:
            return EMPTY_ROOT
        acc = self.roots[-1]
        for r in reversed(self.roots[:-1]):
            acc = node_hash(r, acc)
        return acc

    def extend(self, leaf_hashes: object) -> Frontier:
        """A new frontier with the given leaf hashes appended (this one is unchanged).

        Works level by level rather than leaf by leaf: at level j the complete nodes
        from index ``(size >> j) - bit_j(size)`` to ``((size + k) >> j) - 1`` are formed,
        where the first one is the old frontier root of that level when bit j of the
        old size is set (it is always a left child: its index is even). Pairing them
        gives level j + 1; an unpaired last node is the new frontier root of level j
        exactly when bit j of the new size is set. About k hashes for k leaves, in one
        tight loop per level.
        """
        raw = hashes_to_bytes(leaf_hashes)
        if not raw:
            return self
        old_size = self.size
        new_size = old_size + len(raw) // HASH_SIZE
        old_levels = [j for j in range(old_size.bit_length() - 1, -1, -1) if old_size >> j & 1]
        old = dict(zip(old_levels, self.roots, strict=True))
        new: dict[int, bytes] = {}
        level_nodes = old.get(0, b"") + raw
        level = 0
        while new_size >> level:
            if new_size >> level & 1:
                new[level] = level_nodes[-HASH_SIZE:]
            pairs = len(level_nodes) // (2 * HASH_SIZE)
            parents = _hash_pairs(memoryview(level_nodes)[: pairs * 2 * HASH_SIZE])
            level += 1
            level_nodes = old.get(level, b"") + bytes(parents)
        roots = tuple(new[j] for j in range(new_size.bit_length() - 1, -1, -1) if new_size >> j & 1)
        return Frontier(new_size, roots)

    def append(self, leaf_hash_: bytes) -> Frontier:
        """A new frontier with one leaf hash appended."""
        return self.extend([_check_hash(leaf_hash_, "leaf_hash")])

    def to_bytes(self) -> bytes:
        """``size`` as 8 bytes big-endian followed by the concatenated subtree roots."""
        return self.size.to_bytes(8, "big") + b"".join(self.roots)

    @classmethod
    def from_bytes(cls, data: bytes) -> Frontier:
        """Inverse of ``to_bytes``; validates the length against the size."""
        if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
            raise ValueError("data: frontier bytes must start with an 8-byte size")
        size = int.from_bytes(data[:8], "big")
        body = bytes(data[8:])
        if len(body) != HASH_SIZE * size.bit_count():
            raise ValueError(
                f"data: frontier of size {size} needs {size.bit_count()} hashes, "
                f"got {len(body)} bytes"
            )
        roots = tuple(body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE))
        return cls(size, roots)


def merkle_root(leaf_hashes: object) -> bytes:
    """MTH over the given leaf hashes (O(n) hashes, O(log n) memory)."""
    return Frontier().extend(leaf_hashes).root()


# --------------------------------------------------------------------------- full tree


class LeafSourceMismatch(ValueError):
    """The stored leaf hashes a pruned ``MerkleTree`` read back do not hash to the chunk
    root it kept in memory: the stored rows were altered after they were appended."""


class MerkleTree:
    """Append-only Merkle tree keeping every perfect aligned node, for proofs.

    ``levels[0]`` holds the leaf hashes; ``levels[j]`` the roots of perfect subtrees of
    2^j leaves starting at multiples of 2^j. Only complete subtrees are stored, so the
    tree for any *prefix* size m <= size is still fully described, and proofs against
    historical tree heads need no extra state.

    Kept whole, the tree costs about 64 bytes per leaf for as long as the process runs:
    an audit log appending a few thousand entries a second grows by hundreds of MB an
    hour (the soak of issue 11). Given a ``leaf_source`` (leaf hashes ``[start, end)``
    read back from where they are stored), the tree keeps only the levels from
    ``resident_level`` up plus the nodes of the last, incomplete chunk of
    ``2**resident_level`` leaves (about ``64 / 2**resident_level`` bytes per leaf);
    a node below that level in a complete chunk is recomputed from the chunk's stored
    leaves, which must hash to the chunk root kept in memory (``LeafSourceMismatch``
    otherwise). Pruning happens at the start of the next ``extend``, so ``truncate``
    back to the size before the last ``extend`` (the audit writer's undo of a failed
    commit) never needs the source.
    """

    __slots__ = ("_levels", "_offsets", "_leaf_source", "_resident_level", "_chunk_cache")

    def __init__(self, *, leaf_source: Callable[[int, int], bytes] | None = None,
                 resident_level: int = 10) -> None:
        if isinstance(resident_level, bool) or not isinstance(resident_level, int) or resident_level < 1:
            raise ValueError(f"resident_level: expected an int >= 1, got {resident_level!r}")
        self._levels: list[bytearray] = [bytearray()]
        # Index of the first node each level still holds (0 unless pruned).
        self._offsets: list[int] = [0]
        self._leaf_source = leaf_source
        self._resident_level = resident_level
        self._chunk_cache: tuple[int, MerkleTree] | None = None

    @classmethod
    def from_leaf_hashes(cls, leaf_hashes: object) -> MerkleTree:
        """A tree over the given leaf hashes ((n, 32) uint8 array, list or bytes)."""
        tree = cls()
        tree.extend(leaf_hashes)
        return tree

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MerkleTree:
        """A tree over raw leaf data (each hashed with the 0x00 prefix)."""
        return cls.from_leaf_hashes(b"".join(leaf_hash(d) for d in leaves))

    @property
    def size(self) -> int:
        return self._offsets[0] + len(self._levels[0]) // HASH_SIZE

    def __len__(self) -> int:
        return self.size

    @property
    def resident_bytes(self) -> int:
        """Bytes of hashes held in memory."""
        return sum(len(level) for level in self._levels)

    def _count(self, level: int) -> int:
        return self._offsets[level] + len(self._levels[level]) // HASH_SIZE

    def leaf_hashes(self) -> np.ndarray:
        """A copy of the leaf hashes as an (n, 32) uint8 array."""
        pruned = self._offsets[0]
        raw = (self._stored_leaves(0, pruned) if pruned else b"") + bytes(self._levels[0])
        return np.frombuffer(raw, dtype=np.uint8).reshape(-1, HASH_SIZE)

    def leaf_hash_at(self, index: int) -> bytes:
        index = _check_size(index, "index")
        if index >= self.size:
            raise ValueError(f"index: {index} out of range for tree size {self.size}")
        return self._node(0, index)

    def append(self, leaf_hash_: bytes) -> None:
        """Append one leaf hash; O(log n) hashing in the worst case, O(1) amortised."""
        self.extend(_check_hash(leaf_hash_, "leaf_hash"))

    def extend(self, leaf_hashes: object) -> None:
        """Append many leaf hashes at once and build the new perfect nodes level by level."""
        raw = hashes_to_bytes(leaf_hashes)
        if not raw:
            return
        self._prune()
        self._levels[0] += raw
        level = 0
        while True:
            below = self._count(level)
            if level + 1 == len(self._levels):
                if below < 2:
                    break
                self._levels.append(bytearray())
                self._offsets.append(0)
            have = self._count(level + 1)
            want = below // 2
            if want == have:
                break
            # Pruning keeps whole chunks, so the children of the first missing parent
            # are still held: 2 * have >= the level's offset.
            first = 2 * have - self._offsets[level]
            self._levels[level + 1] += _hash_pairs(
                memoryview(self._levels[level])[first * HASH_SIZE : (first + 2 * (want - have)) * HASH_SIZE])
            level += 1

    def _prune(self) -> None:
        """Drop the nodes below ``resident_level`` of every complete chunk (only when
        the leaves can be read back)."""
        if self._leaf_source is None:
            return
        top = self._resident_level
        chunk_start = (self.size >> top) << top
        for level in range(min(top, len(self._levels))):
            keep_from = chunk_start >> level
            drop = keep_from - self._offsets[level]
            if drop > 0:
                del self._levels[level][: drop * HASH_SIZE]
                self._offsets[level] = keep_from

    def truncate(self, size: int) -> None:
        """Drop every leaf from ``size`` on (and the nodes over them): undoes an
        ``extend`` whose leaves were not kept (the audit writer extends the tree before
        its transaction commits and truncates it back when the commit fails)."""
        size = _check_size(size, "size")
        if size > self.size:
            raise ValueError(f"size: {size} exceeds the tree's size {self.size}")
        self._chunk_cache = None
        if size < self._offsets[0]:
            # Into a pruned chunk: keep the levels above it, rebuild that chunk's lower
            # levels from its stored leaves.
            top = self._resident_level
            chunk_start = (size >> top) << top
            leaves = self._stored_leaves(chunk_start, size)
            for level in range(len(self._levels)):
                if level < top:
                    self._levels[level] = bytearray()
                    self._offsets[level] = chunk_start >> level
                else:
                    del self._levels[level][(size >> level) * HASH_SIZE :]
            self.extend(leaves)
            return
        for level, nodes in enumerate(self._levels):
            del nodes[max(0, (size >> level) - self._offsets[level]) * HASH_SIZE :]

    def frontier(self, tree_size: int | None = None) -> Frontier:
        """The ``Frontier`` of the first ``tree_size`` leaves (default: all), read from
        the stored nodes without hashing: the root of the perfect subtree for set bit j
        of the size is node ``(size >> j) - 1`` of level j. Equal to
        ``Frontier().extend(leaf hashes)``."""
        n = self._check_tree_size(tree_size)
        roots = tuple(self._node(j, (n >> j) - 1)
                      for j in range(n.bit_length() - 1, -1, -1) if n >> j & 1)
        return Frontier(n, roots)

    def _stored_leaves(self, start: int, end: int) -> bytes:
        if self._leaf_source is None:
            raise ValueError(f"leaves {start}..{end}: pruned, and the tree has no leaf_source")
        raw = bytes(self._leaf_source(start, end))
        if len(raw) != (end - start) * HASH_SIZE:
            raise LeafSourceMismatch(f"leaves {start}..{end}: the source returned {len(raw) // HASH_SIZE} "
                                     f"of {end - start} leaf hashes")
        return raw

    def _chunk(self, chunk: int) -> MerkleTree:
        """The full tree of a complete, pruned chunk, read back and checked against its
        root (the last one is cached: a proof visits at most two chunks)."""
        if self._chunk_cache is not None and self._chunk_cache[0] == chunk:
            return self._chunk_cache[1]
        top = self._resident_level
        tree = MerkleTree.from_leaf_hashes(self._stored_leaves(chunk << top, (chunk + 1) << top))
        if tree.root() != self._node(top, chunk):
            raise LeafSourceMismatch(f"leaves {chunk << top}..{(chunk + 1) << top}: the stored leaf "
                                     "hashes do not match the tree (the stored rows were altered)")
        self._chunk_cache = (chunk, tree)
        return tree

    # -- subtree roots ---------------------------------------------------------------

    def _node(self, level: int, index: int) -> bytes:
        held = index - self._offsets[level]
        if held < 0:   # in a pruned chunk
            shift = self._resident_level - level
            return self._chunk(index >> shift)._node(level, index - (index >> shift << shift))
        return bytes(self._levels[level][held * HASH_SIZE : (held + 1) * HASH_SIZE])

    def _range_root(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]). ``start`` must be a multiple of the largest power of two
        not exceeding ``end - start``, which holds for every range the RFC recursion
        visits (left children are perfect and aligned; right children start at the end
        of a perfect left sibling)."""
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            return self._node(n.bit_length() - 1, start // n)
        k = _largest_power_of_two_below(n)
        return node_hash(self._range_root(start, start + k), self._range_root(start + k, end))

    def _check_tree_size(self, tree_size: int | None) -> int:
        if tree_size is None:
            return self.size
        tree_size = _check_size(tree_size, "tree_size")
        if tree_size > self.size:
            raise ValueError(f"tree_size: {tree_size} exceeds the tree's size {self.size}")
        return tree_size

    def root(self, tree_size: int | None = None) -> bytes:
        """MTH of the first ``tree_size`` leaves (default: all)."""
        return self._range_root(0, self._check_tree_size(tree_size))

    # -- proofs ----------------------------------------------------------------------

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> list[bytes]:
        """Audit path PATH(index, D[tree_size]) of RFC 9162 §2.1.3.1, leaf side first."""
        n = self._check_tree_size(tree_size)
        index = _check_size(index, "index")
        if index >= n:
            raise ValueError(f"index: {index} out of range for tree size {n}")
        proof: list[bytes] = []
        start, end, m = 0, n, index
        # Walk down from the root, collecting siblings; the RFC lists them leaf first.
        while end - start > 1:
            k = _largest_power_of_two_below(end - start)
            if m < k:
                proof.append(self._range_root(start + k, end))
                end = start + k
            else:
                proof.append(self._range_root(start, start + k))
                start, m = start + k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[new_size]) of RFC 9162 §2.1.4.1, deepest node first.

        Empty when ``old_size`` is 0 or equals ``new_size``.
        """
        n = self._check_tree_size(new_size)
        m = _check_size(old_size, "old_size")
        if m > n:
            raise ValueError(f"old_size: {m} exceeds new_size {n}")
        if m == 0 or m == n:
            return []
        proof: list[bytes] = []
        start, end, whole = 0, n, True
        while m != end - start:
            k = _largest_power_of_two_below(end - start)
            if m <= k:
                proof.append(self._range_root(start + k, end))
                end = start + k
            else:
                proof.append(self._range_root(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            proof.append(self._range_root(start, end))
        proof.reverse()
        return proof


# --------------------------------------------------------------------------- verifiers


def _check_proof(proof: Sequence[bytes]) -> list[bytes]:
    if isinstance(proof, (bytes, bytearray, str)) or not isinstance(proof, Sequence):
        raise ValueError("proof: expected a sequence of 32-byte hashes")
    return [_check_hash(p, f"proof[{i}]") for i, p in enumerate(proof)]


def root_from_inclusion_proof(
    leaf_hash_: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes | None:
    """The root implied by an audit path (RFC 9162 §2.1.3.2 steps 1-4), or None when the
    path has the wrong shape for (index, tree_size)."""
    r = _check_hash(leaf_hash_, "leaf_hash")
    fn = _check_size(index, "index")
    sn = _check_size(tree_size, "tree_size")
    path = _check_proof(proof)
    if fn >= sn:
        return None
    sn -= 1
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return None
    return r


def verify_inclusion(
    leaf_hash_: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf ``index`` of a ``tree_size`` tree with
    root ``root`` has hash ``leaf_hash_``?"""
    expected = _check_hash(root, "root")
    got = root_from_inclusion_proof(leaf_hash_, index, tree_size, proof)
    return got is not None and got == expected


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: is the tree (new_size, new_root) an append-only extension of
    (old_size, old_root)?

    Edge cases: old_size == new_size needs an empty proof and equal roots; old_size == 0
    needs an empty proof (every tree extends the empty one); old_size > new_size is never
    consistent.
    """
    first = _check_size(old_size, "old_size")
    second = _check_size(new_size, "new_size")
    first_hash = _check_hash(old_root, "old_root")
    second_hash = _check_hash(new_root, "new_root")
    path = _check_proof(proof)
    if first > second:
        return False
    if first == second:
        return not path and first_hash == second_hash
    if first == 0:
        return not path
    # Step 1: a non-trivial proof is never empty.
    if not path:
        return False
    # Step 2: when the old tree is a perfect subtree, its root is the proof's first node.
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    # Steps 3-4.
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # Step 7.
    return sn == 0 and fr == first_hash and sr == second_hash
