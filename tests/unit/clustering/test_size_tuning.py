"""bench/size_tuning.py: the person-count harness records the model's own candidates and
its learned rules learn what they are shown (TUNING worlds only)."""

import numpy as np
import pytest

from bench import size_tuning as S, worlds as W
from services.clustering.domain import gmm as G, model as M


def test_candidates_are_the_models_own_and_the_recording_leaves_the_model_untouched():
    before = (G.fit_em, M.fit_em, M.fit_select_k, M.HouseholdModel._tv_only_seedings,
              M.HouseholdModel._place_shared_sessions, M.HouseholdModel._merge_same_hours)
    h = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=3)[2]
    hh = S.household_candidates(h)
    after = (G.fit_em, M.fit_em, M.fit_select_k, M.HouseholdModel._tv_only_seedings,
             M.HouseholdModel._place_shared_sessions, M.HouseholdModel._merge_same_hours)
    assert after == before
    ks = sorted({c["k"] for c in hh["candidates"]})
    assert len(ks) >= 3 and ks[-1] <= M.K_MAX
    assert hh["true"] == h.n_persons and hh["sessions"] == h.n_sessions
    # The model's own fit and the harness' record of it agree on the count the BIC rule picks
    # (a device-first household: placement re-estimates persons, it does not add any).
    if hh["device_first"]:
        assert S._bic_choice(hh)["k"] == hh["fitted"]
    fitted = M.HouseholdModel().fit(h.features, device_ids=h.device_id)
    assert np.unique(fitted.assign_batch(h.features, device_ids=h.device_id).person_index).size == hh["fitted"]


def _synthetic_household(rng, true_k: int, family: str) -> dict:
    # The candidate with the true count is the only one whose persons are hour-separable.
    cands = []
    for k in range(1, 5):
        cands.append({"k": k, "loglik": -1000.0 + 30 * k + rng.normal(), "charge": 20.0 * k,
                      "bic": 2000.0 - 60 * k + 20 * k, "hours_z_min": 4.0 if k == true_k else -1.0,
                      "who_z_min": 5.0, "smallest_share": 0.2, "born": 0, "accuracy": 0.9 if k == true_k else 0.5})
    return {"household": f"{family}{true_k}", "family": family, "sessions": 100, "device_first": True,
            "true": true_k, "fitted": 1, "fitted_accuracy": 0.5, "candidates": cands}


def test_candidate_logit_learns_a_feature_that_tells_the_true_count():
    rng = np.random.default_rng(0)
    train = [_synthetic_household(rng, int(rng.integers(1, 5)), "a") for _ in range(40)]
    test = [_synthetic_household(rng, k, "b") for k in (1, 2, 3, 4)]
    rule = S.CandidateLogit().fit(train)
    assert [rule.choose(h)["k"] for h in test] == [1, 2, 3, 4]
    assert S.score(test, rule.choose)["size_exact"] == 1.0
    # BIC alone, on the same candidates, always takes the largest: wrong for three of four.
    assert S.score(test, S._bic_choice)["size_exact"] == 0.25


def test_count_error_cause_names_each_kind_of_wrong_count():
    assert S.count_error_cause(3, 3, True, 2, 2, 0) == "exact"
    assert S.count_error_cause(3, 2, False, 0, 0, 2) == "shared_only_under"
    assert S.count_error_cause(1, 2, False, 0, 0, 0) == "shared_only_over"
    assert S.count_error_cause(2, 3, True, 2, 3, 0) == "owner_devices_apart"
    assert S.count_error_cause(2, 3, True, 2, 2, 0) == "born_not_there"
    assert S.count_error_cause(3, 2, True, 3, 2, 0) == "owners_merged"
    assert S.count_error_cause(3, 2, True, 2, 2, 1) == "member_without_device_not_born"
    assert S.count_error_cause(3, 2, True, 2, 2, 0) == "other_under"


def test_diagnosis_of_a_household_agrees_with_the_models_fit_and_its_truth():
    h = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=3)[2]
    row = S.diagnose_household(h)
    fitted = M.HouseholdModel().fit(h.features, device_ids=h.device_id)
    assert row["fitted"] == np.unique(fitted.assign_batch(h.features, device_ids=h.device_id).person_index).size
    assert row["true"] == h.n_persons
    # A missed member is one the Hungarian match leaves without a fitted person: at least
    # true - fitted of them.
    assert len(row["missed"]) >= h.n_persons - row["fitted"]
    assert sum(m["sessions"] for m in row["missed"]) <= h.n_sessions
    summary = S.diagnosis([row, {**row, "fitted": row["true"] + 1, "cause": "born_not_there"}])
    assert summary["all"]["households"] == 2 and summary["all"]["over"] >= 1
    assert sum(summary["causes"].values()) == 2
    # single-person households kept: a share when there are some, None (not NaN) when not
    assert summary["single_kept"] == (None if row["true"] > 1 else 0.5)
    # sessions lost: the model's and the device heuristic's wrong sessions, by cause
    wrong = int(h.n_sessions - round(row["accuracy"] * h.n_sessions))
    assert row["lost"] == wrong and 0 <= row["heuristic_lost"] <= h.n_sessions
    assert summary["sessions_lost"]["born_not_there"] == {"lost": wrong, "heuristic_lost": row["heuristic_lost"],
                                                          "sessions": h.n_sessions}
    assert summary["session_accuracy"] == round(1.0 - wrong / h.n_sessions, 4)


