"""A member joining or leaving, told apart from refits that only split or rename
persons (HouseholdModel._detect_composition, issue #10)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.clustering.domain import model as M
from services.clustering.domain.model import HouseholdModel, _share_change_llr
from bench.stream_tuning import SILENCE_P_MAX, silence_cusum
from tests.unit.clustering.test_identity_signals import household, persona_sessions, stream_in_fives


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


def _newcomer_household():
    """Two phone owners who also use the TV; after 60 days a third member starts
    watching, on the TV only, at other hours and other genres: (X, devices, person)."""
    rng = np.random.default_rng(41)
    parts = [(*persona_sessions(rng, 90, 100, 20, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
             (*persona_sessions(rng, 30, 100, 20, "tv", {"comedy": 2, "drama": 1}), "tv", 0),
             (*persona_sessions(rng, 90, 100, 23, "mobile", {"horror": 2, "scifi": 1}), "phone-b", 1),
             (*persona_sessions(rng, 45, 40, 10, "tv", {"documentary": 2, "news": 1}, start_day=60), "tv", 2)]
    _, X, dev, person = household(parts)
    return X, dev, person


def test_a_newcomer_on_the_shared_tv_is_born_and_reported_within_30_sessions():
    """Two phone owners who also use the TV; after 60 days a third member starts
    watching, on the TV only, at other hours and other genres. No device says so: the
    newcomer test (_birth_of_newcomer) must model them, report one join within 30
    sessions of their first session, leave the first two persons' ids alone and give
    the newcomer's later sessions an id of their own."""
    X, dev, person = _newcomer_household()
    first_new = int(np.flatnonzero(person == 2)[0])
    m, ids, events = stream_in_fives(X, dev)
    joins = [(at, e) for at, e in events if e["kind"] == "join"]
    assert len(joins) == 1 and first_new <= joins[0][0] <= first_new + 30
    assert not [e for _, e in events if e["kind"] == "leave"]
    found_at = joins[0][0]
    settled = np.arange(len(ids)) >= 40   # the first model has met both phone owners
    old = {k: set(ids[settled & (person == k) & (dev != "tv")]) for k in (0, 1)}
    assert all(len(v) == 1 for v in old.values()) and old[0] != old[1]
    newcomer = ids[(np.arange(len(ids)) >= found_at) & (person == 2)]
    top = max(set(newcomer), key=list(newcomer).count)
    assert top == joins[0][1]["born"][0] and np.mean(newcomer == top) > 0.8
    assert top not in old[0] | old[1]


def test_no_newcomer_is_born_in_a_stable_tv_only_household():
    """One person on the TV, two kinds of viewing all along (long crime binges, short
    comedies at the same hours): the newcomer test has nothing that starts late, so no
    join is reported. (How many persons the refits end with is the person-count
    selection's business, tests/unit/clustering/test_persons.py.)"""
    rng = np.random.default_rng(42)
    parts = [(*persona_sessions(rng, 80, 120, 21, "tv", {"crime": 2, "drama": 1}, minutes=150), "tv", 0),
             (*persona_sessions(rng, 80, 120, 21, "tv", {"comedy": 2}, minutes=25), "tv", 0)]
    _, X, dev, _ = household(parts)
    _, events = _stream(X, dev)
    assert events == []


def test_the_offline_replay_applies_the_join_and_leave_bars_once_per_person():
    """bench.stream_tuning.replay re-runs _detect_composition's decisions on traced
    masses: a person whose share went 0 -> 8 of 10 is a join at the join bar, one whose
    share went 40 % -> 0 a leave only at a leave bar it reaches, each reported once."""
    from bench import stream_tuning as S

    check = {"at": 60, "n": 60, "ids": ["p1", "p2", "p3"], "birth": None,
             "old": {"10": [30.0, 0.0, 20.0]}, "new": {"10": [2.0, 8.0, 0.0]}}
    trace = {"checks": [check, {**check, "at": 70}]}
    llr = _share_change_llr(np.array([0.0, 20.0]), 50, np.array([8.0, 0.0]), 10)
    both = S.replay(trace, S.Thresholds(join_h=4.0, leave_h=float(llr[1]) - 0.1, lookback=(10,)))
    assert both == [(60, "join"), (60, "leave")]
    only_join = S.replay(trace, S.Thresholds(join_h=4.0, leave_h=float(llr[1]) + 0.1, lookback=(10,)))
    assert only_join == [(60, "join")]
    assert S.replay(trace, S.Thresholds(min_history=51, lookback=(10,))) == []   # too little before


def test_the_rebarred_replay_keeps_the_streams_newcomer_events_and_replaces_its_share_test_events():
    """bench.stream_tuning.rebarred_events (--resweep, session 33): a traced stream's
    events are its share test's (which the replay reproduces from the traced masses) and
    its newcomer tests' (which changed the model, so the replay cannot); at other bars the
    newcomer events stay as the stream raised them and only the share test's are
    replayed. Here the stream raised a newcomer join at 40 and the share test's join at 60;
    at a leave bar the traced leave reaches, the leave is added, and at a join bar above
    the traced join's ratio the share test's join goes while the newcomer's stays."""
    from bench import stream_tuning as S

    check = {"at": 60, "n": 60, "ids": ["p1", "p2", "p3"], "birth": None,
             "old": {"10": [30.0, 0.0, 20.0]}, "new": {"10": [2.0, 8.0, 0.0]}}
    landed = S.Thresholds(join_h=4.0, leave_h=1e9, lookback=(10,))
    trace = {"checks": [check], "events": [(40, "join"), (60, "join")]}
    assert S.newcomer_events(trace, landed) == [(40, "join")]
    llr = _share_change_llr(np.array([0.0, 20.0]), 50, np.array([8.0, 0.0]), 10)
    lower_leave = dataclasses.replace(landed, leave_h=float(llr[1]) - 0.1)
    assert S.rebarred_events(trace, lower_leave, landed) == [(40, "join"), (60, "join"), (60, "leave")]
    higher_join = dataclasses.replace(landed, join_h=float(llr[0]) + 0.1)
    assert S.rebarred_events(trace, higher_join, landed) == [(40, "join")]


