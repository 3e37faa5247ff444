"""bench/size_tuning.py: the person-count harness records the model's own candidates and
its learned rules learn what they are shown (TUNING worlds only)."""

import numpy as np

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
