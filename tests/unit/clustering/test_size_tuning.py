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
