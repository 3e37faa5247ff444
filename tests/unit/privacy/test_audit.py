from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.privacy.audit import domain as audit, merkle
from services.privacy.audit.domain import (
    AuditEntry,
    AuditState,
    EventType,
    Role,
    TamperReason,
    append_batch,
    chain_hash,
    sign_tree_head,
    verify_log,
)
from tests.unit.privacy.factories import T0, make_entries

N = 30


def build_log(key, n=N, batch=7):
    """Append in batches like the service does; one STH per batch."""
    entries = make_entries(n)
    state = AuditState()
    leaves, chains, sths = [], [], []
    for start in range(0, n, batch):
        state, lh, ch = append_batch(state, entries[start : start + batch])
        leaves.append(lh)
        chains.append(ch)
        sths.append(sign_tree_head(state, key, T0 + timedelta(hours=1, seconds=start)))
    leaf_hashes = np.concatenate(leaves) if leaves else np.zeros((0, 32), np.uint8)
    chain_hashes = [bytes(h) for h in np.concatenate(chains)] if chains else []
    return entries, chain_hashes, leaf_hashes, state, sths


@pytest.fixture(scope="module")
def log(signing_key):
    return build_log(signing_key)


def with_details(entry: AuditEntry, **details) -> AuditEntry:
    return replace(entry, details={**entry.details, **details})


# --------------------------------------------------------------------------- format


def test_at_least_fifteen_event_types_and_the_five_roles():
    assert len(EventType) >= 15
    required = {"assign", "ingest", "read_household", "export", "attribution_run",
                "deletion_requested", "deletion_completed", "deletion_failed",
                "consent_change", "retention_purge", "authentication_failure",
                "permission_denied", "key_rotation", "flag_change", "model_refit",
                "feedback", "security_alert"}
    assert required <= {e.value for e in EventType}
    assert {r.value for r in Role} == {"admin", "analyst", "data_scientist",
                                       "privacy_officer", "service"}


def test_canonical_bytes_are_sorted_compact_utf8():
    e = make_entries(1)[0]
    data = e.canonical_bytes
    pairs_seen: list[list[str]] = []
    json.loads(data, object_pairs_hook=lambda pairs: pairs_seen.append([k for k, _ in pairs]) or dict(pairs))
    for keys in pairs_seen:
        assert keys == sorted(keys)
    assert b" " not in data and b"\n" not in data
    assert "ü".encode() in data  # kept as UTF-8, not \u escaped
    assert b'"ts":"2025-03-01T12:00:00.000000Z"' in data
    assert AuditEntry.from_dict(json.loads(data)) == e
    assert AuditEntry.from_dict(json.loads(data)).canonical_bytes == data


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)


@given(
    seq=st.integers(0, 2**62), micros=st.integers(0, 10**15),
    event_type=st.sampled_from(list(EventType)), role=st.sampled_from(list(Role)),
    principal=_text.filter(bool), resource=_text, trace_id=_text,
    details=st.dictionaries(st.text(), _json_values, max_size=5),
)
@settings(max_examples=150, deadline=None)
def test_fast_encoder_equals_reference_json(seq, micros, event_type, role, principal, resource,
                                            trace_id, details):
    """The hand-assembled canonical bytes equal json.dumps of the documented object."""
    ts = T0 - timedelta(days=365 * 20) + timedelta(microseconds=micros)
    e = AuditEntry(seq, ts, event_type.value, principal, role.value, resource, "denied",
                   trace_id, details)
    reference = {"v": 1, "seq": seq, "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                 "event_type": event_type.value, "principal": principal, "role": role.value,
                 "resource": resource, "outcome": "denied", "trace_id": trace_id,
                 "details": details}
    assert e.canonical_bytes == json.dumps(
        reference, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False).encode("utf-8")
    assert AuditEntry.from_dict(json.loads(e.canonical_bytes)).canonical_bytes == e.canonical_bytes


def test_details_are_snapshotted_and_bounded():
    details = {"a": [1]}
    e = AuditEntry(0, T0, "assign", "svc", "service", "", details=details)
    details["a"] = [2]  # rebinding a key afterwards does not change the entry (shallow copy)
    assert e.details == {"a": [1]} and b'"a":[1]' in e.canonical_bytes
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ValueError, match="nested deeper"):
        AuditEntry(0, T0, "assign", "svc", "service", "", details=deep)
    with pytest.raises(ValueError, match="Unicode"):
        AuditEntry(0, T0, "assign", "svc\ud800", "service", "")


