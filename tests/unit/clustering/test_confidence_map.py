"""The confidence map says how sure an answer is, never who it is."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.clustering.domain.model import calibrate_confidence


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=6), min_size=1, max_size=20),
       st.booleans(), st.booleans(), st.booleans())
def test_the_map_keeps_the_answer_and_a_distribution(rows, device, young, streamed):
    width = max(len(r) for r in rows)
    P = np.array([r + [0.0] * (width - len(r)) for r in rows])
    P /= P.sum(axis=1, keepdims=True)
    P[np.arange(len(P)), P.argmax(axis=1)] += 1e-6   # a strict top (ties are the caller's)
    P /= P.sum(axis=1, keepdims=True)
    out = calibrate_confidence(P, (P > 0).sum(axis=1), device=device, young=young, streamed=streamed)
    np.testing.assert_array_equal(out.argmax(axis=1), P.argmax(axis=1))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)
    assert not out[P == 0].any()


def test_a_low_map_value_with_three_persons_does_not_hand_the_answer_to_the_runner_up():
    # top 0.40, runner-up 0.35: the map may say 0.34 (>= 1/3), and rescaling the rest
    # would have made the runner-up 0.385 > 0.34 — the answer changed person.
    P = np.array([[0.40, 0.35, 0.25]])
    out = calibrate_confidence(P, np.array([3]), device=True, young=True)
    assert out.argmax() == 0 and out[0, 0] > out[0, 1]


def _two_people_with_phones_and_a_tv(seed: int = 5):
    """Two people, each on their own phone, who also both watch on the shared TV."""
    from tests.unit.clustering.test_identity_signals import household, persona_sessions
    rng = np.random.default_rng(seed)
    parts = [(*persona_sessions(rng, 60, 60, 8, "mobile", {"news": 1}), "phone-a", 0),
             (*persona_sessions(rng, 60, 60, 21, "mobile", {"drama": 1}), "phone-b", 1),
             (*persona_sessions(rng, 30, 60, 8, "tv", {"news": 1}), "tv", 0),
             (*persona_sessions(rng, 30, 60, 21, "tv", {"drama": 1}), "tv", 1)]
    _, X, dev, _ = household(parts)
    return X, dev


def _constant_maps(monkeypatch) -> dict[str, float]:
    """Every device map replaced by a flat one with its own value: an answer's confidence
    then says which map it went through."""
    from services.clustering.domain import model as M
    values = {name: 0.51 + 0.04 * i for i, name in enumerate(M.DEVICE_CONFIDENCE_MAPS)}
    monkeypatch.setattr(M, "DEVICE_CONFIDENCE_MAPS",
                        {name: ([0.0, 1.0], [v, v]) for name, v in values.items()})
    # no household shift either: the value is the map's own
    monkeypatch.setattr(M, "DEVICE_CONFIDENCE_SHIFT",
                        {name: (0.0, (0.0,) * len(M.HOUSEHOLD_EVIDENCE)) for name in M.DEVICE_CONFIDENCE_MAPS})
    return values


def test_a_fit_on_every_session_and_a_stream_answer_through_their_own_maps(monkeypatch):
    """Which map answers is what the model knows: its age, whether it has folded sessions
    in since its last full fit (streamed)."""
    from services.clustering.domain.model import HouseholdModel
    values = _constant_maps(monkeypatch)
    X, dev = _two_people_with_phones_and_a_tv()
    fitted = HouseholdModel().fit(X, device_ids=dev)
    assert fitted.n_persons == 2 and fitted.folded_in == 0
    np.testing.assert_allclose(fitted.assign_batch(X, device_ids=dev, included=True).confidence, values["fitted"])
    # a session the fit did not include is answered at arrival (session 12)
    np.testing.assert_allclose(fitted.assign_batch(X, device_ids=dev).confidence, values["streamed"])

    # a household imported at once and then followed: a few sessions folded into the
    # fit do not make it a stream's model (the sessions it includes keep the fitted
    # map); once the stream outweighs the import they do
    streamed = HouseholdModel().fit(X[:80], device_ids=dev[:80])
    streamed.update(X[80:90], device_ids=dev[80:90])
    assert streamed.folded_in == 10 and not streamed.streamed
    mixed = streamed.assign_batch(X, device_ids=dev, included=np.arange(X.shape[0]) < 90).confidence
    np.testing.assert_allclose(mixed[:90], values["fitted"])
    np.testing.assert_allclose(mixed[90:], values["streamed"])
    for a in range(90, X.shape[0], 5):
        streamed.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert streamed.folded_in == X.shape[0] - 80 > 80 and streamed.streamed and streamed.n_persons == 2
    np.testing.assert_allclose(streamed.assign_batch(X, device_ids=dev).confidence, values["streamed"])

    young = HouseholdModel().fit(X[:40], device_ids=dev[:40])
    if young.n_persons > 1:
        np.testing.assert_allclose(young.assign_batch(X[:40], device_ids=dev[:40]).confidence, values["young"])
    # a full refit makes it a fitted model again
    streamed.fit(X, device_ids=dev)
    assert streamed.folded_in == 0 and not streamed.streamed
    np.testing.assert_allclose(streamed.assign_batch(X, device_ids=dev, included=True).confidence, values["fitted"])


def test_how_the_model_came_about_survives_its_bytes():
    from services.clustering.domain.model import HouseholdModel
    X, dev = _two_people_with_phones_and_a_tv()
    m = HouseholdModel().fit(X[:100], device_ids=dev[:100]).update(X[100:110], device_ids=dev[100:110])
    back = HouseholdModel.from_bytes(m.to_bytes())
    assert (back.fit_sessions, back.folded_in) == (100, 10)
    np.testing.assert_allclose(back.assign_batch(X, device_ids=dev).probabilities,
                               m.assign_batch(X, device_ids=dev).probabilities)


def test_a_model_stored_before_it_knew_how_it_came_about_answers_as_streamed(monkeypatch):
    """Bytes without fit_sessions (older format): unknown history, the less sure maps."""
    from services.clustering.domain.model import HouseholdModel
    from tests.helpers.model_blobs import without_meta_key
    values = _constant_maps(monkeypatch)
    X, dev = _two_people_with_phones_and_a_tv()
    old = HouseholdModel.from_bytes(without_meta_key(HouseholdModel().fit(X, device_ids=dev).to_bytes(), "fit_sessions"))
    assert old.folded_in == X.shape[0] and old.streamed
    np.testing.assert_allclose(old.assign_batch(X, device_ids=dev).confidence, values["streamed"])


def test_a_one_person_answer_of_a_fit_on_every_session_has_its_own_figure():
    """A full fit of the household (more sessions than a stream's first fit) is "fitted"
    at any age; a stream's first fit, at MIN_SESSIONS, answers as a young stream does —
    pooled with batch fits, its answers (right far less often, and with the devices
    pointing the other way) set the batch fits' figure."""
    from services.clustering.domain.model import (MIN_SESSIONS, ONE_PERSON_CONFIDENCE, ONE_PERSON_MAX_CONFIDENCE,
                                                  one_person_confidence, one_person_evidence, one_person_group)
    assert one_person_group(young=True, streamed=False) == one_person_group(young=False, streamed=False) == "fitted"
    assert one_person_group(young=True, streamed=False, fit_sessions=MIN_SESSIONS + 1) == "fitted"
    assert one_person_group(young=True, streamed=False, fit_sessions=MIN_SESSIONS) == "young"
    assert one_person_group(young=True, streamed=True, fit_sessions=MIN_SESSIONS) == "young"
    assert one_person_group(young=False, streamed=True, fit_sessions=MIN_SESSIONS) == "mature"
    ev = one_person_evidence(60, 2, personal_devices=1, personal_share=0.5)   # within the fitted range
    assert ev.shape == (1, 4)
    for group, (intercept, coef) in ONE_PERSON_CONFIDENCE.items():
        young, streamed = {"fitted": (False, False), "young": (True, True), "mature": (False, True)}[group]
        expected = min(1.0 / (1.0 + np.exp(-(intercept + ev[0] @ np.asarray(coef)))), ONE_PERSON_MAX_CONFIDENCE)
        np.testing.assert_allclose(one_person_confidence(ev, young, streamed), [expected])


def test_one_person_evidence_outside_what_the_fit_saw_is_judged_at_its_edge():
    from services.clustering.domain.model import (ONE_PERSON_LOG_SESSIONS, ONE_PERSON_MAX_DEVICES,
                                                  one_person_confidence, one_person_evidence)
    ev = one_person_evidence(10**7, 40, n=2, personal_devices=30, personal_share=0.5)
    assert ev.shape == (2, 4)
    np.testing.assert_allclose(ev[:, 0], np.log(10**7))
    np.testing.assert_allclose(ev[:, 1:3], ONE_PERSON_MAX_DEVICES)
    at_edge = one_person_evidence(int(round(np.exp(ONE_PERSON_LOG_SESSIONS[1]))), 40, n=2, personal_devices=30,
                                  personal_share=0.5)
    few = one_person_evidence(1, 1)
    low_edge = one_person_evidence(int(round(np.exp(ONE_PERSON_LOG_SESSIONS[0]))), 1)
    for young, streamed in ((False, False), (True, True), (False, True)):
        np.testing.assert_allclose(one_person_confidence(ev, young, streamed),
                                   one_person_confidence(at_edge, young, streamed), rtol=1e-3)
        np.testing.assert_allclose(one_person_confidence(few, young, streamed),
                                   one_person_confidence(low_edge, young, streamed), rtol=1e-3)


def test_a_one_person_answer_is_never_sure_and_thin_evidence_is_far_from_it(monkeypatch):
    """Whatever the fit says, a one-person answer stays below ONE_PERSON_MAX_CONFIDENCE
    (a fit's slopes extrapolate toward 1.0); with the committed fit, a young model that
    has seen a handful of sessions is far from sure, and one whose recent sessions are all
    on a personal device is surer than one whose are all on a shared TV, in every group
    (on TUNING a real single's sessions sit on their own devices)."""
    from services.clustering.domain import model as M
    thin = M.one_person_evidence(3, 1)
    assert (M.one_person_confidence(thin, young=True, streamed=True) < 0.85).all()
    for young, streamed in ((False, False), (True, True), (False, True)):
        on_tv = M.one_person_evidence(100, 2, personal_devices=0, personal_share=0.0)
        on_phone = M.one_person_evidence(100, 2, personal_devices=0, personal_share=1.0)
        assert (M.one_person_confidence(on_phone, young, streamed) > M.one_person_confidence(on_tv, young, streamed)).all()
    monkeypatch.setitem(M.ONE_PERSON_CONFIDENCE, "fitted", (40.0, (0.0, 0.0, 0.0, 0.0)))
    np.testing.assert_allclose(M.one_person_confidence(thin, young=False, streamed=False), M.ONE_PERSON_MAX_CONFIDENCE)


def test_one_person_evidence_reads_the_personal_devices_of_the_recent_sessions():
    """A model's one-person evidence: its sessions (log), devices, the personal devices
    of its recent sessions (a phone with MIN_DEVICE_SESSIONS sessions or more; a tablet
    with fewer is not yet one) and their share on personal device types; before the first
    fit, from the cold-start sessions."""
    from services.clustering.domain import features as F
    from services.clustering.domain.model import MIN_SESSIONS, HouseholdModel
    from services.clustering.domain.persons import MIN_DEVICE_SESSIONS
    rng = np.random.default_rng(4)
    kinds = np.array(["tv"] * 26 + ["mobile"] * 12 + ["tablet"] * (MIN_DEVICE_SESSIONS - 3))
    n = kinds.size
    X = np.zeros((n, F.FEATURE_DIM))
    hour = rng.uniform(18, 23, n)
    X[:, 0], X[:, 1] = np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)
    X[:, 2], X[:, 3] = 0.0, 1.0
    X[np.arange(n), F.DEVICE.start + np.array([F.DEVICE_TYPES.index(k) for k in kinds])] = 1.0
    X[:, F.GENRE.start] = 1.0
    X[:, F.LOG_MINUTES] = np.log1p(rng.uniform(30, 90, n))
    devices = np.array([{"tv": "tv1", "mobile": "phone1", "tablet": "tab1"}[k] for k in kinds])
    m = HouseholdModel().fit(X, device_ids=devices)
    ev = m.one_person_evidence(2)
    np.testing.assert_allclose(ev, [[np.log(n), 3.0, 1.0, (n - 26) / n]] * 2)
    cold = HouseholdModel()
    cold.update(X[-(MIN_SESSIONS - 4):], device_ids=devices[-(MIN_SESSIONS - 4):])
    assert cold.active_variant == "cold_start"
    ev = cold.one_person_evidence(1)
    # the cold start's sessions: a phone with 4 sessions is not yet a person's, every one is personal
    np.testing.assert_allclose(ev, [[np.log(MIN_SESSIONS - 4), 2.0, 0.0, 1.0]])