def test_diagnosis_counts_two_person_households_answered_as_one_and_their_lost_sessions():
    base = {"family": "f", "sessions": 100, "groups": 1, "owners": 1, "accuracy": 0.7, "missed": [],
            "heuristic_lost": 40}
    rows = [{**base, "household": "a", "true": 2, "fitted": 1, "lost": 30, "cause": "member_without_device_not_born"},
            {**base, "household": "b", "true": 2, "fitted": 2, "lost": 10, "cause": "exact"},
            {**base, "household": "c", "true": 3, "fitted": 1, "lost": 50, "cause": "owners_merged"}]
    summary = S.diagnosis(rows)
    assert summary["two_persons_answered_as_one"] == {"households": 1, "lost": 30}
    assert summary["sessions_lost"]["owners_merged"] == {"lost": 50, "heuristic_lost": 40, "sessions": 100}
    assert summary["session_accuracy"] == 0.7 and summary["heuristic_session_accuracy"] == 0.6


def test_movielens_tuning_worlds_are_the_even_half(monkeypatch):
    """--movielens-tuning draws the real viewers' TUNING half (split="tuning"), never the
    reported one, and keeps the worlds asked for."""
    from bench import worlds_movielens

    calls = []

    def fake_generate(worlds_per_family, split):
        calls.append((worlds_per_family, split))
        return [W.WorldHousehold(f"movielens-tuning-solo-w{w}-h0", "solo", f"movielens-tuning-solo-w{w}",
                                 np.zeros((1, 1)), np.zeros(1), np.array(["d"]), np.array(["tv"]), np.zeros(1),
                                 np.zeros(1), 0.0) for w in range(worlds_per_family)]

    monkeypatch.setattr(worlds_movielens, "generate", fake_generate)
    hs = S._worlds("1:3", movielens=True)
    assert calls == [(3, "tuning")]
    assert [h.world_id for h in hs] == ["movielens-tuning-solo-w1", "movielens-tuning-solo-w2"]


def test_heldout_folds_are_time_blocks_dealt_round_robin():
    folds = S.heldout_folds(100, folds=5, block=8)
    assert folds.tolist()[:17] == [0] * 8 + [1] * 8 + [2]
    # Every fold holds early and late sessions (a member who joins late is in every
    # fold's training part), and neighbours within a block share their fold.
    for f in range(5):
        rows = np.flatnonzero(folds == f)
        assert rows.min() < 40 and rows.max() >= 60


def _tv_sessions(rng, n: int, hours: list[float], genres: list[int]) -> np.ndarray:
    """Synthetic TV sessions: start hour near one of ``hours``, any weekday, one genre
    of ``genres`` each (F's layout)."""
    from services.clustering.domain import features as F
    X = np.zeros((n, F.FEATURE_DIM))
    hour = (rng.choice(hours, n) + rng.normal(0.0, 0.7, n)) % 24.0
    dow = rng.integers(0, 7, n) + 0.5
    X[:, F.HOUR.start], X[:, F.HOUR.start + 1] = np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)
    X[:, F.DOW.start], X[:, F.DOW.start + 1] = np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)
    X[:, F.DEVICE.start + F.DEVICE_TYPES.index("tv")] = 1.0
    X[np.arange(n), F.GENRE.start + rng.choice(genres, n)] = 1.0
    X[:, F.LOG_MINUTES] = rng.normal(4.0, 0.3, n)
    X[:, F.LOG_TITLES] = np.log1p(1.0)
    return X


def _one_and_two(X: np.ndarray, split: np.ndarray) -> tuple[G.Mixture, G.Mixture]:
    fam = G.TypedSession()
    rng = np.random.default_rng(0)
    one, _ = G.fit_em(X, 1, fam, rng, init_labels=np.zeros(X.shape[0], dtype=np.int64))
    two, _ = G.fit_em(X, 2, fam, rng, init_labels=split)
    return one, two


