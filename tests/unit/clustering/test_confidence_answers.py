"""The confidence maps are fitted on raw answers recorded the way the service answers
(bench/_confidence.py): the same time-ordered stream the benchmark scores, and what the
service knows with each answer."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from bench import _confidence as C
from bench import worlds as W
from bench._worlds_eval import ServiceStream, hearth_stream, stream_ages, stream_steps
from bench.accuracy import fit_device_confidence, fit_household_shift
from services.clustering.domain.model import (DEVICE_CONFIDENCE_MAPS, HOUSEHOLD_EVIDENCE, MIN_SESSIONS,
                                              ONE_PERSON_CONFIDENCE, ONE_PERSON_EVIDENCE, household_evidence)


def _households(n: int = 3):
    return W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=n)


@pytest.fixture(scope="module")
def _answers_of_six():
    """``C.household_answers(h, settled=True, daily=True)`` of ``_households(6)``, computed
    once for the module (each took seconds, and nine tests read them)."""
    return [C.household_answers(h, settled=True, daily=True) for h in _households(6)]


@pytest.fixture
def answers_of(_answers_of_six):
    """``answers_of(n, modes)``: fresh copies of the first ``n`` households' answers with
    the keys ``modes``: the same arrays as ``[C.household_answers(h, ...) for h in
    _households(n)]`` (``_households(n)`` is a prefix of ``_households(6)``, and the
    "settled" and "daily" answers are computed apart from "batch" and "stream"), so each
    test fits on what it computed itself before, and may change its copy."""
    def take(n: int, modes: tuple[str, ...] = ("batch", "stream", "settled")) -> list[dict]:
        return [{k: a[k] for k in modes} for a in copy.deepcopy(_answers_of_six[:n])]
    return take


def test_the_raw_stream_answers_are_the_scored_streams_answers():
    h = _households(1)[0]
    raw = C.stream_answers(h)
    labels, P, _ = hearth_stream(h)
    # the maps change how sure an answer is, never who it is: the same person per session
    np.testing.assert_array_equal(raw.pred, labels)
    np.testing.assert_array_equal(raw.P > 0, P > 0)
    # answered at arrival: the model's age is the sessions the service had folded in
    np.testing.assert_array_equal(raw.age, stream_ages(h.n_sessions))
    # the first full fit is at MIN_SESSIONS; the stream's model is "streamed" once more
    # sessions were folded in after it than it had
    assert not raw.streamed[(raw.age >= MIN_SESSIONS) & (raw.age <= 2 * MIN_SESSIONS)].any()
    assert raw.streamed[raw.age > 2 * MIN_SESSIONS].all()
    batch = C.batch_answers(h)
    assert not batch.streamed.any()


def test_the_fit_gives_every_map_and_one_person_group_or_says_which_it_lacks(answers_of):
    answers = answers_of(3)
    try:
        out = fit_device_confidence(answers)
    except ValueError as exc:   # three households rarely have a one-person model of >= 60 streamed sessions
        assert "no answers for" in str(exc) and ("map" in str(exc) or "one-person group" in str(exc))
        # the groups it has are fitted: with one of each kind added it succeeds
        mature = answers_of(1)[0]
        s = mature["stream"]
        one = s.P[:, [0]] * 0 + 0.9
        s_one = C.RawAnswers(one, np.zeros(len(one), dtype=np.int64), np.full(len(one), 100), np.zeros(len(one), np.int8),
                             np.ones(len(one), bool), np.ones(len(one), bool), np.zeros(len(one), np.int64),
                             np.full(len(one), 2), np.zeros(len(one), np.int64), np.ones(len(one), bool),
                             s.evidence)
        out = fit_device_confidence(answers + [{"batch": mature["batch"], "stream": s_one,
                                                "settled": mature["settled"]}])
    assert set(out["device_confidence_maps"]) == set(DEVICE_CONFIDENCE_MAPS)
    assert set(out["one_person_confidence"]) == set(ONE_PERSON_CONFIDENCE)
    for xs, ys in out["device_confidence_maps"].values():
        assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) >= 0) and 0.0 <= ys[0] and ys[-1] <= 1.0
    for intercept, coef in out["one_person_confidence"].values():
        assert np.isfinite(intercept) and len(coef) == len(ONE_PERSON_EVIDENCE) and np.isfinite(coef).all()
    assert set(out["device_confidence_shift"]) == set(DEVICE_CONFIDENCE_MAPS)
    for intercept, coef in out["device_confidence_shift"].values():
        assert np.isfinite(intercept) and len(coef) == len(HOUSEHOLD_EVIDENCE) and np.isfinite(coef).all()


def test_the_household_shift_recovers_how_much_more_often_device_backed_answers_are_right():
    """Answers mapped to the same value, right more often where every person has a
    device of their own: the fit finds that shift (and none where there is none)."""
    rng = np.random.default_rng(3)
    n = 20000
    mapped = rng.uniform(0.4, 0.95, n)
    groups = rng.integers(0, 4, n)
    persons = rng.integers(2, 5, n)
    evidence = household_evidence(groups, persons)
    truth = (-0.6, (1.2, 0.0))
    p = 1.0 / (1.0 + np.exp(-(np.log(mapped / (1 - mapped)) + truth[0] + evidence @ np.asarray(truth[1]))))
    intercept, coef = fit_household_shift(mapped, evidence, (rng.random(n) < p).astype(float))
    assert abs(intercept - truth[0]) < 0.25 and abs(coef[0] - truth[1][0]) < 0.25 and abs(coef[1]) < 0.1
    intercept, coef = fit_household_shift(mapped, evidence, (rng.random(n) < mapped).astype(float))
    assert abs(intercept) < 0.25 and np.abs(coef).max() < 0.15


def test_the_recorded_one_person_evidence_is_what_the_model_answers_from():
    h = _households(1)[0]
    raw = C.batch_answers(h)
    from services.clustering.domain.model import HouseholdModel
    m = HouseholdModel(calibrated=False).fit(h.features, device_ids=h.device_id)
    np.testing.assert_allclose(raw.evidence, m.one_person_evidence(h.n_sessions))
    stream = C.stream_answers(h)
    assert stream.evidence.shape == (h.n_sessions, len(ONE_PERSON_EVIDENCE)) and np.isfinite(stream.evidence).all()
    # answered at arrival: the sessions-seen evidence grows with the stream
    np.testing.assert_allclose(stream.evidence[:, 0], np.log(stream.age))
    assert np.all(np.diff(stream.evidence[:, 1]) >= 0)
    assert ((stream.evidence[:, 3] >= 0) & (stream.evidence[:, 3] <= 1)).all()
    # what the model knew of how it came about: a stream's first fit is at MIN_SESSIONS
    assert (stream.fit_sessions[stream.age >= MIN_SESSIONS] >= MIN_SESSIONS).all()
    assert (raw.fit_sessions == h.n_sessions).all()


def test_a_streams_first_fit_is_judged_with_the_young_streams_not_the_batch_fits():
    """The fit and the scorer group one-person answers as the model does
    (model.one_person_group): a model not streamed whose last full fit is a stream's
    first (MIN_SESSIONS sessions) with the young ones, a full fit of more with "fitted"."""
    from bench.accuracy import one_person_answers
    n = 4
    a = C.RawAnswers(np.ones((n, 1)), np.zeros(n, np.int64), np.array([15, 15, 80, 80]), np.zeros(n, np.int8),
                     np.ones(n, bool), np.ones(n, bool), np.zeros(n, np.int64), np.full(n, 2), np.zeros(n, np.int64),
                     np.array([False, False, False, True]), np.zeros((n, 4)))
    a.fit_sessions = np.array([MIN_SESSIONS, 15, 80, MIN_SESSIONS])
    one, groups = one_person_answers(a)
    assert one.all() and groups.tolist() == ["young", "fitted", "fitted", "mature"]


def test_the_one_person_fit_follows_the_evidence(answers_of):
    """One-person answers that are right for models knowing one device and often wrong
    for models knowing five: the fitted confidence falls with the devices known."""
    answers = answers_of(3, ("batch", "stream"))
    rng = np.random.default_rng(0)
    extra = []
    for young, streamed, age in ((True, True, 30), (False, True, 120), (False, False, 120)):
        n = 400
        devices = rng.choice([1, 5], n)
        right = rng.random(n) < np.where(devices == 1, 0.95, 0.3)
        evidence = np.column_stack((np.full(n, np.log(age)), devices.astype(float), np.zeros(n), np.zeros(n)))
        one = C.RawAnswers(np.ones((n, 1)), np.zeros(n, np.int64), np.full(n, age), np.zeros(n, np.int8),
                           np.ones(n, bool), right, np.zeros(n, np.int64), devices, np.zeros(n, np.int64),
                           np.full(n, streamed), evidence)
        extra.append({"batch": one, "stream": one})
    out = fit_device_confidence(answers + extra)
    for intercept, coef in out["one_person_confidence"].values():
        assert coef[ONE_PERSON_EVIDENCE.index("devices")] < -0.3


def test_the_settled_stream_answers_every_session_with_the_final_model():
    """What GET /v1/household serves once a stream has settled: every session, earliest
    included, answered by the model after the last arrival — not the young model that
    answered it at arrival."""
    h = _households(1)[0]
    labels, P, events, (settled, settled_P) = hearth_stream(h, settled=True)
    again = hearth_stream(h)
    np.testing.assert_array_equal(labels, again[0])   # settled= changes nothing at arrival
    assert settled.shape == (h.n_sessions,) and settled_P.shape[0] == h.n_sessions
    # (a one-person model's one column is its calibrated confidence, not 1.0: rows may sum below 1)
    assert np.all((settled_P >= 0) & (settled_P <= 1)) and np.all(settled_P.sum(axis=1) <= 1 + 1e-9)
    np.testing.assert_array_equal(settled, settled_P.argmax(axis=1))
    *_, final, _, _ = list(stream_steps(h))[-1]
    assert settled_P.shape[1] == final.n_persons
    # the final model's answers, every session included (the service re-records them all)
    np.testing.assert_array_equal(settled, final.assign_batch(h.features, device_ids=h.device_id).person_index)


def test_the_settled_answers_are_the_last_model_on_the_sessions_it_had_included(answers_of):
    h = _households(1)[0]
    raw = answers_of(1)[0]   # C.household_answers(h, settled=True)
    ans = raw["settled"]
    assert set(np.unique(ans.checkpoint)) == set(C.SETTLED_AT)
    end = ans.checkpoint == 1.0
    _, _, _, (settled, _) = hearth_stream(h, settled=True)
    np.testing.assert_array_equal(ans.pred[end], settled)   # the same persons as the scored view
    stream = ServiceStream(h)
    for *_, in stream.arrivals():
        pass
    # the keeper's last save folded in a micro-batch: the sessions before it were included
    assert 0 < stream.included < h.n_sessions
    np.testing.assert_array_equal(ans.included[end], np.arange(h.n_sessions) < stream.included)
    assert (ans.age[end] == stream.envelope.model.n_sessions).all()
    # earlier in the stream: a younger model answering the sessions it had seen so far
    half = ans.checkpoint == 0.5
    assert 0 < half.sum() < h.n_sessions and (ans.age[half] == stream_ages(h.n_sessions)[half.sum() - 1]).all()
    assert 0 < ans.included[half].sum() < ans.age[half][0]


def _one_person_answers(n: int = 200) -> list[dict]:
    """Synthetic one-person answers of each group (few real households have them all)."""
    rng = np.random.default_rng(1)
    extra = []
    for streamed, age in ((True, 30), (True, 120), (False, 120)):
        devices = rng.choice([1, 5], n)
        evidence = np.column_stack((np.full(n, np.log(age)), devices.astype(float), np.zeros(n), np.zeros(n)))
        one = C.RawAnswers(np.ones((n, 1)), np.zeros(n, np.int64), np.full(n, age), np.zeros(n, np.int8),
                           np.ones(n, bool), rng.random(n) < 0.7, np.zeros(n, np.int64), devices,
                           np.zeros(n, np.int64), np.full(n, streamed), evidence)
        extra.append({"batch": one, "stream": one})
    return extra


def test_settled_answers_fit_only_the_settled_map(answers_of):
    """The batch and at-arrival maps and one-person groups are the same with or without
    the settled answers (they learn only the "settled" map); without them there is none."""
    answers = answers_of(6)
    with_settled = fit_device_confidence(answers + _one_person_answers())
    without = fit_device_confidence([{k: a[k] for k in ("batch", "stream")} for a in answers] + _one_person_answers())
    assert set(with_settled["device_confidence_maps"]) == set(DEVICE_CONFIDENCE_MAPS)
    assert set(without["device_confidence_maps"]) == set(DEVICE_CONFIDENCE_MAPS) - {"settled"}
    for name, value in without["device_confidence_maps"].items():
        assert with_settled["device_confidence_maps"][name] == value
    assert with_settled["one_person_confidence"] == without["one_person_confidence"]
    assert with_settled["one_person_log_sessions"] == without["one_person_log_sessions"]


def test_a_smooth_map_recovers_a_known_calibration_and_never_falls():
    """Answers right with probability expit(0.6 logit(x) - 0.3) (over-confident raw
    posteriors): the logistic and beta maps find that curve, the isotonic map follows it
    in steps; every form is non-decreasing and an unknown form is refused."""
    from bench.accuracy import smooth_map
    rng = np.random.default_rng(5)
    x = rng.uniform(0.35, 0.999, 40000)
    truth = 1.0 / (1.0 + np.exp(-(0.6 * np.log(x / (1 - x)) - 0.3)))
    y = (rng.random(x.size) < truth).astype(float)
    grid = np.linspace(0.4, 0.99, 12)
    want = 1.0 / (1.0 + np.exp(-(0.6 * np.log(grid / (1 - grid)) - 0.3)))
    for form, tol in (("logistic", 0.02), ("beta", 0.03), ("isotonic", 0.06)):
        got = smooth_map(x, y, grid, form)
        assert np.all(np.diff(got) >= 0), form
        assert np.abs(got - want).max() < tol, (form, np.round(got - want, 3))
    # weights: answers weighted twice count twice (the same fit as repeating them)
    w = rng.choice([1.0, 2.0], x.size)
    doubled = np.concatenate([np.arange(x.size), np.flatnonzero(w == 2.0)])
    np.testing.assert_allclose(smooth_map(x, y, grid, "logistic", w), smooth_map(x[doubled], y[doubled], grid, "logistic"),
                               atol=1e-4)
    import pytest
    with pytest.raises(ValueError, match="map form"):
        smooth_map(x, y, grid, "spline")


def test_held_out_confidence_answers_as_the_service_would():
    """held_out_confidence (what the held-out and fresh-world scores read): a
    multi-person answer through its map (by age, streamed, settled) moved by its shift and
    floored at 1 / persons; a one-person answer from its group's evidence; the rest raw."""
    from bench.accuracy import held_out_confidence
    n = 6
    P = np.array([[0.7, 0.3], [0.9, 0.1], [0.5, 0.5], [1.0, 0.0], [0.6, 0.4], [0.8, 0.2]])
    age = np.array([30, 100, 100, 100, 100, 100])
    kind = np.array([0, 0, 0, 0, 2, 0], np.int8)
    a = C.RawAnswers(P, P.argmax(axis=1), age, kind, np.array([1, 1, 1, 1, 1, 0], bool), np.ones(n, bool),
                     np.zeros(n, np.int64), np.full(n, 2), np.full(n, 2), np.ones(n, bool),
                     np.column_stack((np.log(age), np.full(n, 2.0), np.zeros(n), np.zeros(n))))
    a.included = np.array([0, 1, 0, 1, 0, 0], bool)
    flat = ([0.0, 1.0], [0.2, 0.2])    # every answer through it says 0.2 before the floor
    fit = {"device_confidence_maps": {"young": ([0.0, 1.0], [0.0, 1.0]), "streamed": ([0.0, 1.0], [0.0, 1.0]),
                                      "settled": flat, "fitted": flat},
           "device_confidence_shift": {n_: (0.0, (0.0, 0.0)) for n_ in ("young", "streamed", "settled", "fitted")},
           "one_person_confidence": {g: (0.0, (0.0, 0.0, 0.0, 0.0)) for g in ("fitted", "young", "mature")},
           "one_person_log_sessions": (1.0, 5.0), "new_device_confidence": {"one_person": 0.2, "several": 0.1},
           "cold_start_confidence": 0.6}
    fit["device_confidence_shift"]["streamed"] = (np.log(3.0), (0.0, 0.0))   # odds x 3
    fit["one_person_confidence"]["mature"] = (np.log(4.0), (0.0, 0.0, 0.0, 0.0))   # 0.8
    conf, one = held_out_confidence(fit, a, settled_mode=False)
    np.testing.assert_allclose(conf[0], 0.7)                        # young map: identity
    np.testing.assert_allclose(conf[1], 0.9 * 3 / (0.9 * 3 + 0.1))  # streamed map, shifted
    np.testing.assert_allclose(conf[2], 0.75)                       # 0.5 shifted, above the floor
    np.testing.assert_allclose(conf[3], 0.8)                        # one live person: the mature group
    assert one.tolist() == [False, False, False, True, False, False]
    np.testing.assert_allclose(conf[4:], [0.6, 0.8])                # k-means and no device: raw
    settled, _ = held_out_confidence(fit, a, settled_mode=True)
    np.testing.assert_allclose(settled[1], 0.5)                     # included: settled map 0.2, floored at 1/2
    np.testing.assert_allclose(settled[[0, 2, 3]], conf[[0, 2, 3]])  # young / not included / one-person: as before
    # sessions on a device the model did not know: the new-device values (floored at 1 / persons)
    a.known = np.array([1, 0, 1, 0, 1, 1], bool)
    unknown, one = held_out_confidence(fit, a, settled_mode=False)
    np.testing.assert_allclose(unknown[[1, 3]], [0.5, 0.2])
    np.testing.assert_allclose(unknown[[0, 2, 4, 5]], conf[[0, 2, 4, 5]])
    assert not one[3]
    # a cold start's answer among several persons (with device evidence): the cold-start
    # figure, floored at 1 / persons; without device evidence raw, as the model leaves it
    a.known, a.kind = None, np.array([3, 0, 0, 0, 2, 3], np.int8)
    cold, _ = held_out_confidence(fit, a, settled_mode=False)
    np.testing.assert_allclose(cold[[0, 5]], [0.6, 0.8])
    fit["cold_start_confidence"] = 0.3
    np.testing.assert_allclose(held_out_confidence(fit, a, settled_mode=False)[0][0], 0.5)


