"""Device identity, a person count that keeps up, and honest confidence (issue #10)."""

from __future__ import annotations

import numpy as np

from services.clustering.domain import features as F
from services.clustering.domain.model import HouseholdModel, one_person_confidence

DAY = 86_400.0
EPOCH = 1_735_689_600.0


def persona_sessions(rng, n, days, hour, device, genres, kids=0.0, minutes=45.0, start_day=0.0):
    """n sessions of one person: start hour ~ N(hour, 1), one device type, a genre mix."""
    day = np.sort(rng.uniform(start_day, start_day + days, n))
    ts = EPOCH + np.floor(day) * DAY + np.mod(rng.normal(hour, 1.0, n), 24) * 3600
    g = np.zeros((n, len(F.GENRES)))
    for name, w in genres.items():
        g[:, F.GENRES.index(name)] = w * rng.uniform(0.5, 1.5, n)
    total = minutes * 60 * np.exp(rng.normal(0, 0.4, n))
    X = F.features_matrix(ts, np.full(n, F.DEVICE_TYPES.index(device)), g, kids * total, np.zeros(n), total,
                          np.zeros(n), np.ones(n), np.zeros(n))
    return ts, X


def household(parts):
    """parts: list of (ts, X, device_id, person); returns time-ordered arrays."""
    ts = np.concatenate([p[0] for p in parts])
    X = np.vstack([p[1] for p in parts])
    dev = np.concatenate([[p[2]] * len(p[0]) for p in parts])
    person = np.concatenate([[p[3]] * len(p[0]) for p in parts])
    order = np.argsort(ts, kind="stable")
    return ts[order], X[order], dev[order], person[order]


def stream_in_fives(X, dev):
    """The sessions arriving five at a time, as the service folds them in: (the model,
    each session's person at arrival, [(sessions seen, composition event)])."""
    m = HouseholdModel()
    ids, events = [], []
    for a in range(0, X.shape[0], 5):
        before = len(m.composition_events)
        m.update(X[a:a + 5], device_ids=dev[a:a + 5])
        events += [(a + 5, e) for e in m.composition_events[before:]]
        ids += m.assign_batch(X[a:a + 5], device_ids=dev[a:a + 5]).person()
    return m, np.array(ids), events


def first_join(events):
    """Sessions seen when the first join fired (None: never)."""
    return next((at for at, e in events if e["kind"] == "join"), None)


def test_personal_devices_are_evidence_of_persons():
    """Two people with close habits (evening hours three hours apart, the same genres), each
    on their own phone. Device identity is what separates them: with device ids the
    model finds both and follows the phones; without, it does worse."""
    rng = np.random.default_rng(3)
    a = persona_sessions(rng, 80, 60, 20, "mobile", {"drama": 1, "comedy": 1})
    b = persona_sessions(rng, 80, 60, 23, "mobile", {"drama": 1, "comedy": 1.3})
    _, X, dev, person = household([(*a, "phone-a", 0), (*b, "phone-b", 1)])

    def accuracy(pred):
        pred = np.array(pred)
        return max(np.mean((pred == pred[0]) == (person == person[0])),
                   np.mean((pred == pred[0]) != (person == person[0])))

    with_ids = HouseholdModel().fit(X, device_ids=dev)
    acc_ids = accuracy(with_ids.assign_batch(X, device_ids=dev).person())
    blind = HouseholdModel().fit(X)
    acc_blind = accuracy(blind.assign_batch(X).person())
    assert with_ids.n_persons == 2 and acc_ids > 0.9
    assert acc_ids > acc_blind + 0.1