def test_hours_given_rest_is_a_distribution_over_the_hour_cells():
    rng = np.random.default_rng(1)
    X = np.vstack((_tv_sessions(rng, 80, [8.0], [0, 1]), _tv_sessions(rng, 80, [21.0], [6, 9])))
    _, two = _one_and_two(X, np.repeat([0, 1], 80))
    # One session's genre and lengths, at every (weekday/weekend, two-hour bin) cell:
    # the probabilities of the cells given the rest sum to one.
    from services.clustering.domain import features as F
    cells = np.repeat(X[:1], 24, axis=0)
    hour = np.tile(np.arange(1.0, 24.0, 2.0), 2)
    dow = np.repeat([2.5, 5.5], 12)
    cells[:, F.HOUR.start], cells[:, F.HOUR.start + 1] = np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)
    cells[:, F.DOW.start], cells[:, F.DOW.start + 1] = np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)
    assert G.rhythm_cells(cells).sum(axis=0).tolist() == [1.0] * 24
    assert np.exp(S.hours_given_rest_loglik(two, cells)).sum() == pytest.approx(1.0, abs=1e-9)


def test_heldout_hours_gain_only_when_the_persons_differ_in_when_they_watch():
    rng = np.random.default_rng(2)
    # Two people: different genres at different hours. One person: two kinds (genres)
    # of viewing at the same hours.
    two_people = np.vstack((_tv_sessions(rng, 120, [8.0, 13.0], [0, 1]), _tv_sessions(rng, 120, [20.0, 23.0], [6, 9])))
    one_person = np.vstack((_tv_sessions(rng, 120, [8.0, 20.0], [0, 1]), _tv_sessions(rng, 120, [8.0, 20.0], [6, 9])))
    order = rng.permutation(240)
    split = np.repeat([0, 1], 120)[order]
    folds = S.heldout_folds(240)
    gains = {}
    for name, X in (("two", two_people[order]), ("one", one_person[order])):
        one, two = _one_and_two(X, split)
        whole_1, hours_1 = S.heldout_loglik(X, one, None, one.family, folds)
        whole_2, hours_2 = S.heldout_loglik(X, two, None, two.family, folds)
        gains[name] = (whole_2 - whole_1, hours_2 - hours_1)
    # The whole sessions' held-out likelihood rises with the kind split as well (why it
    # cannot choose the count: docs/clustering.md 4h) ...
    assert gains["one"][0] > 50 and gains["two"][0] > 50
    # ... the hours given the rest only when the two differ in their hours.
    assert gains["two"][1] > 50
    assert gains["one"][1] < 5


def _household(family: str, world: str, true: int, extra_gain: float) -> dict:
    cands = [{"k": k, "bic": 100.0 * (k != 2), "heldout": -500.0 + k, "heldout_hours": -300.0 + extra_gain * (k - 2),
              "smallest_share": 0.3, "hours_z_min": 2.0, "who_z_min": 4.0, "born": k - 2, "accuracy": 0.8}
             for k in (2, 3, 4)]
    return {"household": f"{world}-{true}", "family": family, "world": world, "sessions": 120, "device_first": True,
            "true": true, "fitted": 2, "fitted_accuracy": 0.8, "candidates": cands}


def test_heldout_rules_step_up_from_bic_only_while_the_hours_gain():
    assert S._bic_then_heldout_hours(_household("a", "a-w0", 3, 5.0))["k"] == 4
    assert S._bic_then_heldout_hours(_household("a", "a-w0", 3, -5.0))["k"] == 2
    assert S._heldout_choice(_household("a", "a-w0", 3, 0.0))["k"] == 4


def test_learned_rules_are_scored_on_groups_they_were_not_trained_on():
    seen: list[set] = []

    class Recording:
        def fit(self, hhs):
            self.families = {h["family"] for h in hhs}
            seen.append(self.families)
            return self

        def choose(self, hh):
            assert hh["family"] not in self.families
            return S._bic_choice(hh)

    hhs = [_household(f, f"{f}-w{w}", 2, 1.0) for f in ("a", "b", "c") for w in range(2)]
    result = S._held_out_groups(Recording, hhs, "family")
    assert len(seen) == 3 and result["households"] == 6 and result["size_exact"] == 1.0
    # The learned acceptance learns a gain that tells the count, and takes k + 1 with it.
    train = [_household("a", "a-w0", 3, 4.0 + i) for i in range(10)] + [_household("a", "a-w0", 2, -4.0 - i) for i in range(10)]
    rule = S.AcceptRule().fit(train)
    assert rule.choose(_household("b", "b-w0", 3, 6.0))["k"] == 3
    assert rule.choose(_household("b", "b-w0", 2, -6.0))["k"] == 2