def test_equal_content_gives_equal_bytes_regardless_of_dict_order_and_timezone():
    from datetime import timezone
    a = AuditEntry(0, T0, "assign", "svc", "service", "hh", details={"b": 1, "a": 2})
    b = AuditEntry(0, T0.astimezone(timezone(timedelta(hours=5))), EventType.ASSIGN, "svc",
                   Role.SERVICE, "hh", details={"a": 2, "b": 1})
    assert a.canonical_bytes == b.canonical_bytes


def test_chain_hash_definition():
    data = b'{"x":1}'
    assert chain_hash(bytes(32), data) == hashlib.sha256(b"\x02" + bytes(32) + data).digest()
    with pytest.raises(ValueError, match="prev_hash"):
        chain_hash(b"short", data)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("seq", -1, "seq"),
    ("seq", True, "seq"),
    ("seq", "3", "seq"),
    ("ts", "2025-01-01T00:00:00", "ts"),  # naive timestamp
    ("ts", "yesterday", "ts"),
    ("event_type", "launch_missiles", "event_type"),
    ("role", "root", "role"),
    ("outcome", "maybe", "outcome"),
    ("principal", "", "principal"),
    ("principal", None, "principal"),
    ("resource", 5, "resource"),
    ("details", {"x": float("nan")}, r"details\.x"),
    ("details", {"x": {"y": [1, float("inf")]}}, r"details\.x\.y\[1\]"),
    ("details", {1: "a"}, "details"),
    ("details", {"x": object()}, r"details\.x"),
    ("details", [1, 2], "details"),
])
def test_invalid_entries_name_the_field(field, value, match):
    kwargs = dict(seq=0, ts=T0, event_type="assign", principal="svc", role="service",
                  resource="hh", details={})
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        AuditEntry(**kwargs)


def test_from_dict_rejects_unknown_and_missing_fields():
    d = make_entries(1)[0].to_dict()
    with pytest.raises(ValueError, match="entry.extra: unknown"):
        AuditEntry.from_dict({**d, "extra": 1})
    d.pop("role")
    with pytest.raises(ValueError, match="entry.role: missing"):
        AuditEntry.from_dict(d)


# --------------------------------------------------------------------------- writer


def test_append_batch_matches_definitions(signing_key):
    entries = make_entries(10)
    state, leaves, chains = append_batch(AuditState(), entries)
    assert leaves.shape == chains.shape == (10, 32) and leaves.dtype == np.uint8
    prev = bytes(32)
    for i, e in enumerate(entries):
        assert bytes(leaves[i]) == hashlib.sha256(b"\x00" + e.canonical_bytes).digest()
        prev = hashlib.sha256(b"\x02" + prev + e.canonical_bytes).digest()
        assert bytes(chains[i]) == prev
    assert state.size == 10 and state.chain_head == prev
    assert state.root == merkle.MerkleTree.from_leaves(e.canonical_bytes for e in entries).root()


@given(st.lists(st.integers(1, 9), min_size=1, max_size=8))
@settings(max_examples=25, deadline=None)
def test_batching_does_not_change_the_result(cuts):
    entries = make_entries(sum(cuts))
    one_shot = append_batch(AuditState(), entries)
    state, pos, leaves, chains = AuditState(), 0, [], []
    for c in cuts:
        state, lh, ch = append_batch(AuditState.from_bytes(state.to_bytes()), entries[pos : pos + c])
        leaves.append(lh)
        chains.append(ch)
        pos += c
    assert state == one_shot[0]
    assert np.array_equal(np.concatenate(leaves), one_shot[1])
    assert np.array_equal(np.concatenate(chains), one_shot[2])


def test_append_batch_is_pure_and_validates_seq():
    entries = make_entries(5)
    s0 = AuditState()
    s1, _, _ = append_batch(s0, entries[:3])
    assert s0 == AuditState() and s1.size == 3
    with pytest.raises(ValueError, match=r"entries\[0\]\.seq: expected 3, got 4"):
        append_batch(s1, entries[4:])
    with pytest.raises(ValueError, match=r"entries\[1\]\.seq"):
        append_batch(s1, [entries[3], entries[3]])
    with pytest.raises(ValueError, match=r"entries\[0\]"):
        append_batch(s1, ["not an entry"])
    with pytest.raises(ValueError, match="state"):
        append_batch(None, entries)
    s_same, leaves, chains = append_batch(s1, [])
    assert s_same == s1 and leaves.shape == (0, 32) and chains.shape == (0, 32)