def test_a_shared_tv_is_not_one_person():
    """Two people with their own phones who both also use the TV: the TV's sessions
    are split between them by their habits, not lumped into a third person."""
    rng = np.random.default_rng(5)
    parts = [(*persona_sessions(rng, 60, 60, 8, "mobile", {"news": 1, "documentary": 1}), "phone-a", 0),
             (*persona_sessions(rng, 40, 60, 8, "tv", {"news": 1, "documentary": 1}), "tv", 0),
             (*persona_sessions(rng, 60, 60, 21, "mobile", {"horror": 1, "scifi": 1}), "phone-b", 1),
             (*persona_sessions(rng, 40, 60, 21, "tv", {"horror": 1, "scifi": 1}), "tv", 1)]
    _, X, dev, person = household(parts)
    m = HouseholdModel().fit(X, device_ids=dev)
    pred = np.array(m.assign_batch(X, device_ids=dev).person())
    assert m.n_persons == 2
    tv = dev == "tv"
    agree = [np.mean(pred[tv & (person == k)] == pred[(dev == f"phone-{'ab'[k]}")][0]) for k in (0, 1)]
    assert min(agree) > 0.8


def test_single_person_household_stays_single_in_batch_and_stream():
    """One person, one set of habits, a TV and a phone used alike."""
    rng = np.random.default_rng(11)
    ts, X = persona_sessions(rng, 180, 90, 21, "tv", {"drama": 2, "crime": 1})
    on_phone = rng.random(180) < 0.4
    X[on_phone, F.DEVICE] = 0.0
    X[on_phone, F.DEVICE.start + F.DEVICE_TYPES.index("mobile")] = 1.0
    parts = [(ts[~on_phone], X[~on_phone], "tv", 0), (ts[on_phone], X[on_phone], "phone", 0)]
    _, X, dev, _ = household(parts)
    assert HouseholdModel().fit(X, device_ids=dev).n_persons == 1
    m = HouseholdModel()
    for a in range(0, X.shape[0], 5):
        m.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert m.n_persons == 1 and not [e for e in m.composition_events if e["kind"] == "join"]
    one = m.assign_batch(X[:3], device_ids=dev[:3])
    # A one-person model does not claim certainty it has not earned: its confidence comes
    # from its evidence for one person (the sessions it has seen, the devices it knows,
    # its personal devices and the share of its sessions on them).
    assert len(m.device_ids) == 2
    evidence = m.one_person_evidence(3)
    np.testing.assert_allclose(evidence, [[np.log(X.shape[0]), 2.0, 1.0, on_phone.mean()]] * 3)
    np.testing.assert_allclose(one.confidence, one_person_confidence(evidence, young=False, streamed=m.streamed,
                                                                     fit_sessions=m.fit_sessions))
    assert (one.confidence < 1.0).all()
    # ... and would claim less if its sessions were all on the shared TV (a second member
    # the model has not met hides there), in every group.
    on_tv = evidence.copy()
    on_tv[:, 2:] = 0.0
    for young, streamed in ((False, False), (True, True), (False, True)):
        assert (one_person_confidence(on_tv, young, streamed)
                < one_person_confidence(evidence, young, streamed) - 0.02).all()

def test_a_new_member_is_found_in_a_time_ordered_stream():
    """Sessions arrive five at a time; after 60 days a second person starts watching on
    their own tablet in the afternoons. The model adds a person (a composition event)
    within 30 sessions and gives the newcomer's sessions an id of their own."""
    rng = np.random.default_rng(7)
    parts = [(*persona_sessions(rng, 150, 120, 21, "tv", {"drama": 2, "crime": 1}), "tv", 0),
             (*persona_sessions(rng, 60, 60, 16, "tablet", {"kids": 2, "animation": 1}, kids=0.9,
                                start_day=60), "tablet", 1)]
    ts, X, dev, person = household(parts)
    first_new = int(np.flatnonzero(person == 1)[0])
    m, ids, events = stream_in_fives(X, dev)
    found_at = first_join(events)
    assert found_at is not None and first_new <= found_at <= first_new + 30
    late = np.arange(len(ids)) >= found_at
    newcomer = set(ids[late & (person == 1)])
    assert len(newcomer) == 1 and newcomer.isdisjoint(set(ids[late & (person == 0)]))


