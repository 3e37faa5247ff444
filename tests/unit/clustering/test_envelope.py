"""The stored envelope: what the keeper needs to see a changed session list survives a
round trip, and an envelope saved before a field existed is read as "not checked"
rather than as a change (which would refit every household after an upgrade)."""

from __future__ import annotations

import json
import struct

import numpy as np

from services.clustering.domain.features import FEATURE_DIM
from services.clustering.domain.model import HouseholdModel
from services.clustering.household import Envelope


def _model() -> HouseholdModel:
    X = np.random.default_rng(0).random((40, FEATURE_DIM))
    return HouseholdModel("gmm").fit(X)


def test_the_envelope_keeps_what_detects_a_shifted_or_grown_session_list():
    env = Envelope(_model(), included=40, reference_end=40, drift_checked=40, first_session_id="s-a",
                   last_refit=1.5, last_included_id="s-z", included_events=123)
    back = Envelope.from_bytes(env.to_bytes(), None)
    assert (back.included, back.first_session_id, back.last_included_id, back.included_events) == \
        (40, "s-a", "s-z", 123)


def test_an_envelope_saved_before_the_event_count_was_kept_is_not_checked():
    env = Envelope(_model(), included=40, first_session_id="s-a", last_included_id="s-z", included_events=7)
    data = env.to_bytes()
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + n])
    del header["included_events"]
    old = json.dumps(header).encode()
    back = Envelope.from_bytes(struct.pack("<I", len(old)) + old + data[4 + n:], None)
    assert back.included_events == -1 and back.last_included_id == "s-z"