def test_a_streamed_model_answers_the_sessions_it_includes_through_the_settled_map(monkeypatch):
    """A streamed model's in-sample answers (sessions it already includes, what the
    keeper re-records) go through the "settled" map; new arrivals keep the streamed map;
    a model fitted on every session keeps its own map whatever ``included`` says."""
    from services.clustering.domain.model import HouseholdModel, device_map_name
    values = _constant_maps(monkeypatch)
    X, dev = _two_people_with_phones_and_a_tv()
    m = HouseholdModel().fit(X[:40], device_ids=dev[:40])
    for a in range(40, X.shape[0], 5):
        m.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert m.streamed and m.n_persons == 2
    included = np.arange(X.shape[0]) < X.shape[0] - 5
    out = m.assign_batch(X, device_ids=dev, included=included)
    np.testing.assert_allclose(out.confidence[included], values["settled"])
    np.testing.assert_allclose(out.confidence[~included], values["streamed"])
    np.testing.assert_allclose(m.assign_batch(X, device_ids=dev).confidence, values["streamed"])
    assert device_map_name(young=True, streamed=True, settled=True) == "young"
    m.fit(X, device_ids=dev)
    np.testing.assert_allclose(m.assign_batch(X, device_ids=dev, included=True).confidence, values["fitted"])