def test_state_serialisation_round_trip_and_validation():
    state, _, _ = append_batch(AuditState(), make_entries(13))
    raw = state.to_bytes()
    assert len(raw) == 4 + 32 + 8 + 32 * bin(13).count("1")
    assert AuditState.from_bytes(raw) == state
    with pytest.raises(ValueError, match="magic"):
        AuditState.from_bytes(b"XXXX" + raw[4:])
    with pytest.raises(ValueError, match="data"):
        AuditState.from_bytes(raw[:-1])
    assert AuditState.from_bytes(AuditState().to_bytes()) == AuditState()


# --------------------------------------------------------------------------- tree heads


def test_tree_head_sign_verify_and_forgery(signing_key, other_key):
    state, _, _ = append_batch(AuditState(), make_entries(4))
    sth = sign_tree_head(state, signing_key, T0)
    assert audit.verify_tree_head(sth, signing_key.public_key())
    assert not audit.verify_tree_head(sth, other_key.public_key())
    assert not audit.verify_tree_head(replace(sth, tree_size=5), signing_key.public_key())
    assert not audit.verify_tree_head(replace(sth, root=bytes(32)), signing_key.public_key())
    assert not audit.verify_tree_head(
        replace(sth, timestamp=T0 + timedelta(seconds=1)), signing_key.public_key())
    bad_sig = bytearray(sth.signature)
    bad_sig[0] ^= 1
    assert not audit.verify_tree_head(replace(sth, signature=bytes(bad_sig)), signing_key.public_key())
    assert audit.SignedTreeHead.from_dict(json.loads(json.dumps(sth.to_dict()))) == sth


def test_every_entry_has_a_valid_inclusion_proof(log, signing_key):
    entries, _, leaf_hashes, _, sths = log
    tree = merkle.MerkleTree.from_leaf_hashes(leaf_hashes)
    final = sths[-1]
    for e in entries:
        proof = tree.inclusion_proof(e.seq, final.tree_size)
        assert audit.verify_entry_inclusion(e, proof, final, signing_key.public_key())
        forged = with_details(e, n=-1)
        assert not audit.verify_entry_inclusion(forged, proof, final, signing_key.public_key())


def test_batch_tree_heads_are_pairwise_consistent(log, signing_key, other_key):
    _, _, leaf_hashes, _, sths = log
    tree = merkle.MerkleTree.from_leaf_hashes(leaf_hashes)
    pk = signing_key.public_key()
    for i, old in enumerate(sths):
        for new in sths[i:]:
            proof = tree.consistency_proof(old.tree_size, new.tree_size)
            assert audit.verify_tree_heads_consistent(old, new, proof, pk)
            assert not audit.verify_tree_heads_consistent(old, new, proof, other_key.public_key())


# --------------------------------------------------------------------------- tamper detection


def check(entries, chains, sth, key, **kw):
    return verify_log(entries, sth, key.public_key(), chain_hashes=chains, **kw)


def test_intact_log_verifies(log, signing_key):
    entries, chains, _, _, sths = log
    result = check(entries, chains, sths[-1], signing_key)
    assert result.ok and result.reason is None and bool(result)
    assert verify_log(entries, sths[-1], signing_key.public_key()).ok  # without chain hashes
    # every batch head verifies the prefix it signed
    for sth in sths:
        n = sth.tree_size
        assert check(entries[:n], chains[:n], sth, signing_key).ok


def test_empty_log(signing_key):
    sth = sign_tree_head(AuditState(), signing_key, T0)
    assert verify_log([], sth, signing_key.public_key(), chain_hashes=[]).ok
    assert verify_log(make_entries(1), sth, signing_key.public_key()).reason is TamperReason.INSERTED


@pytest.mark.parametrize("k", [0, 12, N - 1])
def test_modified_entry_is_located(log, signing_key, k):
    entries, chains, _, _, sths = log
    tampered = list(entries)
    tampered[k] = with_details(entries[k], n=999)
    result = check(tampered, chains, sths[-1], signing_key)
    assert (result.ok, result.reason, result.first_bad_seq) == (False, TamperReason.MODIFIED, k)
    # without chain hashes it is still detected, just not located
    result = verify_log(tampered, sths[-1], signing_key.public_key())
    assert (result.reason, result.first_bad_seq) == (TamperReason.MODIFIED, None)


