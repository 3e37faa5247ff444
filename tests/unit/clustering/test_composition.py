"""A member joining or leaving, told apart from refits that only split or rename
persons (HouseholdModel._detect_composition, issue #10)."""

from __future__ import annotations

import numpy as np

from services.clustering.domain import model as M
from services.clustering.domain.model import HouseholdModel, _share_change_llr
from tests.unit.clustering.test_identity_signals import household, persona_sessions


def _stream(X, dev, batch=5):
    """Feed sessions ``batch`` at a time; returns (model, [(sessions seen, kind)])."""
    m = HouseholdModel()
    events = []
    for a in range(0, X.shape[0], batch):
        before = len(m.composition_events)
        m.update(X[a:a + batch], device_ids=dev[a:a + batch])
        events += [(min(a + batch, X.shape[0]), e["kind"]) for e in m.composition_events[before:]]
    return m, events


def test_share_change_ratio_is_zero_for_equal_shares_and_grows_with_the_change():
    old = np.array([20.0, 20.0, 0.0, 20.0])
    new = np.array([4.0, 0.0, 8.0, 10.0])
    llr = _share_change_llr(old, 100, new, 20)
    assert llr[0] == 0.0                               # 20 % before, 20 % after
    assert llr[2] > llr[1] > 0.0 and llr[3] > 0.0      # absent -> 40 %, 20 % -> absent, 20 % -> 50 %
    assert llr[2] > M.CHANGE_GLR_H                     # a newcomer with 8 of 20 sessions is news
    assert _share_change_llr(np.array([1.0]), 100, np.array([1.0]), 20)[0] < 1.0  # rare either side


def test_a_member_leaving_is_reported_within_30_sessions():
    """Two phone owners; the second one's last session is on day 45 of 90 (moved out):
    a leave event no later than 30 sessions after it, and no join."""
    rng = np.random.default_rng(31)
    parts = [(*persona_sessions(rng, 150, 90, 20, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
             (*persona_sessions(rng, 60, 45, 23, "mobile", {"horror": 2, "scifi": 1}), "phone-b", 1)]
    _, X, dev, person = household(parts)
    last_seen = int(np.flatnonzero(person == 1)[-1])
    _, events = _stream(X, dev)
    leaves = [i for i, kind in events if kind == "leave"]
    assert leaves and last_seen < leaves[0] <= last_seen + 30
    assert not [e for e in events if e[1] == "join"]


def test_no_composition_event_in_a_stable_two_person_household():
    """Two members who both watch from start to end (phones and a shared TV): the
    refits that run along the stream report nobody joining or leaving."""
    rng = np.random.default_rng(32)
    parts = [(*persona_sessions(rng, 110, 120, 20, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
             (*persona_sessions(rng, 40, 120, 20, "tv", {"comedy": 2, "drama": 1}), "tv", 0),
             (*persona_sessions(rng, 90, 120, 9, "tablet", {"kids": 2, "animation": 1}, kids=0.9), "tab", 1),
             (*persona_sessions(rng, 30, 120, 9, "tv", {"kids": 2, "animation": 1}, kids=0.9), "tv", 1)]
    _, X, dev, _ = household(parts)
    m, events = _stream(X, dev)
    assert m.n_persons == 2
    assert events == []


def test_a_reported_join_survives_serialisation_and_is_not_reported_twice():
    rng = np.random.default_rng(33)
    parts = [(*persona_sessions(rng, 120, 90, 20, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
             (*persona_sessions(rng, 60, 45, 9, "tablet", {"kids": 2, "animation": 1}, kids=0.9, start_day=45),
              "tab", 1)]
    _, X, dev, _ = household(parts)
    half = X.shape[0] * 3 // 4
    m, events = _stream(X[:half], dev[:half])
    joins = [e for e in events if e[1] == "join"]
    assert len(joins) == 1 and m.joined
    restored = HouseholdModel.from_bytes(m.to_bytes())
    assert restored.joined == m.joined
    before = len(restored.composition_events)
    for a in range(half, X.shape[0], 5):
        restored.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert not [e for e in restored.composition_events[before:] if e["kind"] == "join"]