def test_world_indices_reads_ranges_and_numbers_and_refuses_the_rest():
    import pytest

    from bench.accuracy import world_indices
    assert world_indices("0:4,12:14") == (0, 1, 2, 3, 12, 13)
    assert world_indices("7") == (7,) and world_indices("2:4, 9") == (2, 3, 9)
    for bad in ("", "a:b", "0:", "-1:3", "0:4,3"):
        with pytest.raises(ValueError, match="world indices"):
            world_indices(bad)


def test_chosen_worlds_are_the_same_households_as_a_prefix_run():
    """generate(world_indices=...) gives world w's households whichever worlds are asked for."""
    some = W.generate(W.TUNING, families=("bingers",), households_per_world=2, world_indices=(2, 0))
    prefix = W.generate(W.TUNING, families=("bingers",), worlds_per_family=3, households_per_world=2)
    by_id = {h.household_id: h for h in prefix}
    assert [h.world_id.rsplit("-w", 1)[1] for h in some] == ["2", "2", "0", "0"]
    for h in some:
        np.testing.assert_array_equal(h.features, by_id[h.household_id].features)


def test_household_weights_reach_only_the_maps_they_are_meant_for(answers_of):
    """Weights per household (e.g. each household counting the same) move the maps named
    in ``weighted`` and leave the others as the unweighted fit has them."""
    answers = answers_of(6) + _one_person_answers()
    plain = fit_device_confidence(answers)
    weights = [1.0 / a["batch"].P.shape[0] for a in answers]
    settled_only = fit_device_confidence(answers, weights=weights, weighted=("settled",))
    everywhere = fit_device_confidence(answers, weights=weights)
    for name in DEVICE_CONFIDENCE_MAPS:
        if name != "settled":
            assert settled_only["device_confidence_maps"][name] == plain["device_confidence_maps"][name]
    assert settled_only["one_person_confidence"] == plain["one_person_confidence"]
    assert settled_only["device_confidence_maps"]["settled"] == everywhere["device_confidence_maps"]["settled"]
    assert everywhere["device_confidence_maps"]["settled"] != plain["device_confidence_maps"]["settled"]