@pytest.mark.parametrize("field", ["principal", "outcome", "ts", "event_type", "resource"])
def test_any_field_change_is_detected(log, signing_key, field):
    entries, chains, _, _, sths = log
    value = {"principal": "mallory", "outcome": "success" if entries[7].outcome != "success"
             else "denied", "ts": entries[7].ts + timedelta(microseconds=1),
             "event_type": "feedback" if entries[7].event_type != "feedback" else "assign",
             "resource": "household:other"}[field]
    tampered = list(entries)
    tampered[7] = replace(entries[7], **{field: value})
    result = check(tampered, chains, sths[-1], signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.MODIFIED, 7)


def test_modification_with_recomputed_chain_is_caught_by_the_signed_head(log, signing_key):
    entries, _, _, _, sths = log
    tampered = list(entries)
    tampered[12] = with_details(entries[12], n=999)
    _, _, forged_chains = append_batch(AuditState(), tampered)  # attacker redoes the chain
    result = check(tampered, [bytes(h) for h in forged_chains], sths[-1], signing_key)
    assert (result.ok, result.reason) == (False, TamperReason.MODIFIED)


@pytest.mark.parametrize("k", [0, 12, N - 2])
def test_removed_entry_is_located(log, signing_key, k):
    entries, chains, _, _, sths = log
    result = check(entries[:k] + entries[k + 1 :], chains[:k] + chains[k + 1 :], sths[-1], signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.REMOVED, k)


def test_reordered_entries_are_located(log, signing_key):
    entries, chains, _, _, sths = log
    order = list(range(N))
    order[12], order[13] = 13, 12
    result = check([entries[i] for i in order], [chains[i] for i in order], sths[-1], signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.REORDERED, 12)


def test_inserted_duplicate_seq_is_located(log, signing_key):
    entries, chains, _, _, sths = log
    forged = with_details(entries[12], n=-12)
    tampered = entries[:12] + [forged] + entries[12:]
    result = check(tampered, chains[:12] + [chains[12]] + chains[12:], sths[-1], signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.INSERTED, 12)


def test_inserted_entry_with_renumbering_is_located(log, signing_key):
    entries, chains, _, _, sths = log
    forged = AuditEntry(12, entries[11].ts, "export", "mallory", "admin", "household:1")
    renumbered = [replace(e, seq=e.seq + 1) for e in entries[12:]]
    # the writer of the rows copies stored chain hashes along; the forged row gets any hash
    tampered_chains = chains[:12] + [bytes(32)] + chains[12:]
    result = check(entries[:12] + [forged] + renumbered, tampered_chains, sths[-1], signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.INSERTED, 12)
    # even a forger who recomputes every chain hash is caught (more entries than signed)
    all_forged = entries[:12] + [forged] + renumbered
    _, _, redone = append_batch(AuditState(), all_forged)
    result = check(all_forged, [bytes(h) for h in redone], sths[-1], signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.INSERTED, N)


def test_truncated_log_is_detected(log, signing_key, other_key):
    entries, chains, _, _, sths = log
    result = check(entries[:25], chains[:25], sths[-1], signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.TRUNCATED, 25)
    # re-signing the shorter log needs the private key: another key is rejected
    state, _, _ = append_batch(AuditState(), entries[:25])
    resigned = sign_tree_head(state, other_key, T0)
    result = check(entries[:25], chains[:25], resigned, signing_key)
    assert result.reason is TamperReason.BAD_SIGNATURE


def test_forged_tree_head_is_rejected(log, signing_key):
    entries, chains, _, _, sths = log
    result = check(entries, chains, replace(sths[-1], tree_size=N + 1), signing_key)
    assert (result.reason, result.first_bad_seq) == (TamperReason.BAD_SIGNATURE, None)


@given(st.data())
@settings(max_examples=40, deadline=None)
def test_any_single_detail_change_is_located(data):
    from services.privacy.keys.signing import Ed25519PrivateKey
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    n = data.draw(st.integers(1, 20))
    entries = make_entries(n)
    state, _, chains = append_batch(AuditState(), entries)
    sth = sign_tree_head(state, key, T0)
    k = data.draw(st.integers(0, n - 1))
    value = data.draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
    tampered = list(entries)
    tampered[k] = with_details(entries[k], injected=value)
    result = verify_log(tampered, sth, key.public_key(), chain_hashes=chains)
    assert (result.reason, result.first_bad_seq) == (TamperReason.MODIFIED, k)