def test_accept_from_two_never_splits_a_household_bic_counted_as_one():
    def single(gain: float, true: int) -> dict:
        hh = _household("a", "a-w0", true, gain)
        for c in hh["candidates"]:
            c["k"] -= 1            # candidates 1, 2, 3; BIC's choice is one person
        return hh
    train = ([_household("a", "a-w0", 3, 4.0 + i) for i in range(10)] + [_household("a", "a-w0", 2, -4.0 - i) for i in range(10)]
             + [single(6.0, 2) for _ in range(5)])
    assert S.AcceptRule().fit(train).choose(single(6.0, 1))["k"] == 2
    assert S.AcceptFromTwo().fit(train).choose(single(6.0, 1))["k"] == 1
    assert S.AcceptFromTwo().fit(train).choose(_household("b", "b-w0", 3, 6.0))["k"] == 3


def _two_viewers(hours_b: float, genre_b: int) -> W.WorldHousehold:
    """Two members on one TV: member 0 at 20:00 watching genre 0, member 1 at ``hours_b``
    watching genre ``genre_b``."""
    from services.clustering.domain import features as F
    n = 40
    person = np.repeat([0, 1], n // 2)
    X = np.zeros((n, F.FEATURE_DIM), dtype=np.float32)
    X[person == 0, F.GENRE.start] = 1.0
    X[person == 1, F.GENRE.start + genre_b] = 1.0
    day = np.arange(n) * 86_400.0
    start = day + np.where(person == 0, 20.0, hours_b) * 3600.0
    return W.WorldHousehold("h", "f", "w", X, person, np.array(["tv"] * n), np.array(["tv"] * n),
                            start, np.full(n, 3600.0), 0.0)


def test_member_evidence_names_what_a_missed_member_leaves():
    assert S.member_evidence(_two_viewers(20.0, 0), 1, owns_device=True) == "own personal device"
    assert S.member_evidence(_two_viewers(9.0, 0), 1, owns_device=False) == "shared, other hours"
    # 22:00 against 20:00 is under MEMBER_HOUR_GAP: the same hours; then the genre mix decides
    assert S.member_evidence(_two_viewers(22.0, 1), 1, owns_device=False) == "shared, same hours, taste apart"
    assert S.member_evidence(_two_viewers(22.0, 0), 1, owns_device=False) == "shared, same hours, same taste"
    # the hour is circular: 23:00 and 01:00 are 2 hours apart, not 22
    h = _two_viewers(1.0, 0)
    h.start_ts[h.person == 0] += 3 * 3600.0
    assert S.member_evidence(h, 1, owns_device=False) == "shared, same hours, same taste"


def test_diagnosis_counts_missed_members_by_evidence_and_true_size():
    base = {"family": "f", "sessions": 100, "groups": 0, "owners": 0, "accuracy": 0.7, "lost": 30,
            "heuristic_lost": 40, "cause": "shared_only_under"}
    miss = {"sessions": 20, "own_devices": 0}
    rows = [{**base, "household": "a", "true": 2, "fitted": 1, "missed": [{**miss, "evidence": "shared, other hours"}]},
            {**base, "household": "b", "true": 3, "fitted": 1,
             "missed": [{**miss, "evidence": "shared, other hours"}, {**miss, "evidence": "own personal device"}]},
            # an over-count's unmatched members are not "missed" by an under-count
            {**base, "household": "c", "true": 2, "fitted": 3, "cause": "born_not_there",
             "missed": [{**miss, "evidence": "own personal device"}]}]
    by = S.diagnosis(rows)["missed_by_evidence"]
    assert by == {"2": {"own personal device": 0, "shared, other hours": 1},
                  "3": {"own personal device": 1, "shared, other hours": 1}}


def test_hours_z_against_host_tells_a_member_at_other_hours_from_one_at_the_same():
    """A missed member whose sessions a fitted person took: told apart from that person's
    other sessions by the hours when they watch at other hours, not when at the same."""
    rng = np.random.default_rng(0)
    apart, alike = _two_viewers(9.0, 0), _two_viewers(20.0, 1)
    from services.clustering.domain import features as F
    for h in (apart, alike):   # an hour of scatter, and the hour written into the features
        h.start_ts[:] += rng.uniform(-3600.0, 3600.0, h.n_sessions)
        angle = 2.0 * np.pi * (h.start_ts % 86_400.0) / 86_400.0
        h.features[:, F.HOUR] = np.column_stack((np.sin(angle), np.cos(angle)))
    one_person = np.zeros(40, dtype=np.int64)   # the fit took everyone as one person
    assert S.hours_z_against_host(apart, one_person, 1) >= 3.0
    assert S.hours_z_against_host(alike, one_person, 1) < 2.0
    # a member the fit gave a person of their own has no host's other sessions to compare
    assert np.isnan(S.hours_z_against_host(apart, apart.person.copy(), 1))