def test_device_ids_survive_serialisation_and_unknown_devices_score_by_type():
    rng = np.random.default_rng(1)
    _, X, dev, _ = household([(*persona_sessions(rng, 40, 30, 20, "mobile", {"drama": 1}), "phone-a", 0),
                              (*persona_sessions(rng, 40, 30, 9, "tablet", {"kids": 1}, kids=1.0), "tab", 1)])
    m = HouseholdModel().fit(X, device_ids=dev)
    back = HouseholdModel.from_bytes(m.to_bytes())
    assert back.device_ids == m.device_ids
    np.testing.assert_allclose(back.assign_batch(X, device_ids=dev).probabilities,
                               m.assign_batch(X, device_ids=dev).probabilities)
    unknown = m.assign_batch(X, device_ids=["never-seen"] * len(X))
    # the same person as by type alone (its confidence is the new-device figure, model.NEW_DEVICE_CONFIDENCE)
    np.testing.assert_array_equal(unknown.person_index, m.assign_batch(X).person_index)
    m.calibrated = False
    np.testing.assert_allclose(m.assign_batch(X, device_ids=["never-seen"] * len(X)).probabilities,
                               m.assign_batch(X).probabilities)


def test_profiles_report_each_persons_own_peaks_devices_and_genres():
    """What GET /v1/household shows a caller about each person: a morning-only phone
    watcher has one peak hour (not the TV neighbour's evening, whose sessions it holds a
    few percent of), a TV watcher with two real peaks has both, and each has its own
    device type and genres."""
    rng = np.random.default_rng(7)
    morning = persona_sessions(rng, 60, 60, 8.9, "mobile", {"news": 1.0})
    evening = persona_sessions(rng, 40, 60, 21.0, "tv", {"drama": 1.0})
    lunch = persona_sessions(rng, 30, 60, 13.0, "tv", {"drama": 1.0})
    ts, X, dev, person = household([(*morning, "phone-a", 0), (*evening, "tv-1", 1), (*lunch, "tv-1", 1)])
    model = HouseholdModel(seed=0).fit(X, device_ids=list(dev))
    profiles = model.profiles()
    assert len(profiles) == 2
    by_device = {max(p["devices"], key=p["devices"].get): p for p in profiles}
    phone, tv = by_device["mobile"], by_device["tv"]
    assert phone["rhythm"]["peak_hours_utc"] == [8]
    assert sorted(tv["rhythm"]["peak_hours_utc"]) == [12, 20]
    assert phone["top_genres"][0] == "news" and tv["top_genres"][0] == "drama"
    assert round(phone["sessions"] + tv["sessions"]) == 130


def test_a_profile_hint_and_feedback_naming_its_person_stay_one_person():
    """Profile hint "alice" names a person (say p1); later feedback labels other sessions
    with the id p1 itself (the keeper maps a person-id label to itself, as
    ModelKeeper.fit does). Both name one person: the refit keeps one p1, not two
    components sharing the id."""
    rng = np.random.default_rng(3)
    a = persona_sessions(rng, 60, 60, 8.0, "mobile", {"news": 1.0})
    b = persona_sessions(rng, 60, 60, 21.0, "tv", {"drama": 1.0})
    ts, X, dev, person = household([(*a, "phone-a", 0), (*b, "tv-1", 1)])
    hinted = np.flatnonzero(person == 0)[:6]
    labels = [None] * len(ts)
    for i in hinted:
        labels[i] = "alice"
    model = HouseholdModel(seed=0).fit(X, labels=labels, device_ids=list(dev))
    alice = model.label_map["alice"]
    for i in np.flatnonzero(person == 0)[10:14]:
        labels[i] = alice                      # feedback: "it was <alice's id>"
    model.label_map[alice] = alice
    model.fit(X, labels=labels, device_ids=list(dev))
    assert len(model.person_ids) == len(set(model.person_ids)) == 2
    answers = model.assign_batch(X, device_ids=list(dev))
    got = np.array(answers.person_ids)[answers.probabilities.argmax(axis=1)]
    assert set(got[person == 0]) == {alice}
