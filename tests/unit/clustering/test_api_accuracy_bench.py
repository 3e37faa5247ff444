"""bench.api_accuracy's client side: how a household's raw events are cut into requests,
and how served answers are scored (no mesh here; tests/e2e/test_api_equivalence.py runs
the whole path)."""

from __future__ import annotations

import numpy as np

from bench import api_accuracy as A
from bench import worlds as W


def _household():
    return W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=2,
                      keep_events=True)[1]


def test_requests_hold_every_event_once_in_time_order_and_quiet_cuts_split_no_session():
    h = _household()
    session_of = {}
    from services.clustering.domain.sessions import build_sessions
    for device in set(h.device_id):
        for s in build_sessions([e for e in h.events if e.device_id == device]):
            session_of.update({eid: s.session_id for eid in s.event_ids})
    for cut in ("midnight", "quiet"):
        requests = A.daily_requests(h.events, cut)
        flat = [e for r in requests for e in r]
        assert [e.event_id for e in flat] == [e.event_id for e in h.events]
        assert all(len({int(e.ts // A.DAY_S) for e in r[:1]}) == 1 for r in requests)
        split = {sid for sid in session_of.values()
                 if len({i for i, r in enumerate(requests) for e in r if session_of[e.event_id] == sid}) > 1}
        if cut == "quiet":
            assert not split
        else:   # midnight cuts do split sessions that run over midnight (what --cut quiet avoids)
            assert split
    assert len(A.daily_requests(h.events, "quiet")) <= len(A.daily_requests(h.events, "midnight"))


def test_answers_are_scored_on_the_answered_person_and_its_probability():
    labels, P = A.as_columns(["p2", "p1", None, "p2"], [0.9, 0.6, 0.0, 0.7])
    np.testing.assert_array_equal(labels, [1, 0, 2, 1])       # ids sorted; unanswered its own label
    np.testing.assert_allclose(P.max(axis=1), [0.9, 0.6, 0.0, 0.7], atol=1e-8)
    assert (P.argmax(axis=1) == labels).all() and P.shape == (4, 3)