def test_composition_scores_count_any_event_in_the_window_and_say_which_were_of_the_right_kind():
    """bench._worlds_eval.composition_scores: an event within DETECTION_WINDOW sessions
    after the change detects it whatever its kind (detection_rate); the same-kind rate
    counts only an event of the change's own kind; an event before the change or after
    the window is not a detection; every event of a stable household after the warm-up
    is a false alarm, per 91 monitored days."""
    from bench._worlds_eval import DETECTION_WINDOW, QUARTER_S, composition_scores
    from bench.worlds import CompositionChange, WorldHousehold

    def household(change, n=200):
        return WorldHousehold("h", "f", "w", np.zeros((n, 1), np.float32), np.zeros(n, int),
                              np.array(["tv"] * n), np.array(["tv"] * n),
                              np.arange(n) * QUARTER_S / (n - 1), np.ones(n), 0.0,
                              [change] if change else [])

    hs = [household(CompositionChange("join", 1, 100)), household(CompositionChange("leave", 1, 100)),
          household(CompositionChange("join", 1, 100)), household(None)]
    events = [[(110, "leave")],                          # found, but as the wrong kind
              [(90, "leave"), (120, "leave")],           # the one before the change does not count
              [(100 + DETECTION_WINDOW + 5, "join")],    # too late
              [(10, "join"), (60, "join")]]              # warm-up 19: one false alarm
    s = composition_scores(hs, events, warmup=19)
    assert s["detection_rate"] == 2 / 3 and s["detection_rate_same_kind"] == 1 / 3
    assert s["detection_rate_by_kind"] == {"join": 0.5, "leave": 1.0}
    assert s["mean_delay_sessions"] == 15.0
    assert abs(s["stable_household_quarters"] - (199 - 19) / 199) < 0.01
    assert abs(s["false_alarms_per_household_quarter"] - 1 / ((199 - 19) / 199)) < 0.01
    # by type: the delay of the leave found (the join found was found by a leave event,
    # 10 sessions late), and the one false alarm was a join
    assert s["mean_delay_sessions_by_kind"] == {"join": 10.0, "leave": 20.0}
    assert s["changes_by_kind"] == {"join": 2, "leave": 1}
    assert s["false_alarms_per_household_quarter_by_kind"]["leave"] == 0.0
    assert abs(s["false_alarms_per_household_quarter_by_kind"]["join"] - s["false_alarms_per_household_quarter"]) < 1e-12


def test_drift_is_scored_per_household_quarter_beside_baselines():
    """bench.accuracy._drift_scores: the first alarm at or after the change is a detection
    (its delay counted); an earlier one is a miss; every alarm of a stable household is a
    false alarm, per 91 monitored days."""
    from bench.accuracy import _drift_scores

    runs = [("behavioural", 100, [90, 130], 50.0),   # first alarm before the change: missed
            ("sudden", 100, [110], 50.0),            # found after 10 sessions
            (None, None, [60, 80], 91.0),            # two false alarms in one quarter
            (None, None, [], 91.0)]
    s = _drift_scores(runs)
    assert s["detection_rate"] == 0.5
    assert s["detection_rate_by_type"]["behavioural"] == 0.0 and s["detection_rate_by_type"]["sudden"] == 1.0
    assert s["mean_delay_sessions"]["sudden"] == 10.0
    assert s["false_alarms_per_household_quarter"] == 1.0 and s["stable_household_quarters"] == 2.0


def test_the_new_device_newcomer_test_needs_an_earlier_window_to_compare_with(monkeypatch):
    """_newcomer_on_new_device judges a window's gain against the same test on an earlier
    window where nobody joined. Early in a stream there is none, and a window-owning
    extra person gains ~100 nats by over-fitting alone: TUNING bing2h1 (one person, a
    phone first used after the tablet) was reported as a join at session 30 and split
    (test_persons.test_single_person_stream_keeps_one_id_at_every_arrival). So however
    large the gain, no earlier window means no join; with one, a large enough margin is."""
    rng = np.random.default_rng(7)
    _, X, dev, _ = household([(*persona_sessions(rng, 30, 20, 20, "mobile", {"drama": 1}), "phone-a", 0),
                              (*persona_sessions(rng, 10, 5, 20, "tablet", {"drama": 1}, start_day=20),
                               "tablet-a", 0)])
    m = HouseholdModel().fit(X, device_ids=dev)
    assert m.mixture.n_components == 1
    monkeypatch.setattr(M.HouseholdModel, "_new_device_is_old_member", lambda self, X, tau: False)

    def stats(earlier):
        return lambda self, X, current, every=False: [
            {"r": 10, "gain": 1e6, "mass": 10.0, "new_device_sessions": 10, "gain_free": None,
             "earlier": earlier, "_mixture": M.fit_em(X, 2, self.family, np.random.default_rng(0),
                                                      keys=self.buffer_keys, max_iter=5)[0]}]

    monkeypatch.setattr(M.HouseholdModel, "_new_device_statistics", stats([]))
    m._newcomer_on_new_device()
    assert m.mixture.n_components == 1 and not m.composition_events
    monkeypatch.setattr(M.HouseholdModel, "_new_device_statistics", stats([0.0]))
    m._newcomer_on_new_device()
    assert [ev["kind"] for ev in m.composition_events] == ["join"]


