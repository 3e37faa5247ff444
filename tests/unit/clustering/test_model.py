import numpy as np
import pytest

from bench._clustering_eval import matched_correct
from services.clustering.domain import gmm
from services.clustering.domain.model import (
    MIN_SESSIONS, HouseholdModel, ModelFormatError, PopulationPrior, ScoringTable, assign_many,
)
from services.clustering.domain.simulator import simulate_population


@pytest.fixture(scope="module")
def households():
    return [h for h in simulate_population(12, seed=21, drift_fraction=0.0) if h.n_persons >= 2][:5]


@pytest.fixture(scope="module")
def prior():
    return PopulationPrior.fit([h.features for h in simulate_population(30, seed=77)], seed=0)


def test_fit_assign_probabilities_and_ids(households):
    h = households[0]
    m = HouseholdModel().fit(h.features)
    b = m.assign_batch(h.features)
    assert m.active_variant == "gmm" and b.strategy == "gmm" and b.sessions_until_model == 0
    assert list(b.person_ids) == [f"p{i + 1}" for i in range(len(b.person_ids))]
    np.testing.assert_allclose(b.probabilities.sum(axis=1), 1.0)
    one = m.assign(h.features[3])
    assert one.person_id == b.person_ids[b.person_index[3]]
    assert one.confidence == pytest.approx(max(one.probabilities.values()))
    assert matched_correct(h.person, b.person_index).mean() > 0.75


def test_ids_are_stable_across_refit_on_permuted_sessions(households):
    h = households[1]
    m = HouseholdModel(seed=0).fit(h.features)
    before = np.array(m.assign_batch(h.features).person())
    perm = np.random.default_rng(0).permutation(h.n_sessions)
    m.seed = 5  # a different seeding and order: components come out in another order
    m.fit(h.features[perm])
    after = np.array(m.assign_batch(h.features).person())
    assert np.mean(before == after) > 0.9
    assert m.next_person - 1 >= len(m.person_ids)


def test_refit_gives_fresh_id_to_a_new_person_and_never_reuses(households):
    h = households[2]
    first = h.person != h.person.max()
    m = HouseholdModel().fit(h.features[first])
    old_ids = set(m.person_ids)
    m.fit(h.features)
    assert old_ids & set(m.person_ids)  # persons seen before keep their ids
    new = set(m.person_ids) - old_ids
    assert all(int(pid[1:]) > max(int(o[1:]) for o in old_ids) for pid in new)


@pytest.mark.parametrize("strategy", ["account", "population_prior", "heuristic"])
def test_cold_start_strategies_answer_and_say_so(strategy, prior, households):
    X = households[0].features[:6]
    m = HouseholdModel(cold_start=strategy, population_prior=prior).fit(X)
    a = m.assign(X[0])
    assert a.strategy == f"cold_start:{strategy}"
    assert a.sessions_until_model == MIN_SESSIONS - 6
    assert sum(a.probabilities.values()) == pytest.approx(1.0)
    m.update(households[0].features[6:12])
    assert m.assign(X[0]).strategy == "gmm" and m.assign(X[0]).sessions_until_model == 0


def test_population_prior_without_prior_falls_back_to_account_strategy():
    X = simulate_population(1, seed=3)[0].features[:4]
    assert HouseholdModel(cold_start="population_prior").fit(X).assign(X[0]).strategy == "cold_start:account"


def test_labels_improve_accuracy():
    hs = [h for h in simulate_population(10, seed=31, difficulty=0.6, drift_fraction=0.0) if h.n_persons >= 3][:4]
    rng = np.random.default_rng(0)
    plain, labelled = [], []
    for h in hs:
        plain.append(matched_correct(h.person, HouseholdModel().fit(h.features).assign_batch(h.features).person_index))
        mask = rng.random(h.n_sessions) < 0.15
        labels = [f"u{p}" if k else None for p, k in zip(h.person, mask)]
        m = HouseholdModel().fit(h.features, labels=labels)
        pred = np.array(m.assign_batch(h.features).person())
        labelled.append(matched_correct(h.person, m.assign_batch(h.features).person_index))
        # labelled sessions land on their label's person id
        for lab, pid in m.label_map.items():
            sel = np.array([x == lab for x in labels])
            assert np.mean(pred[sel] == pid) > 0.5  # assignment does not see labels; most agree
    assert np.concatenate(labelled).mean() > np.concatenate(plain).mean()


