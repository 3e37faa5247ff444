"""``sums_features`` (many sessions' feature vectors in one ``features_matrix`` call, as an
ingest of thousands of new households computes them, ingest29) gives each session the row
it gets alone (``FeatureSums.features``), to the bit: the model's inputs do not depend on
how many sessions were computed together."""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from services.clustering.domain.sessions import build_session_states, sessions_of
from services.clustering.domain.features import DEFAULT_VOCABULARY, sums_features
from tests.helpers.incremental_sessions import random_event

T0 = 1_760_000_000.0


def _states(seed: int, n_devices: int = 40):
    rng = random.Random(seed)
    states = []
    for d in range(n_devices):
        ts = T0 + rng.uniform(0, 30 * 86400)
        events = []
        for i in range(rng.randint(1, 25)):
            ts += rng.choice((20.0, 300.0, 4000.0))
            events.append(random_event(rng, f"acct-{d % 7}", i, ts, device=f"dev-{d}",
                                       utc_offset_minutes=rng.choice((None, -300, 330))))
        states += build_session_states(events, 1800.0, DEFAULT_VOCABULARY)
    return states


def test_many_sessions_features_at_once_are_each_sessions_own():
    for seed in range(5):
        states = _states(seed)
        together = sums_features([s.sums for s in states], [s.local_start_ts() for s in states],
                                 [s.device_type for s in states])
        assert together.shape[0] == len(states) > 40
        for state, row in zip(states, together):
            alone = state.sums.features(state.local_start_ts(), state.device_type)
            assert row.dtype == alone.dtype == np.float32
            assert row.tobytes() == alone.tobytes()


def test_sessions_of_are_the_states_sessions():
    states = _states(11)
    for state, session in zip(states, sessions_of(states, DEFAULT_VOCABULARY), strict=True):
        alone = state.session(DEFAULT_VOCABULARY)
        assert session.features.tobytes() == alone.features.tobytes()
        for f in dataclasses.fields(session):
            if f.name != "features":
                assert getattr(session, f.name) == getattr(alone, f.name), f.name
    assert sessions_of([], DEFAULT_VOCABULARY) == []