def test_a_replaced_phone_is_not_taken_for_a_newcomer_with_a_device_of_their_own():
    """The new-device newcomer test's guard (_new_device_is_old_member): a phone replaced on
    day 45 (a new device id, the same habits) is grouped with the old phone, so it is an
    existing member's; a newcomer's own phone (other hours and genres) is not."""
    rng = np.random.default_rng(52)
    parts = [(*persona_sessions(rng, 50, 45, 20, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
             (*persona_sessions(rng, 50, 45, 20, "mobile", {"comedy": 2, "drama": 1}, start_day=45), "phone-a2", 0),
             (*persona_sessions(rng, 90, 90, 23, "mobile", {"horror": 2, "scifi": 1}), "phone-b", 1)]
    _, X, dev, _ = household(parts)
    m = HouseholdModel().fit(X, device_ids=dev)
    assert m._new_device_is_old_member(m._buffer_X(), int(np.flatnonzero(dev == "phone-a2")[0]))
    parts[1] = (*persona_sessions(rng, 50, 45, 9, "mobile", {"kids": 2, "animation": 1}, kids=0.9,
                                  start_day=45), "phone-c", 2)
    _, X, dev, _ = household(parts)
    m = HouseholdModel().fit(X, device_ids=dev)
    assert not m._new_device_is_old_member(m._buffer_X(), int(np.flatnonzero(dev == "phone-c")[0]))


def test_the_stream_tuning_harness_logs_which_path_changed_the_persons(monkeypatch):
    """bench.stream_tuning --paths: every change of the persons is logged with the session
    count and the path that made it; a stream of two people on their own phones, the
    second from session 40, logs a change that adds a person after 40 sessions."""
    from bench import stream_tuning as S

    for name in S.PERSON_PATHS:   # the wrappers are taken off again after the test
        monkeypatch.setattr(HouseholdModel, name, getattr(HouseholdModel, name))
    S.record_person_changes()
    S.record_person_changes()   # idempotent: one log entry per change, not two
    rng = np.random.default_rng(7)
    parts = [(*persona_sessions(rng, 80, 60, 21, "mobile", {"drama": 2, "crime": 1}), "phone-a", 0),
             (*persona_sessions(rng, 40, 30, 8, "mobile", {"kids": 2, "animation": 1}, kids=0.9, start_day=30.0),
              "phone-b", 1)]
    _, X, dev, _ = household(parts)
    S._person_changes.clear()
    m = HouseholdModel()
    for a in range(0, X.shape[0], 5):
        m.update(X[a:a + 5], device_ids=dev[a:a + 5])
    rises = [c for c in S._person_changes if c["persons"][1] > c["persons"][0]]
    assert rises and rises[0]["at"] > 40 and rises[0]["path"] in {p.strip("_") for p in S.PERSON_PATHS}
    assert len(S._person_changes) == len({(c["at"], c["path"]) for c in S._person_changes})


def test_the_tuning_diagnosis_puts_each_missed_change_in_the_first_class_that_fits():
    """bench.stream_tuning.diagnose (TUNING traces, truth read only to classify): found in
    the window; found late; a newcomer with at most 4 sessions in the 30 after; a
    newcomer the model gives a person of their own (whose share test stayed below its
    bar) or not."""
    from bench import stream_tuning as S
    from bench.worlds import CompositionChange, WorldHousehold

    def household(hid, kind, person):
        n = person.size
        return WorldHousehold(hid, "f", "w", np.zeros((n, 1), np.float32), person, np.array(["tv"] * n),
                              np.array(["tv"] * n), np.arange(n, dtype=float), np.ones(n), 0.0,
                              [CompositionChange(kind, 1, 50)])

    busy = np.r_[np.zeros(50, int), np.tile([0, 1], 40)]           # 15 newcomer sessions in the 30 after
    quiet = np.r_[np.zeros(50, int), [1, 1, 1], np.zeros(77, int)]  # 3 of them
    own = {"at": 70, "persons": 2, "member": {"before": [0.0, 0.0], "after": [1.0, 9.0], "others_after": [10.0, 1.0]}}
    none = {"at": 70, "persons": 2, "member": {"before": [0.0, 0.0], "after": [8.0, 2.0], "others_after": [10.0, 1.0]}}
    hs = [household(f"h{i}", "join", p) for i, p in enumerate([busy, busy, quiet, busy, busy])]
    outs = [{"id": "h0", "change": ("join", 50), "events": [(70, "leave")], "checks": []},
            {"id": "h1", "change": ("join", 50), "events": [(90, "join")], "checks": []},
            {"id": "h2", "change": ("join", 50), "events": [], "checks": [own]},
            {"id": "h3", "change": ("join", 50), "events": [], "checks": [own]},
            {"id": "h4", "change": ("join", 50), "events": [], "checks": [none]}]
    assert S.diagnose(outs, hs)["join"] == {"detected": 1, "found 31-50 sessions after": 1,
                                            "at most 4 sessions in the 30 after": 1,
                                            "own person, below the bar": 1, "no person of their own": 1}


def _world_household(hid, person, kind=None, at=50, types=None):
    from bench.worlds import CompositionChange, WorldHousehold
    n = person.size
    types = np.array(["tv"] * n) if types is None else types
    return WorldHousehold(hid, "f", "w", np.zeros((n, 1), np.float32), person, types, types,
                          np.arange(n) * 86_400.0, np.ones(n), 0.0,
                          [CompositionChange(kind, 1, at)] if kind else [])


def test_the_ceiling_runs_the_share_test_on_the_true_persons():
    """bench.stream_tuning.oracle_events / ceiling (the detection a stream whose persons
    were the true members would reach): a member who joins at session 50 and watches
    every other session after is a join within the window; one who leaves at 50 after
    half of the sessions is a leave; a newcomer with 3 sessions in the 30 after is not
    detected and is counted as having at most 4; a stable household raises nothing."""
    from bench import stream_tuning as S

    join = np.r_[np.zeros(50, int), np.tile([0, 1], 40)]
    leave = np.r_[np.tile([0, 1], 25), np.zeros(80, int)]
    quiet = np.r_[np.zeros(50, int), [1, 1, 1], np.zeros(77, int)]
    stable = np.tile([0, 1], 65)
    hs = [_world_household("j", join, "join"), _world_household("l", leave, "leave"),
          _world_household("q", quiet, "join"), _world_household("s", stable)]
    events = [S.oracle_events(h) for h in hs]
    assert any(k == "join" and 50 <= at <= 80 for at, k in events[0])
    assert any(k == "leave" and 50 <= at <= 80 for at, k in events[1])
    assert not any(50 <= at <= 80 for at, _ in events[2])
    assert events[3] == []
    c = S.ceiling(hs)
    assert c["true_persons_share_test"]["detection_rate"] == 2 / 3
    assert c["true_persons_share_test"]["false_alarms_per_household_quarter"] == 0.0
    assert c["member_sessions_in_window"]["join"] == {"n": 2, "at_most_4": 1, "median": 9.0}


def test_the_arrival_loss_puts_each_session_in_one_class_and_the_losses_sum_to_the_gap():
    """bench.stream_tuning.arrival_loss: a session answered in cold start, by a model with
    fewer persons than members seen (>= 3 sessions each), or by one with enough; each
    class's loss is its (batch right - arrival right) over all sessions, so the three
    add up to the batch fit's lead."""
    from bench import stream_tuning as S

    person = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    h = _world_household("h", person)
    out = {"id": "h", "arrival_persons": [0, 0, 1, 1, 1, 1, 1, 2, 2, 2],
           "arrival_correct": [1, 0, 1, 0, 0, 0, 1, 1, 1, 0], "batch_correct": [1, 1, 1, 1, 1, 0, 1, 1, 1, 1]}
    loss = S.arrival_loss([out], [h])
    # sessions 0-1 cold; 2-4 one person with one member seen (enough); 5-6 one person for
    # two members seen (late); 7-9 two persons (enough)
    assert loss["cold"]["share"] == 0.2 and loss["cold"]["loss"] == 0.1
    assert loss["late"]["share"] == 0.2 and loss["late"]["loss"] == 0.0
    assert loss["enough"]["loss"] == 0.3
    assert loss["late"]["loss_households_without_personal_device"] == 0.0
    total = sum(loss[c]["loss"] for c in ("cold", "late", "enough"))
    assert abs(total - (loss["batch_acc"] - loss["arrival_acc"])) < 1e-9



def test_a_member_the_caller_named_keeps_that_id_when_the_stream_finds_them():
    """The newcomer household above; feedback names the newcomer ("grandpa") on their
    second session, before the stream has found them: the id reserved for the name is
    the id the stream's newcomer gets (HouseholdModel._adopt_reserved_ids), not a fresh
    one beside it; the phone owners keep theirs."""
    X, dev, person = _newcomer_household()
    second_new = int(np.flatnonzero(person == 2)[1])
    labels: list[str | None] = [None] * X.shape[0]
    labels[second_new] = "grandpa"
    m, reserved, persons_then = HouseholdModel(), None, None
    for a in range(0, X.shape[0], 5):
        m.update(X[a:a + 5], device_ids=dev[a:a + 5])
        if reserved is None and a + 5 > second_new:
            persons_then = list(m.person_ids)
            m.reserve_label_ids(labels[:a + 5])       # what the keeper does for a stream's feedback
            reserved = m.label_map["grandpa"]
            assert reserved not in m.person_ids
        if reserved is not None:                       # serialised between arrivals, as stored
            m = HouseholdModel.from_bytes(m.to_bytes())
    joins = [e for e in m.composition_events if e["kind"] == "join"]
    assert len(joins) == 1 and joins[0]["born"] == [reserved] and reserved in m.person_ids
    assert set(persons_then) <= set(m.person_ids)     # nobody there before was renamed
    later = np.arange(X.shape[0]) > second_new + 30
    ids = np.array(m.assign_batch(X, device_ids=dev).person())
    assert np.mean(ids[later & (person == 2)] == reserved) > 0.8
    assert m.reserved_keys == {}


def test_the_singles_diagnosis_names_each_split_singles_path_and_outcome():
    """bench.stream_tuning.singles_diagnosis (--paths): a single-person stream that showed
    a second person is listed with the path of its first rise, when, how many sessions the
    extra ids answered and whether it ended on one person; singles kept is given by each
    definition (ids at arrival, settled ids, the final model's count, never shown split)."""
    from bench import stream_tuning as S

    def out(hid, changes, ids, final, shown, settled_ids=None):
        return {"id": hid, "persons": 1, "sessions": sum(ids.values()), "ids_used": len(ids), "id_sessions": ids,
                "final_persons": final, "settled_ids": settled_ids or final, "sessions_shown_split": shown,
                "person_changes": changes}

    rise = {"at": 60, "path": "birth_of_newcomer", "persons": [1, 2], "device_groups": [1, 1]}
    refit = {"at": 40, "path": "refit_on_device_evidence", "persons": [1, 2], "device_groups": [1, 2]}
    outs = [out("a", [], {"p1": 50}, 1, 0),
            out("b", [rise], {"p1": 60, "p2": 2}, 2, 2),
            out("c", [refit, {**refit, "at": 50, "persons": [2, 1]}], {"p1": 40, "p2": 8}, 1, 10),
            {**out("d", [], {"p1": 30}, 1, 0), "persons": 2}]
    d = S.singles_diagnosis(outs)
    assert d["households"] == 3 and d["kept_ids_at_arrival"] == 1 / 3 and d["kept_final_model"] == 2 / 3
    assert d["kept_never_shown_split"] == 1 / 3
    rows = {r["id"]: r for r in d["households_split"]}
    assert rows["b"]["path"] == "newcomer test" and rows["b"]["outcome"] == "kept" and rows["b"]["extra_id_sessions"] == 2
    assert rows["c"]["path"].startswith("device refit: a device group more") and rows["c"]["outcome"] == "dropped"
    assert rows["c"]["at"] == 40


def test_the_change_suite_is_tuning_only_and_its_evidence_classes_read_the_truth():
    """bench.stream_tuning.change_suite: households of the TUNING families on its own
    seed (never the REPORTING one), changed ones first, each with one join or leave of
    2-4 members, then stable ones without any; change_evidence counts the changed
    member's sessions in the window and on a personal device first seen after a join."""
    from bench import stream_tuning as S
    from bench import worlds

    with pytest.raises(ValueError):
        S.change_suite(1, worlds.REPORTING.seed)
    hs = S.change_suite(1)
    changed = [h for h in hs if h.changes]
    assert len(changed) == 3 * S.SUITE_CHANGED and hs[:len(changed)] == changed
    assert all(2 <= h.n_persons <= 4 for h in changed)
    assert not [h for h in hs[len(changed):] if h.changes]
    assert {h.family for h in hs} == set(worlds.TUNING.families)
    for h in changed:
        ev = S.change_evidence(h)
        c = h.changes[0]
        seg = slice(c.session_index, c.session_index + 30) if c.kind == "join" else \
            slice(max(c.session_index - 30, 0), c.session_index)
        assert ev["member_sessions_in_window"] == int((h.person[seg] == c.person).sum())
        if c.kind == "join":
            # a joiner's devices of their own are first seen after the join
            mine = h.device_id[h.person == c.person]
            fresh = [d for d in set(mine) if d not in set(h.device_id[:c.session_index])]
            assert ev["on_fresh_personal_device"] <= ev["member_sessions_in_window"]
            assert (ev["on_fresh_personal_device"] > 0) <= bool(fresh)
        assert S.evidence_class(ev) in {"at most 4 sessions", "own personal device",
                                        "shared devices, hours apart (>= 3 h)", "shared devices, same hours"}


def test_a_suite_joiner_with_a_phone_of_their_own_is_found_through_the_service_path():
    """A TUNING change-suite household (smobi0c5: two members, the second joining at
    session 31 with a phone of their own) streamed one session per arrival through the
    clustering service's refresh path (ModelKeeper.advance, bench._worlds_eval.ServiceStream):
    a join is reported within 30 sessions of the change, and by_evidence files it as a
    joiner on their own personal device, detected, with its delay."""
    from bench import _worlds_eval as E
    from bench import stream_tuning as S

    h = next(h for h in S.change_suite(1) if h.household_id == "smobi0c5")
    c = h.changes[0]
    assert c.kind == "join" and h.n_persons == 2
    ev = S.change_evidence(h)
    assert S.evidence_class(ev) == "own personal device" and ev["on_fresh_personal_device"] >= 2
    stream = E.ServiceStream(h)
    events = []
    for _, b, _, _, new in stream.arrivals(1):
        events += [(b, e["kind"]) for e in new]
        if b >= c.session_index + E.DETECTION_WINDOW:
            break
    joins = [at for at, kind in events if kind == "join"]
    assert joins and c.session_index <= joins[0] <= c.session_index + E.DETECTION_WINDOW
    out = {"id": h.household_id, "events": events, "checks": []}
    row = S.by_evidence([out], [h])["join: own personal device"]
    assert row["changes"] == 1 and row["detected"] == 1 and row["mean_delay"] == joins[0] - c.session_index


def test_the_silence_cusum_is_the_run_length_evidence_of_an_absence_and_a_session_of_theirs_resets_it():
    """A person with 30 % of 100 sessions then silent for 20: the statistic sums
    -log(1 - w_i) over the silence (w_i their share of the sessions before session i);
    one sure session of theirs in the middle resets it; a person present throughout
    scores ~0; a person with fewer than SILENCE_MIN_SESSIONS sessions cannot leave."""
    before = np.array([30.0, 68.0, 2.0])
    silent = np.zeros((20, 3))
    silent[:, 1] = 1.0
    got = silence_cusum(silent, before, 100)
    want = -sum(np.log1p(-30.0 / (100 + i)) for i in range(20))
    assert got[0] == pytest.approx(want, rel=1e-9)
    assert 5.0 < got[0] < -20 * np.log1p(-0.3)        # the share is re-read as the silence grows
    assert got[1] < 0.5 and got[2] == 0.0
    back = silent.copy()
    back[12] = [1.0, 0.0, 0.0]                         # they came back once, 8 sessions ago
    assert silence_cusum(back, before, 100)[0] == pytest.approx(
        -sum(np.log1p(-(30.0 + SILENCE_P_MAX) / (100 + i)) for i in range(13, 20)), rel=1e-9)
    # an ambiguous session (p = 0.5) is weaker evidence of absence than a clear one
    half = silent.copy()
    half[:, 0], half[:, 1] = 0.5, 0.5
    assert 0.0 <= silence_cusum(half, before, 100)[0] < got[0]


def test_the_silence_cusum_reads_a_young_buffer_whose_tail_is_all_of_it():
    """With fewer than SILENCE_TAIL sessions the tail is the whole buffer (nothing
    before it): a person with 12 of the first 40 sessions, then silent for 25, has
    left by the evidence all the same (a gate on the mass before the tail hid them)."""
    P = np.zeros((65, 2))
    P[:40:10, 0] = P[5:40:10, 0] = P[7:40:10, 0] = 1.0     # 12 of the first 40
    P[:, 1] = 1.0 - P[:, 0]
    got = silence_cusum(P, np.zeros(2), 0)
    assert got[0] > 6.0 and got[1] < 1.0


def test_the_leave_anatomy_says_which_leaves_are_below_chance_and_the_silence_replay_adds_only_its_own_leaves():
    """bench.stream_tuning.leave_anatomy: a leaver with half of 50 sessions then 60 sessions
    without them is detectable at 8 nats; one with 3 of 60 (5 %) is below the bar at every
    check in the window (too small a share); oracle_silence_events finds the first by its
    silence with the share test's leaves off. silence_replay(only_new): a person silent for
    30 sessions after 40 % of the buffer is a leave of the CUSUM's own at a bar it reaches,
    none above it, and none where the share test has reported the leave already."""
    from bench import stream_tuning as S

    big = np.r_[np.tile([0, 1], 25), np.zeros(60, int)]
    small = np.r_[np.zeros(60, int), np.zeros(60, int)]
    small[[5, 25, 45]] = 1
    hs = [_world_household("big", big, "leave"), _world_household("small", small, "leave")]
    hs[1].changes[0].session_index = 60                    # their last day: after session 59
    an = S.leave_anatomy(hs, 8.0)
    by_id = {r["id"]: r for r in an["rows"]}
    assert by_id["big"]["detectable"] and by_id["big"]["share"] == 0.5
    assert not by_id["small"]["detectable"] and by_id["small"]["share"] == 0.05
    assert an["classes"] == {"detectable": 1, "below the bar: share < 0.20": 1}
    assert any(k == "leave" and 50 <= at <= 80 for at, k in S.oracle_silence_events(hs[0], 8.0, float("inf")))

    P = np.zeros((100, 2))
    P[:70:5, 0] = 1.0                                      # 14 of the first 70 (20 %), then 30 silent
    P[:, 1] = 1.0 - P[:, 0]
    check = {"at": 100, "n": 100, "ids": ["p1", "p2"], "old": {"10": [14.0, 76.0]}, "new": {"10": [0.0, 10.0]},
             "tail_before": [0.0, 0.0], "tail": P.tolist()}
    trace = {"checks": [check], "events": [[40, "join"]]}
    stat = float(S.silence_cusum(P, np.zeros(2), 0)[0])
    assert S.silence_replay(trace, stat - 0.1, only_new=True) == [(100, "leave")]
    assert S.silence_replay(trace, stat + 0.1, only_new=True) == []
    assert S.silence_replay(trace, stat - 0.1, share_leave_h=0.0, only_new=True) == []  # the share test's
    assert S.silence_replay(trace, stat - 0.1) == [(40, "join"), (100, "leave")]


# -- a leave by a personal device's silence (model.silent_personal_device, _detect_device_silence)

def test_the_silent_personal_device_is_the_one_with_the_largest_share_before_the_window():
    """Slots 0 and 1 personal, 2 a shared TV: in the last 30 sessions only the TV and
    slot 0 are seen; slot 1 (a quarter of the reference) is the silent one. A silent TV
    or an unknown device (-1) is no one's absence; too few sessions before the window,
    or a restart after the silence began, and there is nothing to say."""
    silent = lambda slots, personal, start=0: M.silent_personal_device(  # noqa: E731
        slots, personal, start, window=30, min_history=20, reference=200)
    ref = np.array([0, 1, 2, 2] * 10)                  # 40 sessions: slot 1 has 10 (0.25)
    win = np.array([0, 2, -1] * 10)                    # 30 sessions: slot 1 silent
    slots = np.concatenate((ref, win))
    personal = slots != 2
    assert silent(slots, personal) == (1, 0.25)
    # the TV silent instead: not a personal device, nothing
    tv_silent = np.concatenate((ref, np.array([0, 1] * 15)))
    assert silent(tv_silent, tv_silent != 2) is None
    # an unknown slot is nobody's device
    assert silent(np.concatenate((np.array([0, -1] * 20), win)), np.ones(70, dtype=bool)) is None
    # 19 sessions before the window: too few; a restart inside the reference shortens it
    assert silent(slots[21:], personal[21:]) is None
    assert silent(slots, personal, start=21) is None
    assert silent(slots, personal, start=20) == (1, 0.25)
    # the reference is the newest 200 sessions before the window
    long_ref = np.concatenate((np.full(300, 1), np.array([0, 2] * 100), win))
    assert silent(long_ref, long_ref != 2) is None      # slot 1 only before them
    # a shorter window: slot 1's last session 25 back is silence enough at 25, not at 30
    recent = np.concatenate((ref, np.array([1]), np.array([0, 2, -1] * 8), np.array([0])))
    assert M.silent_personal_device(recent, recent != 2, 0, window=25, min_history=20, reference=200)[0] == 1
    assert silent(recent, recent != 2) is None


def _look_alike_owners(seed=61):
    """Two members with the same habits (hours, genres), each on a phone of their own; the
    second one's last session is on day 50 of 100 (moved out): (X, devices, person)."""
    rng = np.random.default_rng(seed)
    parts = [(*persona_sessions(rng, 160, 100, 21, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
             (*persona_sessions(rng, 60, 50, 21, "mobile", {"comedy": 2, "drama": 1}), "phone-b", 1)]
    _, X, dev, person = household(parts)
    return X, dev, person


def test_a_leaver_who_is_no_person_of_the_model_is_reported_by_their_phones_silence(monkeypatch):
    """Two look-alike phone owners are one person of the model (their devices merge), so
    the share test has no person of the leaver's to see fall; their phone falling silent
    is the leave, reported once, at the first check (every RESELECT_EVERY sessions, five
    arriving at a time) after SILENT_DEVICE_WINDOW sessions without them. Without the
    device-silence test the leave is not reported."""
    X, dev, person = _look_alike_owners()
    last_seen = int(np.flatnonzero(person == 1)[-1])
    m, events = _stream(X, dev)
    assert m.n_persons == 1                                     # the share test's blind spot
    leaves = [i for i, kind in events if kind == "leave"]
    assert len(leaves) == 1
    assert last_seen + M.SILENT_DEVICE_WINDOW < leaves[0] <= last_seen + M.SILENT_DEVICE_WINDOW + M.RESELECT_EVERY + 5
    assert m.composition_events[-1]["gone"] == [m.person_ids[0]]
    assert not [e for e in events if e[1] == "join"]
    monkeypatch.setattr(M, "SILENT_DEVICE_MIN_SHARE", None)
    _, events = _stream(X, dev)
    assert not [e for e in events if e[1] == "leave"]


def test_a_phones_silence_is_not_reported_again_after_serialisation():
    """The restart point (``silence_from``) is stored with the model: a model restored
    after the leave was reported does not report the same silence again, and a stable
    household with both phones in use all along reports none."""
    X, dev, person = _look_alike_owners()
    last_seen = int(np.flatnonzero(person == 1)[-1])
    cut = last_seen + 45
    m, events = _stream(X[:cut], dev[:cut])
    assert [kind for _, kind in events] == ["leave"] and m.silence_from > 0
    restored = HouseholdModel.from_bytes(m.to_bytes())
    assert restored.silence_from == m.silence_from
    before = len(restored.composition_events)
    for a in range(cut, X.shape[0], 5):
        restored.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert restored.composition_events[before:] == []
    rng = np.random.default_rng(62)
    stable = [(*persona_sessions(rng, 120, 100, 21, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
              (*persona_sessions(rng, 80, 100, 21, "mobile", {"comedy": 2, "drama": 1}), "phone-b", 1)]
    _, Xs, devs, _ = household(stable)
    assert _stream(Xs, devs)[1] == []


def _own_phone_leaver(seed=31):
    """Two phone owners with different tastes (two persons of the model); the second one's
    last session is on day 45 of 90: (X, devices, the leaver's last session)."""
    rng = np.random.default_rng(seed)
    parts = [(*persona_sessions(rng, 150, 90, 20, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 0),
             (*persona_sessions(rng, 60, 45, 23, "mobile", {"horror": 2, "scifi": 1}), "phone-b", 1)]
    _, X, dev, person = household(parts)
    return X, dev, int(np.flatnonzero(person == 1)[-1])


def test_a_leaver_seen_by_the_share_test_first_is_not_reported_again_by_their_phones_silence():
    """One departure, one report: the leaver is a person of the model, so the share test
    reports them (their person marked gone); their phone then falls silent, and the
    device-silence test, which names the same person, reports nothing more (it reported
    the same person again a check later until session 35)."""
    X, dev, last_seen = _own_phone_leaver()
    m, events = _stream(X, dev)
    leaves = [i for i, kind in events if kind == "leave"]
    assert len(leaves) == 1 and last_seen < leaves[0] <= last_seen + 30
    gone = m.composition_events[-1]["gone"]
    assert len(gone) == 1 and gone[0] in m.inactive


def test_a_leaver_seen_by_their_phones_silence_first_is_not_reported_again_by_the_share_test(monkeypatch):
    """The other order: with a stricter share-test bar the share test alone reports the
    leave a check later than the phone's silence does; with both tests the silence
    reports it, marks the person gone, and the share test does not report them again."""
    X, dev, last_seen = _own_phone_leaver()
    monkeypatch.setattr(M, "LEAVE_GLR_H", 14.0)
    monkeypatch.setattr(M, "SILENT_DEVICE_MIN_SHARE", None)
    _, share_only = _stream(X, dev)
    share_at = [i for i, kind in share_only if kind == "leave"]
    monkeypatch.setattr(M, "SILENT_DEVICE_MIN_SHARE", 0.2)
    m, events = _stream(X, dev)
    leaves = [i for i, kind in events if kind == "leave"]
    assert len(share_at) == 1 and len(leaves) == 1 and leaves[0] < share_at[0]
    assert last_seen + M.SILENT_DEVICE_WINDOW < leaves[0]      # the silence's, not the share test's
    assert m.composition_events[-1]["gone"][0] in m.inactive


def test_one_departure_is_one_drift_event_through_the_service_path():
    """A stable TUNING change-suite household (smobi1s3: its second person's share falls
    and their tablet falls silent in the same check, a false alarm) streamed one session
    per arrival through the clustering service's refresh path (ModelKeeper.advance,
    bench._worlds_eval.ServiceStream): the service reports that departure once (one
    composition event, so one composition drift row), not once per test (two until
    session 35)."""
    from bench import _worlds_eval as E
    from bench import stream_tuning as S

    h = next(h for h in S.change_suite(2) if h.household_id == "smobi1s3")
    assert not h.changes
    stream = E.ServiceStream(h)
    events = []
    for _, b, _, _, new in stream.arrivals(1):
        events += [(b, e["kind"], tuple(e["gone"])) for e in new]
        if b >= 90:
            break
    leaves = [e for e in events if e[1] == "leave"]
    assert len(leaves) == 1 and leaves[0][0] == 80 and len(leaves[0][2]) == 1


def test_the_device_silence_leave_changes_no_answer(monkeypatch):
    """The device-silence test only reports: with it and without it the stream's persons,
    their ids and every session's probabilities are the same, and the only difference in
    the events is its leave."""
    X, dev, _ = _look_alike_owners(63)
    with_it, ev_with = _stream(X, dev)
    monkeypatch.setattr(M, "SILENT_DEVICE_MIN_SHARE", None)
    without, ev_without = _stream(X, dev)
    assert with_it.person_ids == without.person_ids
    a, b = with_it.assign_batch(X, device_ids=dev), without.assign_batch(X, device_ids=dev)
    assert a.person() == b.person() and np.array_equal(a.probabilities, b.probabilities)
    extra = [e for e in ev_with if e not in ev_without]
    assert [kind for _, kind in extra] == ["leave"] and len(ev_with) == len(ev_without) + 1


def _look_alike_siblings(seed=5):
    """A parent on a phone of their own (other hours and genres: a person of the model) and
    two siblings with the same habits, each on a phone of their own (one person of the
    model: their phones merge); the first sibling's last session is on day 40, the second's
    on day 51: (X, devices, the first sibling's last session, the second's)."""
    rng = np.random.default_rng(seed)
    parts = [(*persona_sessions(rng, 150, 120, 16, "mobile", {"horror": 2, "scifi": 1}), "phone-x", 0),
             (*persona_sessions(rng, 48, 40, 21, "mobile", {"comedy": 2, "drama": 1}), "phone-a", 1),
             (*persona_sessions(rng, 61, 51, 21, "mobile", {"comedy": 2, "drama": 1}), "phone-b", 2)]
    _, X, dev, person = household(parts)
    return X, dev, int(np.flatnonzero(person == 1)[-1]), int(np.flatnonzero(person == 2)[-1])


def test_a_second_leaver_whose_phone_sits_in_a_person_already_gone_is_reported():
    """review35: two leavers' phones in one person of the model. The first sibling's phone
    falls silent and that person is reported gone; the second sibling still watches after
    that report, then leaves too, before the person counts as back (``since`` < 2). Their
    phone's silence names the same gone person, and one departure, one report swallowed
    it (session 35): the second departure was never reported. A silent device used after
    its person's departure was seen (``gone_from``) is another member's departure: it is
    reported, within 30 sessions of the second sibling's last session."""
    X, dev, first_last, second_last = _look_alike_siblings()
    m, events = _stream(X, dev)
    leaves = [(i, e["gone"]) for (i, kind), e in zip(events, m.composition_events) if kind == "leave"]
    assert [kind for _, kind in events] == ["leave", "leave"]
    (first_at, first_gone), (second_at, second_gone) = leaves
    assert first_last < first_at < second_last          # the second sibling watched after the first report
    assert second_last < second_at <= second_last + 30
    assert first_gone == second_gone and first_gone[0] in m.inactive and m.n_persons == 2


def test_the_departure_point_of_a_gone_person_survives_serialisation():
    """``gone_from`` is stored with the model: restored between the first report and the
    second sibling's silence, the model reports the second departure as the one streamed
    without a restore does. Bytes stored before ``gone_from`` existed (no such key) keep
    session 35's rule: a gone person's silence is not reported."""
    from tests.helpers.model_blobs import without_meta_key

    X, dev, _, second_last = _look_alike_siblings()
    _, whole = _stream(X, dev)
    cut = second_last + 5 - (second_last % 5)           # after the first report, before the second
    m, events = _stream(X[:cut], dev[:cut])
    assert [kind for _, kind in events] == ["leave"] and m.gone_from
    restored = HouseholdModel.from_bytes(m.to_bytes())
    legacy = HouseholdModel.from_bytes(without_meta_key(m.to_bytes(), "gone_from"))
    assert restored.gone_from == m.gone_from and legacy.gone_from == {}
    new_leaves = []
    for model in (restored, legacy):
        before = len(model.composition_events)
        for a in range(cut, X.shape[0], 5):
            model.update(X[a:a + 5], device_ids=dev[a:a + 5])
        new_leaves.append([e["session_count"] for e in model.composition_events[before:] if e["kind"] == "leave"])
    assert new_leaves == [[whole[1][0]], []]


def test_the_bench_stream_yields_every_composition_event_once_at_its_session_when_the_model_keeps_few(monkeypatch):
    """bench._worlds_eval.ServiceStream.arrivals hands each arrival the composition events
    raised since the previous one. The model keeps only its newest
    COMPOSITION_EVENTS_KEPT events, and a list at that cap stays as long as new events
    come: taken by index (the list's new tail), every event after it reached the cap was
    lost (here, kept to two, a TUNING change-suite household's events at sessions 60 and
    80). Taken by session count, the stream yields the same events as with room for all,
    each once and at its own session (the arrival that folded it in)."""
    from bench import _worlds_eval as E
    from bench import stream_tuning as S

    h = next(h for h in S.change_suite(1) if h.household_id == "smobi0c5")

    def events(kept):
        monkeypatch.setattr(M, "COMPOSITION_EVENTS_KEPT", kept)
        out = []
        for _, b, _, _, new in E.ServiceStream(h).arrivals(1):
            out += [(b, int(e["session_count"]), e["kind"]) for e in new]
            if b >= 85:
                return out

    whole, capped = events(50), events(2)
    assert len(whole) >= 4 and all(b == at for b, at, _ in whole)
    assert capped == whole
