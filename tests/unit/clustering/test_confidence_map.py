"""The confidence map says how sure an answer is, never who it is."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.clustering.domain.model import calibrate_confidence


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=6), min_size=1, max_size=20),
       st.booleans(), st.booleans())
def test_the_map_keeps_the_answer_and_a_distribution(rows, device, young):
    width = max(len(r) for r in rows)
    P = np.array([r + [0.0] * (width - len(r)) for r in rows])
    P /= P.sum(axis=1, keepdims=True)
    P[np.arange(len(P)), P.argmax(axis=1)] += 1e-6   # a strict top (ties are the caller's)
    P /= P.sum(axis=1, keepdims=True)
    out = calibrate_confidence(P, (P > 0).sum(axis=1), device=device, young=young)
    np.testing.assert_array_equal(out.argmax(axis=1), P.argmax(axis=1))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)
    assert not out[P == 0].any()


def test_a_low_map_value_with_three_persons_does_not_hand_the_answer_to_the_runner_up():
    # top 0.40, runner-up 0.35: the map may say 0.34 (>= 1/3), and rescaling the rest
    # would have made the runner-up 0.385 > 0.34 — the answer changed person.
    P = np.array([[0.40, 0.35, 0.25]])
    out = calibrate_confidence(P, np.array([3]), device=True, young=True)
    assert out.argmax() == 0 and out[0, 0] > out[0, 1]