def test_verify_log_input_errors(log, signing_key):
    entries, chains, _, _, sths = log
    with pytest.raises(ValueError, match="chain_hashes"):
        verify_log(entries, sths[-1], signing_key.public_key(), chain_hashes=chains[:-1])
    with pytest.raises(ValueError, match=r"entries\[1\]"):
        verify_log([entries[0], "x"], sths[-1], signing_key.public_key())
    with pytest.raises(ValueError, match="public_key"):
        verify_log(entries, sths[-1], signing_key)  # a private key is not a public key


# --------------------------------------------------------------------------- export


def test_export_round_trip_and_parse_errors(log, signing_key):
    entries, chains, _, _, sths = log
    lines = list(audit.export_lines(entries, chains, sths[-1]))
    assert len(lines) == N + 1 and all("\n" not in line for line in lines)
    parsed = audit.parse_export(lines)
    assert parsed.entries == entries and parsed.chain_hashes == chains and parsed.sth == sths[-1]
    assert verify_log(parsed.entries, parsed.sth, signing_key.public_key(),
                      chain_hashes=parsed.chain_hashes).ok
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        audit.parse_export([lines[0], "{oops", lines[-1]])
    with pytest.raises(ValueError, match="no signed tree head"):
        audit.parse_export(lines[:-1])
    with pytest.raises(ValueError, match="after the signed tree head"):
        audit.parse_export(lines + [lines[0]])
    bad = json.loads(lines[3])
    bad["entry"]["role"] = "root"
    with pytest.raises(ValueError, match="line 1.entry.role"):
        audit.parse_export([json.dumps(bad), lines[-1]])


# --------------------------------------------------------------------------- streamed verification (session 32)


def _shape_problem_as_it_was(seqs: list[int], signed_size: int):
    """960ab3f's pure-Python classifier (a set and a list of every seq): the oracle the
    vectorised ``_shape_problem`` must agree with, reason, seq and message."""
    seen: set[int] = set()
    for position, s in enumerate(seqs):
        if s in seen:
            return (TamperReason.INSERTED, s, f"seq {s} appears twice (position {position})")
        seen.add(s)
    if [s for s in seqs if s >= signed_size]:
        return None
    missing_below = next((s for s in range(max(seqs, default=-1) + 1) if s not in seen), None)
    if missing_below is not None:
        return (TamperReason.REMOVED, missing_below, f"entry seq {missing_below} is missing")
    for position, s in enumerate(seqs):
        if s != position:
            return (TamperReason.REORDERED, position, f"position {position} holds seq {s}: entries are out of order")
    if len(seqs) < signed_size:
        return (TamperReason.TRUNCATED, len(seqs),
                f"log ends at {len(seqs)} entries, the signed tree head covers {signed_size}")
    return None


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 12).flatmap(lambda n: st.tuples(
    st.permutations(list(range(n))), st.lists(st.tuples(st.integers(0, 14), st.integers(0, 14)), max_size=3),
    st.integers(0, 14), st.integers(0, 3))))
def test_the_vectorised_shape_classifier_agrees_with_the_old_one(case):
    order, edits, signed_size, cut = case
    seqs = list(order) if len(order) < 2 or cut else sorted(order)
    for position, value in edits:   # overwrite / append seqs: duplicates, gaps, beyond the signed size
        if position < len(seqs):
            seqs[position] = value
        else:
            seqs.append(value)
    seqs = seqs[: max(len(seqs) - cut, 0)]
    got = audit._shape_problem(np.array(seqs, dtype=np.int64), signed_size)
    want = _shape_problem_as_it_was(seqs, signed_size)
    assert (None if got is None else (got.reason, got.first_bad_seq, got.message)) == want, seqs


def test_the_streamed_verifier_keeps_nothing_per_entry_of_an_intact_log(signing_key):
    # Fed in order, an intact log leaves no per-entry state behind: the seqs are kept only
    # from the first one off its position (a tampered log), the leaves folded every 4096.
    entries = make_entries(5000)
    state, _, _ = append_batch(AuditState(), entries)
    sth = sign_tree_head(state, signing_key, T0)
    verifier = audit.LogVerifier(sth, signing_key.public_key())
    for e in entries:
        verifier.add(e)
    assert verifier._straying is None and len(verifier._pending) < 4096 * 32
    assert verifier.result().ok
    swapped = audit.LogVerifier(sth, signing_key.public_key())
    for e in [entries[1], entries[0], *entries[2:]]:
        swapped.add(e)
    assert (swapped.result().reason, swapped.result().first_bad_seq) == (TamperReason.REORDERED, 0)