def test_a_household_whose_persons_have_their_own_devices_moves_the_maps_answer(monkeypatch):
    """The maps are pooled over households; the shift moves a map's value by what the
    model knows of the household when it answers: the share of its persons backed by a
    personal-device group and the persons it knows (every kind of answer, settled too)."""
    from scipy.special import expit, logit

    from services.clustering.domain import model as M
    values = _constant_maps(monkeypatch)
    shift = {"fitted": (0.2, (1.0, -0.1)), "streamed": (-0.3, (0.5, 0.0)), "settled": (0.3, (-0.5, 0.2)),
             "young": (0.0, (0.0, 0.0))}
    monkeypatch.setattr(M, "DEVICE_CONFIDENCE_SHIFT", shift)

    def expected(name: str, share: float, persons: int) -> float:
        intercept, (per_share, per_person) = shift[name]
        return float(expit(logit(values[name]) + intercept + per_share * share + per_person * persons))

    X, dev = _two_people_with_phones_and_a_tv()
    m = M.HouseholdModel().fit(X, device_ids=dev)
    assert m.n_persons == 2 and m.device_group_count == 2 and not m.streamed
    np.testing.assert_allclose(m.assign_batch(X, device_ids=dev, included=True).confidence,
                               expected("fitted", 1.0, 2), rtol=1e-6)
    m.device_group_count = 1    # one person of two backed by a phone
    np.testing.assert_allclose(m.assign_batch(X, device_ids=dev, included=True).confidence,
                               expected("fitted", 0.5, 2), rtol=1e-6)
    # at arrival (sessions the fit did not include): the at-arrival map, shifted as its own
    np.testing.assert_allclose(m.assign_batch(X, device_ids=dev).confidence, expected("streamed", 0.5, 2), rtol=1e-6)

    s = M.HouseholdModel().fit(X[:40], device_ids=dev[:40])
    for a in range(40, X.shape[0], 5):
        s.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert s.streamed and s.n_persons == 2
    share = min(s.device_group_count / 2, 1.0)
    included = np.arange(X.shape[0]) < X.shape[0] - 5
    out = s.assign_batch(X, device_ids=dev, included=included)
    np.testing.assert_allclose(out.confidence[included], expected("settled", share, 2), rtol=1e-6)
    np.testing.assert_allclose(out.confidence[~included], expected("streamed", share, 2), rtol=1e-6)