def test_gmm_failure_falls_back_to_kmeans_and_is_counted():
    X = simulate_population(1, seed=2)[0].features.astype(np.float64)
    m = HouseholdModel(family=gmm.GaussianFull(reg=0.0))  # one-hot columns: singular covariances
    m.fit(X)
    assert m.fallback and m.fallback_count == 1 and m.active_variant == "kmeans"
    b = m.assign_batch(X)
    assert b.strategy == "kmeans" and np.allclose(b.probabilities.sum(1), 1.0)


def test_injected_numerical_failure_takes_the_same_fallback(households):
    # HEARTH_FAULT_GMM_NUMERICAL (make verify's fault run) must exercise the real path.
    X = households[0].features
    assert not HouseholdModel().fit(X).fallback
    m = HouseholdModel().fit(X, inject_gmm_failure=True)
    assert m.fallback and m.fallback_count == 1 and m.active_variant == "kmeans"
    assert m.assign_batch(X).strategy == "kmeans"


@pytest.mark.parametrize("variant", ["gmm", "kmeans"])
def test_serialisation_round_trip(variant, households):
    h = households[3]
    m = HouseholdModel(variant=variant).fit(h.features[:-15])
    m.update(h.features[-15:])
    data = m.to_bytes()
    r = HouseholdModel.from_bytes(data)
    assert r.person_ids == m.person_ids and r.n_sessions == m.n_sessions and r.variant == variant
    np.testing.assert_array_equal(r.assign_batch(h.features).probabilities, m.assign_batch(h.features).probabilities)
    assert r.to_bytes() == data
    with pytest.raises(ModelFormatError):
        HouseholdModel.from_bytes(b"not a model")


def test_cold_start_serialisation_keeps_buffer():
    X = simulate_population(1, seed=8)[0].features[:5]
    r = HouseholdModel.from_bytes(HouseholdModel(cold_start="heuristic").fit(X).to_bytes())
    assert r.active_variant == "cold_start" and r.cold_X.shape == (5, X.shape[1])
    assert r.assign(X[0]).strategy == "cold_start:heuristic"


def test_unlearning_through_the_facade(households):
    h = households[4]
    m = HouseholdModel().fit(h.features)
    assert m.remove_sessions(np.arange(5), h.features[:5])
    assert m.n_sessions == h.n_sessions - 5
    assert m.mixture.stats[:, 0].sum() == pytest.approx(h.n_sessions - 5)


def test_assign_many_matches_per_household_assignment(households):
    models = [HouseholdModel().fit(h.features) for h in households]
    table = ScoringTable.from_models(models)
    hh = np.concatenate([np.full(h.n_sessions, i) for i, h in enumerate(households)])
    X = np.vstack([h.features for h in households])
    idx, conf, P = assign_many(table, hh, X, chunk=100)
    for i, (h, m) in enumerate(zip(households, models)):
        ref = m.assign_batch(h.features).probabilities
        got = P[hh == i][:, :ref.shape[1]]
        np.testing.assert_allclose(got, ref, atol=1e-4)
        assert np.all(P[hh == i][:, ref.shape[1]:] == 0)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="variant"):
        HouseholdModel(variant="dbscan")
    with pytest.raises(ValueError, match="cold_start"):
        HouseholdModel(cold_start="guess")
    m = HouseholdModel()
    with pytest.raises(ValueError, match="features"):
        m.fit(np.zeros((12, 3)))
    with pytest.raises(ValueError, match="NaN"):
        m.fit(np.full((12, 35), np.nan))
    with pytest.raises(ValueError, match="labels"):
        m.fit(np.zeros((12, 35)), labels=["a"])