def test_daily_arrivals_end_at_each_midnight_after_a_session_started():
    """A client posting a UTC day per request: after each day, the sessions started by
    its end (bench.api_accuracy.daily_requests with midnight cuts)."""
    from bench._worlds_eval import DAY_S, daily_ends
    day0 = 20_000 * DAY_S
    starts = np.array([day0 + 3600, day0 + 7200, day0 + DAY_S + 10, day0 + 3 * DAY_S + 5, day0 + 3 * DAY_S + 6])
    assert daily_ends(starts) == [2, 3, 5]
    h = _households(1)[0]
    ends = daily_ends(h.start_ts)
    assert ends[-1] == h.n_sessions and np.all(np.diff(ends) > 0)
    assert len(ends) == np.unique(np.floor(h.start_ts / DAY_S)).size


def test_daily_answers_are_the_streams_on_the_daily_arrivals_and_say_what_was_folded_in(answers_of):
    """The "daily" answers are ServiceStream's on the daily arrivals (same person per
    session), and ``included`` marks the arrivals whose refresh included them (a full
    fit's: the first one, a refit), as the keeper records them."""
    from bench._worlds_eval import daily_ends
    h = _households(1)[0]
    daily = answers_of(1, ("daily",))[0]["daily"]   # C.household_answers(h, daily=True)["daily"]
    ends = daily_ends(h.start_ts)
    labels, included = [], []
    s = ServiceStream(h)
    for a, b, _m, out, _ in s.arrivals(ends=ends):
        labels += [out.person_ids[int(k)] for k in out.person_index]
        included += (np.arange(a, b) < s.included_now).tolist()
    names = sorted(set(labels))
    np.testing.assert_array_equal(daily.included, included)
    assert daily.included[:ends[0]].all()           # the household's first refresh fits what it has
    # the same partition of the sessions into persons (columns are ids sorted either way)
    np.testing.assert_array_equal(daily.pred, [names.index(x) for x in labels])
    # answered at arrival by the model of the day's refresh: fewer refreshes than sessions
    assert len(np.unique(daily.age)) <= len(ends) < h.n_sessions


