"""The confidence maps are fitted on raw answers recorded the way the service answers
(bench/_confidence.py): the same time-ordered stream the benchmark scores, and what the
service knows with each answer."""

from __future__ import annotations

import numpy as np

from bench import _confidence as C
from bench import worlds as W
from bench._worlds_eval import hearth_stream
from bench.accuracy import fit_device_confidence
from services.clustering.domain.model import DEVICE_CONFIDENCE_MAPS, MIN_SESSIONS, ONE_PERSON_CONFIDENCE


def _households(n: int = 3):
    return W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=n)


def test_the_raw_stream_answers_are_the_scored_streams_answers():
    h = _households(1)[0]
    raw = C.stream_answers(h)
    labels, P, _ = hearth_stream(h)
    # the maps change how sure an answer is, never who it is: the same person per session
    np.testing.assert_array_equal(raw.pred, labels)
    np.testing.assert_array_equal(raw.P > 0, P > 0)
    # answered at arrival: the model's age is the sessions folded in so far
    assert raw.age[0] == C.STREAM_BATCH and raw.age[-1] == h.n_sessions
    # the first full fit is at MIN_SESSIONS; the stream's model is "streamed" once more
    # sessions were folded in after it than it had
    assert not raw.streamed[(raw.age >= MIN_SESSIONS) & (raw.age <= 2 * MIN_SESSIONS)].any()
    assert raw.streamed[raw.age > 2 * MIN_SESSIONS].all()
    batch = C.batch_answers(h)
    assert not batch.streamed.any()


def test_the_fit_gives_every_map_and_one_person_group_or_says_which_it_lacks():
    answers = [C.household_answers(h) for h in _households(3)]
    try:
        out = fit_device_confidence(answers)
    except ValueError as exc:   # three households rarely have a one-person model of >= 60 streamed sessions
        assert "no answers for" in str(exc) and ("map" in str(exc) or "one-person group" in str(exc))
        # the groups it has are fitted: with one of each kind added it succeeds
        mature = C.household_answers(_households(1)[0])
        s = mature["stream"]
        one = s.P[:, [0]] * 0 + 0.9
        s_one = C.RawAnswers(one, np.zeros(len(one), dtype=np.int64), np.full(len(one), 100), np.zeros(len(one), np.int8),
                             np.ones(len(one), bool), np.ones(len(one), bool), np.zeros(len(one), np.int64),
                             np.full(len(one), 2), np.zeros(len(one), np.int64), np.ones(len(one), bool))
        out = fit_device_confidence(answers + [{"batch": mature["batch"], "stream": s_one}])
    assert set(out["device_confidence_maps"]) == set(DEVICE_CONFIDENCE_MAPS)
    assert set(out["one_person_confidence"]) == set(ONE_PERSON_CONFIDENCE)
    for xs, ys in out["device_confidence_maps"].values():
        assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) >= 0) and 0.0 <= ys[0] and ys[-1] <= 1.0
    for overall, table in out["one_person_confidence"].values():
        assert 0.0 <= overall <= 1.0 and len(table) == 2 and np.isfinite(table).all()