def _device_separable_small_household() -> tuple[np.ndarray, np.ndarray]:
    """Two persons (kid on the tablet at 16h UTC, parent on the tv at 21h UTC), 15 days,
    no maturity and no series (so no kids share and no binge flag): the persons differ
    only in device, hour and genres. Sessions go through the real session builder."""
    import dataclasses

    from services.clustering.domain.sessions import build_sessions
    from services.clustering.domain.simulator import BASE_EPOCH
    from tests.helpers.households import household_events

    events, _ = household_events("a", ("kid", "parent"), days=15, start_ts=BASE_EPOCH)
    events = [dataclasses.replace(e, maturity=None, series_id=None) for e in events]
    by_device: dict[str, list] = {}
    for e in events:
        by_device.setdefault(e.device_id, []).append(e)
    sessions = sorted((s for evs in by_device.values() for s in build_sessions(evs)), key=lambda s: s.start_ts)
    X = np.array([s.features for s in sessions])
    truth = np.array([0 if s.device_type == "tablet" else 1 for s in sessions])
    return X, truth


def test_small_separable_household_gets_two_persons():
    # Nominal BIC charges ~57 parameters a person and merged these two (one person);
    # the effective parameter count used for small households separates them.
    X, truth = _device_separable_small_household()
    assert 10 <= X.shape[0] < 40 and set(truth) == {0, 1}
    m = HouseholdModel("gmm").fit(X)
    b = m.assign_batch(X)
    assert len(m.person_ids) == 2
    assert matched_correct(truth, b.person_index).mean() == 1.0
    # and the persons are not a coin toss: every session is confidently its person's
    assert b.confidence.min() > 0.9


def test_small_household_of_one_person_stays_one():
    # The lighter penalty must not split a single person's sessions: one persona, same
    # device and hour band, 20+ sessions.
    import dataclasses

    from services.clustering.domain.sessions import build_sessions
    from services.clustering.domain.simulator import BASE_EPOCH
    from tests.helpers.households import household_events

    events, _ = household_events("b", ("parent",), days=30, start_ts=BASE_EPOCH, seed=3)
    events = [dataclasses.replace(e, maturity=None, series_id=None) for e in events]
    X = np.array([s.features for s in build_sessions(events)])
    assert 10 <= X.shape[0] < 40
    assert len(HouseholdModel("gmm").fit(X).person_ids) == 1


def test_scoring_table_refuses_models_of_different_families(households):
    pooled = HouseholdModel().fit(households[0].features)
    joint = HouseholdModel(family=gmm.TypedSession()).fit(households[1].features)
    with pytest.raises(ValueError, match="family"):
        ScoringTable.from_models([pooled, joint])