def test_the_fit_reads_the_daily_answers_in_the_at_arrival_maps_only(answers_of):
    """Daily answers add to the at-arrival maps' and one-person groups' answers; the
    "settled" map keeps the settled answers alone."""
    answers = answers_of(6, ("batch", "stream", "settled", "daily")) + _one_person_answers()
    without = fit_device_confidence([{k: v for k, v in a.items() if k != "daily"} for a in answers])
    both = fit_device_confidence(answers)
    assert both["answers"]["young"] > without["answers"]["young"]
    assert both["answers"]["settled"] == without["answers"]["settled"]
    assert both["answers"]["one_person_young"] >= without["answers"]["one_person_young"]
    assert both["device_confidence_maps"]["young"] != without["device_confidence_maps"]["young"]


def test_held_out_scores_fit_the_extra_households_in_every_fold_and_score_only_the_held_out(answers_of):
    """score_held_out's ``extra`` (the real viewers' households beside the synthetic ones):
    fitted on in every fold with their weight, never scored."""
    from bench.accuracy import one_person_answers, score_held_out
    answers = answers_of(6)
    extra = _one_person_answers()
    folds = ["a", "a", "a", "b", "b", "b"]
    light = score_held_out(folds, answers, "t", ["f"] * 6, extra=(extra, [1.0] * len(extra)))
    heavy = score_held_out(folds, answers, "t", ["f"] * 6, extra=(extra, [50.0] * len(extra)))
    for mode in ("batch", "stream"):
        held_out_ones = sum(int(one_person_answers(a[mode])[0].sum()) for a in answers)
        assert light[mode]["one_person_answers"] == heavy[mode]["one_person_answers"] == held_out_ones
    assert set(light) == {"batch", "stream", "settled"}
    # the weight reaches the fits: the extra one-person answers (right 0.7) pull harder
    assert any(light[m]["ece"] != heavy[m]["ece"] for m in light)