def test_household_evidence_is_a_share_of_persons_and_the_persons_capped():
    from services.clustering.domain.model import HOUSEHOLD_MAX_PERSONS, household_evidence
    ev = household_evidence(3, np.array([2, 4, 1, 0, 40]))
    np.testing.assert_allclose(ev[:, 0], [1.0, 0.75, 1.0, 1.0, 3 / 40])
    np.testing.assert_allclose(ev[:, 1], [2, 4, 1, 1, HOUSEHOLD_MAX_PERSONS])
    # the shift the model applies is the fit's regression on that evidence, written out
    from services.clustering.domain.model import household_shift
    shift = (-0.4, (1.3, 0.2))
    np.testing.assert_allclose(household_shift(3, np.array([2, 4, 1, 0, 40]), shift),
                               shift[0] + ev @ np.asarray(shift[1]))


def test_the_household_shift_never_changes_who_and_bare_vectors_keep_their_map():
    P = np.array([[0.40, 0.35, 0.25], [0.9, 0.1, 0.0], [0.6, 0.4, 0.0]])
    live = np.array([3, 2, 2])
    for groups in (0, 1, 2, 5):
        out = calibrate_confidence(P, live, device=True, streamed=True, device_groups=groups,
                                   settled=np.array([True, False, True]))
        np.testing.assert_array_equal(out.argmax(axis=1), P.argmax(axis=1))
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)
    # the bare-vector map (no device ids) knows nothing of device groups
    np.testing.assert_array_equal(calibrate_confidence(P, live, device_groups=2), calibrate_confidence(P, live))