def test_model_persisted_with_the_joint_family_still_loads_and_answers(households):
    # Models stored before the pooled-binge default carry no binge_lengths field.
    import io
    import json

    h = households[0]
    m = HouseholdModel(family=gmm.TypedSession()).fit(h.features)
    z = np.load(io.BytesIO(m.to_bytes()), allow_pickle=False)
    arrays = {name: z[name] for name in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    del meta["family"]["binge_lengths"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    r = HouseholdModel.from_bytes(buf.getvalue())
    assert r.family.binge_lengths == "joint"
    np.testing.assert_array_equal(r.assign_batch(h.features).probabilities, m.assign_batch(h.features).probabilities)


def _device_households(n: int):
    from bench import worlds as W
    hs = W.generate(W.TUNING, families=("mobile_first", "living_room"), worlds_per_family=1, households_per_world=4)
    return [h for h in hs if h.n_persons >= 2][:n]


def test_feedback_labels_do_not_throw_away_device_evidence():
    """Feedback reaches clustering as labels (RecordLabels) and refits the household. With
    device ids, labels on a few sessions must not make the other sessions' answers worse
    than no labels (the clamped search from label means did: TUNING 0.741 -> 0.653)."""
    rng = np.random.default_rng(5)
    plain, labelled = [], []
    for h in _device_households(5):
        fed = rng.random(h.n_sessions) < 0.05
        fed[:2] = True
        labels = [f"u{p}" if f else None for p, f in zip(h.person, fed)]
        m0 = HouseholdModel().fit(h.features, device_ids=h.device_id)
        m1 = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
        rest = ~fed
        plain.append(matched_correct(h.person[rest], m0.assign_batch(h.features, device_ids=h.device_id).person_index[rest]))
        labelled.append(matched_correct(h.person[rest], m1.assign_batch(h.features, device_ids=h.device_id).person_index[rest]))
        # every label names a person of the model
        assert set(m1.label_map) == {lab for lab in labels if lab} and set(m1.label_map.values()) <= set(m1.person_ids)
    assert np.concatenate(labelled).mean() >= np.concatenate(plain).mean() - 0.01


def test_labels_for_more_persons_than_the_fit_found_become_persons():
    from bench import worlds as W
    h = next(h for h in W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=5)
             if h.n_persons == 1)
    m0 = HouseholdModel().fit(h.features, device_ids=h.device_id)
    assert m0.n_persons == 1
    labels: list[str | None] = [None] * h.n_sessions
    labels[0], labels[1], labels[-1], labels[-2] = "a", "a", "b", "b"
    m = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
    assert set(m.label_map) == {"a", "b"} and m.n_persons >= 2
    assert len({m.label_map["a"], m.label_map["b"]}) == 2 and set(m.label_map.values()) <= set(m.person_ids)


def test_a_model_whose_persons_labels_added_says_so_through_its_bytes_and_a_refit():
    """persons_from_labels (the service then answers without the feedback calibrator,
    ClusteringApp._answer): set by labels naming more persons than the fit found, kept
    through the stream's updates and the model's bytes, cleared by a refit whose labels
    add nobody; bytes stored before the flag existed read as not shaped by labels."""
    from bench import worlds as W
    from tests.helpers.model_blobs import without_meta_key
    h = next(h for h in W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=5)
             if h.n_persons == 1)
    labels: list[str | None] = [None] * h.n_sessions
    n = h.n_sessions - 10
    labels[0], labels[1], labels[n - 1], labels[n - 2] = "a", "a", "b", "b"
    m = HouseholdModel().fit(h.features[:n], labels=labels[:n], device_ids=h.device_id[:n])
    assert m.persons_from_labels and not HouseholdModel().fit(h.features, device_ids=h.device_id).persons_from_labels
    m.update(h.features[n:], device_ids=h.device_id[n:])
    back = HouseholdModel.from_bytes(m.to_bytes())
    assert back.persons_from_labels and back.folded_in == 10
    # labels that only name the fit's one person: not shaped by them
    only_a = [lab if lab == "a" else None for lab in labels]
    assert not back.fit(h.features, labels=only_a, device_ids=h.device_id).persons_from_labels
    assert not HouseholdModel.from_bytes(without_meta_key(m.to_bytes(), "persons_from_labels")).persons_from_labels


def test_feedback_calibrator_rows_leave_population_personas_alone_and_group_label_shaped_models(prior, households):
    """The rows the service recalibrates with the feedback calibrator and the group whose
    calibrator it uses (ClusteringApp._answer), which the benchmarks score the same way:
    a cold start's answer over several population personas is left as is, a one-person
    cold start and a fitted model are recalibrated in the default group, and every answer
    of a model whose persons labels added in the label-shaped group."""
    from services.clustering.domain.model import LABEL_SHAPED_GROUP, feedback_calibrator_rows
    X = households[0].features
    cold = HouseholdModel(cold_start="population_prior", population_prior=prior).fit(X[:6])
    out = cold.assign_batch(X[:6])
    several = (out.probabilities > 0).sum(axis=1) > 1
    assert out.strategy == "cold_start:population_prior" and several.any()
    rows, group = feedback_calibrator_rows(cold, out)
    assert np.array_equal(rows, ~several) and group == ""
    one = HouseholdModel(cold_start="account").fit(X[:6])
    assert feedback_calibrator_rows(one, one.assign_batch(X[:6])).rows.all()
    fitted = HouseholdModel().fit(X)
    assert feedback_calibrator_rows(fitted, fitted.assign_batch(X)).rows.all()
    fitted.persons_from_labels = True
    rows, group = feedback_calibrator_rows(fitted, fitted.assign_batch(X))
    assert rows.all() and group == LABEL_SHAPED_GROUP


