"""The audit writer's fast path: entries re-stamped with their seq, hashes without the
state, the frontier read from the proof tree. Each helper must give exactly what the
definitions give (the constructor, ``append_batch``, ``Frontier.extend``): the log's
format does not depend on which path built it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.privacy.audit import merkle
from services.privacy.audit.domain import (
    AuditEntry,
    AuditState,
    append_batch,
    append_canonical,
    canonical_json,
    entry_hashes,
)
from tests.unit.privacy.factories import T0, make_entries

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | _text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


def _fields(**overrides):
    fields = dict(seq=0, ts=T0, event_type="read_household", principal="ana", role="analyst",
                  resource="household:h1", outcome="success", trace_id="t1", details={})
    fields.update(overrides)
    return fields


@given(seq=st.integers(0, 10**15), details=st.dictionaries(_text, _json, max_size=4),
       principal=_text.filter(bool), resource=_text, trace_id=_text)
@settings(max_examples=150, deadline=None)
def test_with_seq_equals_building_the_entry_at_that_seq(seq, details, principal, resource, trace_id):
    # Adversarial text: details keys named "seq", values and trace ids holding ',"seq":'.
    fields = _fields(details={**details, "seq": 7, "x": ',"seq":1'}, principal=principal,
                     resource=resource, trace_id=trace_id + ',"seq":3')
    placeholder = AuditEntry(**fields)
    built = AuditEntry(**{**fields, "seq": seq})
    stamped = placeholder.with_seq(seq)
    assert stamped == built
    assert stamped.canonical_bytes == built.canonical_bytes == placeholder.canonical_bytes_at(seq)
    assert stamped.canonical_bytes == canonical_json(built.to_dict())
    head, tail = placeholder.seq_template()
    assert head + b"%d" % seq + tail == built.canonical_bytes
    # Re-stamping does not disturb the original.
    assert placeholder.seq == 0 and placeholder.canonical_bytes == canonical_json(placeholder.to_dict())


def test_with_seq_validates_the_seq():
    entry = AuditEntry(**_fields())
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="seq"):
            entry.with_seq(bad)
    assert entry.with_seq(np.int64(5)).seq == 5 and type(entry.with_seq(np.int64(5)).seq) is int


@pytest.mark.parametrize("overrides", [
    {},
    {"event_type": "export", "role": "admin", "outcome": "denied"},
    {"ts": "2026-03-01T12:00:00.5+02:00", "details": {"b": [1, 2.5, None], "a": {"z": True}}},
    {"details": {"ü": "ß", "n": -3}},
])
def test_build_equals_the_constructor(overrides):
    fields = _fields(**overrides)
    built = AuditEntry.build(**fields)
    assert built == AuditEntry(**fields) and built.canonical_bytes == AuditEntry(**fields).canonical_bytes
    assert AuditEntry.build(**{**fields, "details": None}) == AuditEntry(**{**fields, "details": {}})


@pytest.mark.parametrize("overrides, field", [
    ({"seq": -1}, "seq"), ({"ts": "yesterday"}, "ts"), ({"event_type": "bogus"}, "event_type"),
    ({"role": "root"}, "role"), ({"outcome": "maybe"}, "outcome"), ({"principal": ""}, "principal"),
    ({"principal": 5}, "principal"), ({"resource": "r" * 1025}, "resource"),
    ({"trace_id": None}, "trace_id"), ({"details": [1]}, "details"),
    ({"details": {1: "x"}}, "details"), ({"details": {"f": float("nan")}}, "details.f"),
    ({"details": {"d": {"e": {1, 2}}}}, "details.d.e"), ({"principal": "\ud800"}, "entry"),
])
def test_build_refuses_what_the_constructor_refuses_with_the_same_message(overrides, field):
    fields = _fields(**overrides)
    with pytest.raises(ValueError) as by_constructor:
        AuditEntry(**fields)
    with pytest.raises(ValueError) as by_build:
        AuditEntry.build(**fields)
    assert str(by_build.value) == str(by_constructor.value)
    assert str(by_build.value).startswith(field)


def test_entry_hashes_follow_the_definitions():
    entries = make_entries(9)
    head = hashlib.sha256(b"some earlier log").digest()
    leaves, chains = entry_hashes(head, [e.canonical_bytes for e in entries])
    prev = head
    for e, leaf, chain in zip(entries, leaves, chains, strict=True):
        assert leaf == hashlib.sha256(b"\x00" + e.canonical_bytes).digest()
        prev = hashlib.sha256(b"\x02" + prev + e.canonical_bytes).digest()
        assert chain == prev
    assert entry_hashes(head, []) == ([], [])
    with pytest.raises(ValueError, match="chain_head"):
        entry_hashes(b"short", [])
    with pytest.raises(ValueError, match=r"canonical\[1\]"):
        entry_hashes(head, [b"{}", "not bytes"])


@given(st.lists(st.integers(1, 9), min_size=1, max_size=6))
@settings(max_examples=25, deadline=None)
def test_append_canonical_equals_append_batch(cuts):
    entries = make_entries(sum(cuts))
    state_a = state_b = AuditState()
    pos = 0
    for c in cuts:
        state_a, leaves_a, chains_a = append_batch(state_a, entries[pos:pos + c])
        state_b, leaves_b, chains_b = append_canonical(state_b, [e.canonical_bytes for e in entries[pos:pos + c]])
        assert state_a == state_b
        assert leaves_a.tobytes() == b"".join(leaves_b) and chains_a.tobytes() == b"".join(chains_b)
        pos += c
    assert append_canonical(state_b, []) == (state_b, [], [])


@given(st.integers(0, 300), st.data())
@settings(max_examples=40, deadline=None)
def test_tree_frontier_and_truncate(n, data):
    leaves = [hashlib.sha256(b"leaf %d" % i).digest() for i in range(n)]
    tree = merkle.MerkleTree.from_leaf_hashes(b"".join(leaves))
    m = data.draw(st.integers(0, n))
    assert tree.frontier() == merkle.Frontier().extend(b"".join(leaves))
    assert tree.frontier(m) == merkle.Frontier().extend(b"".join(leaves[:m]))
    # Truncating then re-extending gives back the same tree (the writer's undo).
    tree.truncate(m)
    prefix = merkle.MerkleTree.from_leaf_hashes(b"".join(leaves[:m]))
    assert tree.size == m and tree.root() == prefix.root() and tree.frontier() == prefix.frontier()
    tree.extend(b"".join(leaves[m:]))
    full = merkle.MerkleTree.from_leaf_hashes(b"".join(leaves))
    assert tree.root() == full.root()
    if n:
        index = data.draw(st.integers(0, n - 1))
        assert tree.inclusion_proof(index) == full.inclusion_proof(index)
        assert tree.consistency_proof(m) == full.consistency_proof(m)


def test_tree_truncate_and_frontier_validate_sizes():
    tree = merkle.MerkleTree.from_leaf_hashes(b"\x01" * 32 * 3)
    with pytest.raises(ValueError, match="size"):
        tree.truncate(4)
    with pytest.raises(ValueError, match="size"):
        tree.truncate(-1)
    with pytest.raises(ValueError, match="tree_size"):
        tree.frontier(4)
    tree.truncate(0)
    assert tree.size == 0 and tree.frontier() == merkle.Frontier()