def test_every_device_map_has_its_household_shift():
    """A map added without its shift would fail every answer through it (KeyError):
    --calibrate-confidence --device-maps-only fits one per map."""
    from services.clustering.domain.model import DEVICE_CONFIDENCE_MAPS, DEVICE_CONFIDENCE_SHIFT, HOUSEHOLD_EVIDENCE
    assert set(DEVICE_CONFIDENCE_SHIFT) == set(DEVICE_CONFIDENCE_MAPS)
    for intercept, coef in DEVICE_CONFIDENCE_SHIFT.values():
        assert np.isfinite(intercept) and len(coef) == len(HOUSEHOLD_EVIDENCE) and np.isfinite(coef).all()


def test_labels_that_name_the_fits_persons_leave_its_answers_as_they_were():
    """Feedback labels that name the device-first fit's persons only rename them: every
    session's probabilities are the unlabelled fit's (the same distribution over persons,
    confidence maps included: the fit's personal-device groups still back its persons)."""
    from services.clustering.domain.model import HouseholdModel
    X, dev = _two_people_with_phones_and_a_tv()
    free = HouseholdModel().fit(X, device_ids=dev)
    groups = free.device_group_count
    assert free.n_persons == 2 and groups == 2
    first = free.assign_batch(X, device_ids=dev).person_index
    labels = [f"m{p}" if i % 20 == 0 else None for i, p in enumerate(first)]
    named = HouseholdModel().fit(X, labels=labels, device_ids=dev)
    assert named.device_group_count == groups
    np.testing.assert_allclose(np.sort(named.assign_batch(X, device_ids=dev).probabilities, axis=1),
                               np.sort(free.assign_batch(X, device_ids=dev).probabilities, axis=1), atol=1e-9)


