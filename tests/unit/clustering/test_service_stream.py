"""The streaming benchmark follows the clustering service's own refresh decision
(bench/_worlds_eval.ServiceStream -> ModelKeeper.advance): micro-batches, answers of
smaller arrivals by the current model, the drift reference, refits."""

from __future__ import annotations

import numpy as np

from bench import _worlds_eval as E
from bench import worlds as W
from services.clustering.domain.model import MIN_SESSIONS
from services.clustering.household import MICRO_BATCH, MIN_DRIFT_REFERENCE


def _household(i: int = 1):
    return W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=2)[i]


def test_arrivals_are_folded_in_by_micro_batches_and_answered_by_the_current_model_between():
    h = _household()
    stream = E.ServiceStream(h)
    seen = []
    for a, b, m, out, _ in stream.arrivals(1):
        seen.append(m.n_sessions)
        assert out.person_index.shape == (b - a,)
    seen = np.array(seen)
    # cold: every session folded in; then only when MICRO_BATCH sessions wait
    np.testing.assert_array_equal(seen[:MIN_SESSIONS], np.arange(1, MIN_SESSIONS + 1))
    folds = np.flatnonzero(np.diff(seen)) + 1
    assert (np.diff(seen)[np.diff(seen) > 0][MIN_SESSIONS - 1:] == MICRO_BATCH).all()
    assert len(folds) >= 3
    np.testing.assert_array_equal(seen, E.stream_ages(h.n_sessions, 1))
    np.testing.assert_array_equal(E.stream_ages(h.n_sessions, 5), E.model_ages([h], "stream", 5)[0])


def test_the_stream_keeps_the_keepers_envelope_and_its_first_fit():
    h = _household()
    stream = E.ServiceStream(h)
    for _ in stream.arrivals(1):
        pass
    env = stream.envelope
    # the envelope is the keeper's: every folded session included, the first fit recorded
    assert env.included == env.model.n_sessions == E.stream_ages(h.n_sessions, 1)[-1]
    assert stream.refits[0] == (1, "new")
    # a stream followed from its first session has a reference of 2 * MIN_SESSIONS:
    # below MIN_DRIFT_REFERENCE, so its drift detector never runs (docs/clustering.md)
    assert env.reference_end == 2 * MIN_SESSIONS < MIN_DRIFT_REFERENCE and stream.drift == []


def test_a_mature_fitted_model_answers_sessions_it_does_not_include_at_arrival():
    h = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=3)[1]
    from services.clustering.domain.model import HouseholdModel
    m = HouseholdModel().fit(h.features, device_ids=h.device_id)
    assert not m.streamed and m.n_sessions >= 60 and m.n_persons > 1
    inside = m.assign_batch(h.features, device_ids=h.device_id, included=True)
    arriving = m.assign_batch(h.features, device_ids=h.device_id)
    raw = HouseholdModel(calibrated=False).fit(h.features, device_ids=h.device_id).assign_batch(
        h.features, device_ids=h.device_id)
    multi = raw.probabilities.max(axis=1) < 1
    # the same persons; the confidence of the two maps ("fitted" vs the at-arrival "streamed")
    np.testing.assert_array_equal(inside.person_index, arriving.person_index)
    assert not np.allclose(inside.confidence[multi], arriving.confidence[multi])
    mixed = m.assign_batch(h.features, device_ids=h.device_id, included=np.arange(h.n_sessions) < 20)
    np.testing.assert_allclose(mixed.confidence[:20], inside.confidence[:20])
    np.testing.assert_allclose(mixed.confidence[20:], arriving.confidence[20:])