def test_the_fit_learns_how_often_answers_about_unknown_devices_are_right_and_keeps_them_out_of_the_maps(answers_of):
    """Answers about a session on a device the model did not know go to
    new_device_confidence (a smoothed share right, per one- or several-person answer,
    weighted by household) and nowhere else."""
    answers = answers_of(6) + _one_person_answers()
    n = len(answers)

    def copy(ans):
        return {mode: C.RawAnswers(**{f: getattr(a, f) for f in a.__dataclass_fields__}) for mode, a in ans.items()}
    def mapped(a):
        known = a.known if a.known is not None else np.zeros(a.P.shape[0], bool)
        return np.flatnonzero(known & a.device & (a.kind == C.MIXTURE) & ((a.P > 0).sum(axis=1) > 1))
    chosen = max(answers, key=lambda ans: mapped(ans["stream"]).size)
    same, extra = copy(chosen), copy(chosen)
    s = extra["stream"]
    several = mapped(s)[:20]
    assert several.size == 20
    s.known = s.known.copy()
    s.known[several] = False
    s.correct = s.correct.copy()
    s.correct[several[:5]] = True
    s.correct[several[5:]] = False
    base = fit_device_confidence(answers + [same], weights=[1.0] * n + [2.0])
    out = fit_device_confidence(answers + [extra], weights=[1.0] * n + [2.0])
    assert out["answers"]["new_device_several"] == base["answers"]["new_device_several"] + 20
    assert out["answers"]["new_device_one_person"] == base["answers"]["new_device_one_person"]
    assert out["new_device_confidence"]["one_person"] == base["new_device_confidence"]["one_person"]
    if base["answers"]["new_device_several"] == 0:   # the smoothed, weighted share of the 20
        np.testing.assert_allclose(out["new_device_confidence"]["several"], (5 * 2 + 1) / (20 * 2 + 2), atol=1e-4)
    # the maps no longer see them
    maps = ("young", "streamed", "fitted")
    assert sum(out["answers"][m] for m in maps) == sum(base["answers"][m] for m in maps) - 20