def test_a_session_on_a_device_the_model_does_not_know_says_how_often_such_answers_are_right(monkeypatch):
    """A session on a device the model has not met is judged by its device type only and
    is often a member the model has not met: its answer says NEW_DEVICE_CONFIDENCE (of a
    one-person or a several-person model), names the same person as before, and leaves
    the answers about known devices and bare vectors as they were."""
    from services.clustering.domain import model as M
    monkeypatch.setattr(M, "NEW_DEVICE_CONFIDENCE", {"one_person": 0.23, "several": 0.61})
    X, dev = _two_people_with_phones_and_a_tv()
    m = M.HouseholdModel().fit(X, device_ids=dev)
    assert m.n_persons == 2
    known = m.assign_batch(X[:6], device_ids=dev[:6])
    mixed = list(dev[:6])
    mixed[2] = mixed[4] = "a-laptop-never-seen"
    out = m.assign_batch(X[:6], device_ids=mixed)
    new = np.array([False, False, True, False, True, False])
    raw = M.HouseholdModel(calibrated=False).fit(X, device_ids=dev).assign_batch(X[:6], device_ids=mixed)
    np.testing.assert_array_equal(out.person_index, raw.person_index)            # never who
    np.testing.assert_allclose(out.confidence[new], 0.61)
    np.testing.assert_allclose(out.probabilities[new].sum(axis=1), 1.0)
    np.testing.assert_allclose(out.confidence[~new], known.confidence[~new])
    # every session on unknown devices (until now: the bare-vector map)
    alone = m.assign_batch(X[:3], device_ids=["a-laptop-never-seen"] * 3)
    np.testing.assert_allclose(alone.confidence, 0.61)
    # bare vectors (no device ids) keep their map
    bare = M.HouseholdModel().fit(X)
    np.testing.assert_allclose(bare.assign_batch(X[:6]).confidence,
                               calibrate_confidence(M.HouseholdModel(calibrated=False).fit(X).assign_batch(X[:6])
                                                    .probabilities, device=False)
                               .max(axis=1), rtol=1e-6)
    # a one-person model: the one-person value, the rest left to a member it has not met
    mine = np.asarray(dev) == "phone-a"
    one = M.HouseholdModel().fit(X[mine], device_ids=np.asarray(dev)[mine])
    assert one.n_persons == 1
    ans = one.assign_batch(X[:2], device_ids=["phone-a", "a-laptop-never-seen"])
    assert ans.confidence[1] == 0.23 and ans.confidence[0] != 0.23


def test_the_sessions_per_person_evidence_is_the_log_of_the_models_sessions_per_person(monkeypatch):
    from services.clustering.domain import model as M
    monkeypatch.setattr(M, "HOUSEHOLD_EVIDENCE", ("device_group_share", "persons", "log_sessions_per_person"))
    ev = M.household_evidence(1, np.array([2, 4, 1]), np.array([100, 100, 0]))
    np.testing.assert_allclose(ev[:, 2], np.log([50.0, 25.0, 1.0]))
    np.testing.assert_allclose(ev[:, :2], [[0.5, 2], [0.25, 4], [1.0, 1]])
    shift = (-0.4, (1.3, 0.2, 0.5))   # the shift then rests on the three columns
    np.testing.assert_allclose(M.household_shift(1, np.array([2, 4, 1]), shift, np.array([100, 100, 0])),
                               shift[0] + ev @ np.asarray(shift[1]))


def test_a_cold_starts_answer_among_several_persons_says_how_often_such_answers_are_right(monkeypatch):
    """With a population prior (the service's default cold start) a household's first
    sessions can name several persons at a raw posterior near 1; with device ids they say
    COLD_START_CONFIDENCE (floored at 1 / persons), never another person; bare vectors
    keep the raw posterior."""
    from services.clustering.domain import model as M
    monkeypatch.setattr(M, "COLD_START_CONFIDENCE", 0.8)
    X, dev = _two_people_with_phones_and_a_tv()
    dev = np.asarray(dev)
    prior = M.PopulationPrior.fit([X], n_personas=4)
    first = np.concatenate([np.flatnonzero(dev == "phone-a")[:3], np.flatnonzero(dev == "phone-b")[:3]])
    calibrated, raw, bare = (M.HouseholdModel(calibrated=c, population_prior=prior) for c in (True, False, True))
    for m in (calibrated, raw):
        m.update(X[first], device_ids=list(dev[first]))
    bare.update(X[first])
    out = calibrated.assign_batch(X[first], device_ids=list(dev[first]))
    before = raw.assign_batch(X[first], device_ids=list(dev[first]))
    assert out.strategy == "cold_start:population_prior" and out.probabilities.shape[1] > 1
    np.testing.assert_array_equal(out.person_index, before.person_index)
    np.testing.assert_allclose(out.confidence, max(0.8, 1.0 / out.probabilities.shape[1]), rtol=1e-5)
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0)
    assert (before.confidence > 0.9).all()
    np.testing.assert_allclose(bare.assign_batch(X[first]).probabilities, before.probabilities)