def test_a_person_the_labels_add_starts_as_its_labels_share_of_its_parent(monkeypatch):
    """Labels naming a person the fit missed split that person off the fit's person
    holding its labels (its parent): before any EM iteration it holds its labelled
    sessions and its labels' share of the parent's other sessions (here 1 of the 4
    labels the parent holds), the parent the rest — not its labelled sessions alone,
    from which EM to convergence grew it over the household's other sessions."""
    from bench import worlds as W
    from services.clustering.domain import model as M
    h = next(h for h in W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=5)
             if h.n_persons == 1)
    assert HouseholdModel().fit(h.features, device_ids=h.device_id).n_persons == 1
    labels: list[str | None] = [None] * h.n_sessions
    labels[0], labels[1], labels[2], labels[-1] = "a", "a", "a", "b"
    monkeypatch.setattr(M, "LABEL_SEED_EM_ITERS", 0)
    m = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
    rest = h.n_sessions - 4
    np.testing.assert_allclose(m.mixture.counts, [0.75 * rest + 3, 0.25 * rest + 1], rtol=1e-9)
    assert m.person_ids.index(m.label_map["a"]) == 0 and m.person_ids.index(m.label_map["b"]) == 1
    # the EM iterations move it from there, the labelled sessions staying with their labels
    monkeypatch.setattr(M, "LABEL_SEED_EM_ITERS", 5)
    m5 = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
    assert np.abs(m5.mixture.counts - m.mixture.counts).max() > 1e-3
    np.testing.assert_array_equal(m5.mixture.ledger_resp[[0, 1, 2, -1]], [[1, 0], [1, 0], [1, 0], [0, 1]])


def test_labels_that_add_a_person_do_not_make_the_other_sessions_worse():
    """Fresh TUNING worlds (4-7, the confidence maps never saw them; bench.label_feedback's
    households and feedback draws): where the labels on 3.75 % of sessions name more
    persons than the unlabelled fit found, the other sessions are answered at least as
    well as without the labels. The old rule (the new person seeded by its labelled
    sessions alone, EM to convergence) took other sessions wrongly: on these 3 draws
    0.570 of them right against 0.638 without labels."""
    from bench import _worlds_eval as E
    from bench.label_feedback import households
    hs = households("tuning", 4, 4, 5)
    with_labels, without = [], []
    for h, fed in zip(hs, E.feedback_draws(hs, 3)):
        m0 = None
        for f in fed:
            if len(set(h.person[f])) <= 1:
                continue        # labels of one person name no more persons than any fit has (unfitted)
            m0 = m0 or HouseholdModel().fit(h.features, device_ids=h.device_id)
            if len(set(h.person[f])) <= m0.n_persons:
                continue        # the labels only name the fit's persons: answers unchanged
            m1 = HouseholdModel().fit(h.features, labels=E.feedback_labels(h, f), device_ids=h.device_id)
            without.append(matched_correct(h.person, m0.assign_batch(h.features, device_ids=h.device_id).person_index)[~f])
            with_labels.append(matched_correct(h.person, m1.assign_batch(h.features, device_ids=h.device_id).person_index)[~f])
    assert len(with_labels) >= 15
    assert np.concatenate(with_labels).mean() >= np.concatenate(without).mean()