def test_the_cold_start_figure_is_how_often_the_streams_answers_among_several_persons_were_right(monkeypatch):
    """model.COLD_START_CONFIDENCE's fit: the TUNING streams' cold starts answer from
    their world's population prior (as the service's do), and the figure is the share
    right of the answers that named one of several persons, every mode but the settled."""
    import bench._worlds_eval as E
    from bench.accuracy import cold_multi_answers, fit_cold_start_confidence
    monkeypatch.setattr(E, "WORLD_POPULATION", 20)
    hs = _households(3)
    priors = E.world_priors(hs, _households)
    assert list(priors) == [hs[0].world_id] and priors[hs[0].world_id] is not None
    answers = [C.household_answers(h, settled=True, prior=priors[h.world_id]) for h in hs]
    out = fit_cold_start_confidence(answers, [h.family for h in hs], [1.0] * len(hs))
    right = n = 0
    for ans in answers:
        cold = ans["stream"].age < MIN_SESSIONS
        # the stream's first sessions are the prior's cold start: among several persons, with device ids
        assert (ans["stream"].kind[cold] == C.COLD_MULTI).any()
        for mode in ("batch", "stream"):
            rows = cold_multi_answers(ans[mode])
            right, n = right + ans[mode].correct[rows].sum(), n + rows.sum()
    assert out["answers"] == n > 0
    assert out["cold_start_confidence"] == round((right + 1.0) / (n + 2.0), 4)
    assert set(out["leave_one_family_out"]) == {"mobile_first"}