def test_labels_whose_held_out_sessions_the_grown_persons_miss_add_a_person_of_their_labels_only(monkeypatch):
    """Labels on a random 12 sessions of a one-person household name two persons, "a" on
    9 and "b" on 3 (a caller's two names for one viewer): the person split off for "b"
    and grown by EM takes sessions of the one viewer, and each labelled session held
    out is answered worse by the grown persons than by the fit's one person
    (_held_out_label_gain < 0). So "b" becomes a person of its labelled sessions alone
    and every other session keeps the fit's answer — before the check, "b" took 7 of
    the 32 other sessions (on real viewers' tuning half such growth cost the other
    sessions 0.009 of accuracy)."""
    from bench import worlds as W
    from services.clustering.domain import model as M
    h = next(h for h in W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=5)
             if h.n_persons == 1)
    assert HouseholdModel().fit(h.features, device_ids=h.device_id).n_persons == 1
    labels: list[str | None] = [None] * h.n_sessions
    for j, i in enumerate(np.random.default_rng(0).choice(h.n_sessions, 12, replace=False)):
        labels[i] = "a" if j % 4 else "b"
    rest = np.array([lab is None for lab in labels])
    m = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
    a, b = m.person_ids.index(m.label_map["a"]), m.person_ids.index(m.label_map["b"])
    np.testing.assert_allclose(m.mixture.counts[b], 3.0)
    assert (m.assign_batch(h.features, device_ids=h.device_id).person_index[rest] == a).all()
    monkeypatch.setattr(M, "LABEL_GROWTH_CHECK", False)
    grown = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
    b = grown.person_ids.index(grown.label_map["b"])
    assert (grown.assign_batch(h.features, device_ids=h.device_id).person_index[rest] == b).sum() >= 3


def test_a_household_that_grew_from_its_first_sessions_keeps_the_persons_its_labels_grow():
    """The held-out label check applies to households fitted at once only: the labels of
    the test above on a household whose model started below MIN_SESSIONS (a stream,
    grew_from_cold, kept through its bytes and refits) grow "b" as without the check."""
    from bench import worlds as W
    h = next(h for h in W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=5)
             if h.n_persons == 1)
    labels: list[str | None] = [None] * h.n_sessions
    for j, i in enumerate(np.random.default_rng(0).choice(h.n_sessions, 12, replace=False)):
        labels[i] = "a" if j % 4 else "b"
    rest = np.array([lab is None for lab in labels])
    young = HouseholdModel().fit(h.features[:5], device_ids=h.device_id[:5])
    assert young.grew_from_cold and not HouseholdModel().fit(h.features, device_ids=h.device_id).grew_from_cold
    streamed = HouseholdModel.from_bytes(young.to_bytes())
    streamed.fit(h.features, labels=labels, device_ids=h.device_id)
    assert streamed.grew_from_cold and streamed.persons_from_labels
    b = streamed.person_ids.index(streamed.label_map["b"])
    assert (streamed.assign_batch(h.features, device_ids=h.device_id).person_index[rest] == b).sum() >= 3


def test_volunteered_labels_name_a_person_but_do_not_size_it(monkeypatch):
    """The household above with label "b" volunteered (a "not me" the user gave unasked,
    feedback's unprompted): the person it names starts with its labelled session only,
    not with its labels' share of the parent, since volunteered corrections exist
    because the answer was wrong and say nothing of the person's size."""
    from bench import worlds as W
    from services.clustering.domain import model as M
    h = next(h for h in W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=5)
             if h.n_persons == 1)
    labels: list[str | None] = [None] * h.n_sessions
    labels[0], labels[1], labels[2], labels[-1] = "a", "a", "a", "b"
    volunteered = np.zeros(h.n_sessions, dtype=bool)
    volunteered[-1] = True
    monkeypatch.setattr(M, "LABEL_SEED_EM_ITERS", 0)
    m = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id, volunteered=volunteered)
    np.testing.assert_allclose(m.mixture.counts, [h.n_sessions - 1, 1], rtol=1e-9)
    assert m.person_ids.index(m.label_map["b"]) == 1
    # prompted, the same label sizes it (the test above): 1 of the 4 labels the parent holds
    prompted = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id,
                                    volunteered=np.zeros(h.n_sessions, dtype=bool))
    np.testing.assert_allclose(prompted.mixture.counts, [0.75 * (h.n_sessions - 4) + 3, 0.25 * (h.n_sessions - 4) + 1])
