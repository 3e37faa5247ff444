"""bench._worlds_eval's after_feedback scores what the mesh does with explicit feedback:
the label refits the household (forward_label -> RecordLabels -> a full refit) and the
feedback service's calibrator recalibrates the answers (mesh_after_feedback)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import _worlds_eval as E
from bench import worlds as W
from services.feedback.domain.evaluation import DEFAULT_FEEDBACK_RATE, feedback_mask


def _households(n: int = 2):
    return W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=n)


def _fed_batch_sample():
    """Two households, two feedback draws, their batch fits' answers and model ages: what
    ``mesh_after_feedback`` and its variants score."""
    hs = _households(2)
    return hs, E.feedback_draws(hs, draws=2), [E.hearth_batch(h)[1] for h in hs], E.model_ages(hs, "batch")


def test_feedback_draws_are_the_pooled_draws_cut_into_households():
    hs = _households(3)
    fed = E.feedback_draws(hs, draws=2, seed=4)
    total = sum(h.n_sessions for h in hs)
    for d in range(2):
        np.testing.assert_array_equal(np.concatenate([f[d] for f in fed]),
                                      feedback_mask(total, DEFAULT_FEEDBACK_RATE, 4 + d))
    assert [f[0].size for f in fed] == [h.n_sessions for h in hs]


def test_the_fed_stream_binds_its_labels_and_answers_as_the_stream():
    h = _households(2)[1]   # 156 sessions, two persons
    _, P, _ = E.hearth_stream(h)
    none = np.zeros(h.n_sessions, dtype=bool)
    unfed, calibrated, groups = E.hearth_stream_fed(h, none)
    np.testing.assert_allclose(unfed, P)
    assert calibrated.all()   # no labels: every answer goes through the feedback calibrator
    assert set(groups) == {""}
    fed = none.copy()
    fed[[70, 90]] = True
    # feedback on a stream binds to its persons (HouseholdModel.binds_labels): every
    # answer is the stream's own person (a full refit at each label answered
    # differently); the probabilities move only a little, as the keeper folds the two
    # labelled sessions in clamped to their persons at its next micro-batch
    fed_P, calibrated, groups = E.hearth_stream_fed(h, fed)
    assert calibrated.all() and set(groups) == {""}   # bound labels add no person (persons_from_labels)
    np.testing.assert_array_equal(fed_P.argmax(axis=1), P.argmax(axis=1))
    np.testing.assert_allclose(fed_P, P, atol=0.01)
    stream = E.ServiceStream(h)
    for a, b, *_ in stream.arrivals():
        if b == 75:
            stream.record_labels(["p1" if i == 70 else None for i in range(b)], b)
    assert stream.refits == [(1, "new")]          # bound, never refitted
    assert stream.envelope.model.label_map == {"p1": "p1"}


def _as_served(P: np.ndarray, group: str = "", calibrated: bool = True) -> E.FedAnswers:
    return E.FedAnswers(P, np.full(P.shape[0], calibrated), np.full(P.shape[0], group, dtype=object))


def test_the_whole_loop_scores_the_refitted_answers_with_the_calibrator():
    hs, fed, probs, ages = _fed_batch_sample()
    same = E.mesh_after_feedback(hs, probs, [[_as_served(p)] * 2 for p in probs], fed, ages, sample_before=True)
    # labels that change nothing: the loop is the calibrator alone
    assert same["labels_only"] == same["no_feedback"] and same["mesh"] == same["calibrator_only"]
    assert same["draws"] == 2 and len(same["per_draw"]["mesh"]) == 2
    # labels that make every answer sure of its person: scored on those answers
    sure = [np.eye(p.shape[1])[p.argmax(axis=1)] for p in probs]
    loop = E.mesh_after_feedback(hs, probs, [[_as_served(s)] * 2 for s in sure], fed, ages, sample_before=True)
    assert loop["labels_only"] != same["labels_only"] and loop["no_feedback"] == same["no_feedback"]
    acc = loop["accuracy_after"]
    assert abs(loop["labels_only"] - (1.0 - acc)) < 1e-9   # every answer at 1.0: ECE = 1 - accuracy


def test_the_whole_loop_calibrates_each_group_with_the_services_grouped_calibrator():
    """The loop's answers are served as ClusteringApp._answer serves them: each with the
    calibrator of the group it was stamped with (FedAnswers.groups), fitted by the
    feedback service's own fit_grouped_calibrator on the groups feedback_groups gives;
    answers left uncalibrated (FedAnswers.calibrated False) are scored as they are; the
    designs before it (one calibrator everywhere, label-shaped answers skipped) beside."""
    from services.clustering.domain.model import LABEL_SHAPED_GROUP
    hs, fed, probs, ages = _fed_batch_sample()
    plain = [[_as_served(p)] * 2 for p in probs]
    everywhere = E.mesh_after_feedback(hs, probs, plain, fed, ages, sample_before=True)
    assert everywhere["mesh"] == everywhere["mesh_calibrator_everywhere"] == everywhere["calibrator_only"]
    assert everywhere["mesh_skip_label_shaped"] == everywhere["mesh"] and everywhere["share_label_shaped"] == 0.0
    nowhere = E.mesh_after_feedback(hs, probs, [[_as_served(p, calibrated=False)] * 2 for p in probs], fed, ages,
                                    sample_before=True)
    assert nowhere["mesh"] == nowhere["labels_only"] and nowhere["share_uncalibrated"] == 1.0
    # the second household label-shaped: with the feedback fitted in the household's group
    # now and no minimum, each group gets its own calibrator (served answers differ from
    # the pooled calibrator's); with an unreachable minimum, the pooled one serves both
    shaped = [[_as_served(probs[0])] * 2, [_as_served(probs[1], LABEL_SHAPED_GROUP)] * 2]
    own = E.mesh_after_feedback(hs, probs, shaped, fed, ages, sample_before=True, min_group=1, group_of="household")
    assert own["groups_with_own_calibrator"] == 2.0 and 0 < own["share_label_shaped"] < 1
    assert own["mesh"] != own["mesh_calibrator_everywhere"]
    assert own["mesh_skip_label_shaped"] != own["mesh_calibrator_everywhere"]
    pooled = E.mesh_after_feedback(hs, probs, shaped, fed, ages, sample_before=True, min_group=10 ** 9,
                                   group_of="household")
    assert pooled["groups_with_own_calibrator"] == 0.0 and pooled["mesh"] == pooled["mesh_calibrator_everywhere"]
    # answered before any label (a batch's feedback sample), every fed answer is in the
    # default group: the label-shaped answers fall back to the pooled calibrator
    answered = E.mesh_after_feedback(hs, probs, shaped, fed, ages, sample_before=True, min_group=1,
                                     group_of="answered")
    assert answered["groups_with_own_calibrator"] == 0.0 and answered["mesh"] == pooled["mesh"]


def test_the_benchmark_reports_the_whole_loop_as_ece_after_and_the_calibrator_beside_it():
    hs = _households(1)   # one 44-session household: cheap
    alone = E.run(hs, periodic_baseline=False, feedback_mesh_draws=0)["all"]["after_feedback"]["batch"]
    assert "mesh" not in alone and "ece_after_calibrator_only" not in alone
    loop = E.run(hs, periodic_baseline=False, feedback_mesh_draws=1)["all"]["after_feedback"]["batch"]
    assert loop["ece_after"] == loop["mesh"]["mesh"] and loop["mesh"]["draws"] == 1
    assert loop["ece_after_calibrator_only"] == alone["ece_after"]


def test_the_fed_stream_runs_the_feedback_services_disagreement_refit(monkeypatch):
    """Wrong answers the feedback confirms (3 of the last 5) make the feedback service ask
    clustering for a Refit, as in the mesh: the fed stream sends it to the keeper, which
    binds a stream's labels instead of refitting it (a model not streaming is refitted)."""
    from services.common.feedback_to_clustering import is_feedback_trigger
    hs = W.generate(W.TUNING, worlds_per_family=1, households_per_world=3)
    fed = E.feedback_draws(hs, 1)
    # A household whose fed stream confirms wrong answers enough to trigger: mobi0h2's did until
    # the device-group hysteresis (7f7701d) changed its stream; of these nine TUNING households
    # livi0h1 and bing0h0 trigger now (one refit each).
    i = next(i for i, h in enumerate(hs) if h.household_id == "livi0h1")
    calls, streams = [], []
    refit = E.ServiceStream.refit

    def recorded(self, b, reason):
        calls.append((b, reason, self.envelope.model.binds_labels))
        streams.append(self)
        refit(self, b, reason)
    monkeypatch.setattr(E.ServiceStream, "refit", recorded)
    with_trigger = E.hearth_stream_fed(hs[i], fed[i][0]).probs
    assert calls and all(is_feedback_trigger(reason) for _, reason, _ in calls)
    # a stream's labels were bound, not refitted; a model not streaming was refitted
    refitted = {b for b, reason in streams[0].refits if is_feedback_trigger(reason)}
    assert refitted == {b for b, _, binds in calls if not binds}
    monkeypatch.setattr(E.ServiceStream, "refit", lambda self, b, reason: None)
    without = E.hearth_stream_fed(hs[i], fed[i][0]).probs
    if not refitted:
        np.testing.assert_allclose(with_trigger, without)


def test_the_ece_floor_is_the_ece_of_answers_right_with_exactly_their_confidence():
    """bench._clustering_eval.ece_floor: the ECE's own noise on a sample's confidences, which
    every after-feedback figure is read against (fb17, session 17)."""
    from bench._clustering_eval import ece, ece_floor
    conf = np.random.default_rng(3).uniform(0.4, 1.0, 2000)
    rng = np.random.default_rng(7)
    expected = np.mean([ece(conf, rng.random(conf.size) < conf) for _ in range(5)])
    assert ece_floor(conf, reps=5, seed=7) == expected                  # the inline figure it replaces
    assert ece_floor(conf, seed=1) == ece_floor(conf, seed=1)           # one generator per seed
    assert 0.005 < ece_floor(conf) < 0.04
    assert ece_floor(np.tile(conf, 25)) < ece_floor(conf) / 3            # noise falls with the sample
    assert ece_floor(np.ones(500)) == 0.0 and ece_floor(np.zeros(500)) == 0.0


def test_the_whole_loop_reports_its_noise_floor_and_what_a_level_per_group_would_reach():
    """mesh_after_feedback gives, beside the served figure, the binning floor of the served and
    unfed answers and the ECE of a level per calibration group fitted on the scored answers
    themselves (the most any level calibrator could do)."""
    from bench._clustering_eval import ece_floor
    hs, fed, probs, ages = _fed_batch_sample()
    same = E.mesh_after_feedback(hs, probs, [[_as_served(p)] * 2 for p in probs], fed, ages, sample_before=True)
    assert 0.0 < same["mesh_floor"] < same["mesh"] + 0.05 and 0.0 < same["no_feedback_floor"]
    held = ~np.concatenate([f[0] for f in fed])
    unfed = np.vstack([np.pad(p, ((0, 0), (0, 3 - p.shape[1]))) for p in probs])[held].max(axis=1)
    assert same["per_draw"]["no_feedback_floor"][0] == ece_floor(unfed, seed=0)
    # every answer sure of its person: one level moves them all to the accuracy, one bin, ECE 0
    sure = [np.eye(p.shape[1])[p.argmax(axis=1)] for p in probs]
    loop = E.mesh_after_feedback(hs, probs, [[_as_served(s)] * 2 for s in sure], fed, ages, sample_before=True)
    assert loop["labels_only"] > 0.01 and loop["mesh_level_per_group_ceiling"] < 1e-12


def test_the_diagnostic_reads_a_label_shaped_fit_with_the_persons_its_unlabelled_fit_found():
    """bench/feedback_why.fit_persons_answers (session 26's measurement): a batch fit whose
    labels add a person answered with the confidence maps' household shift reading the
    unlabelled fit's person count — the same person for every session, a lower
    confidence where the shift moves it (DEVICE_CONFIDENCE_SHIFT["fitted"] rises with the
    persons), and exactly the service's answers when the labels add nobody."""
    from bench.feedback_why import fit_persons_answers
    from services.clustering.domain.model import HouseholdModel
    h = _households(2)[1]   # 156 sessions, two persons
    m0 = HouseholdModel().fit(h.features, device_ids=h.device_id)
    assert m0.n_persons == 2
    labels: list[str | None] = [None] * h.n_sessions
    labels[0], labels[1], labels[2], labels[3] = "a", "a", "c", "c"
    named = HouseholdModel().fit(h.features, labels=labels[:2] + [None] * (h.n_sessions - 2), device_ids=h.device_id)
    a = named.assign_batch(h.features, device_ids=h.device_id, included=True)
    assert not named.persons_from_labels
    np.testing.assert_array_equal(fit_persons_answers(named, h, m0.n_persons, a), a.probabilities)
    labels[4], labels[5] = "b", "b"
    grown = HouseholdModel().fit(h.features, labels=labels, device_ids=h.device_id)
    assert grown.persons_from_labels and grown.n_persons == 3
    a = grown.assign_batch(h.features, device_ids=h.device_id, included=True)
    P = fit_persons_answers(grown, h, m0.n_persons, a)
    np.testing.assert_array_equal(P.argmax(axis=1), a.probabilities.argmax(axis=1))
    assert (P.max(axis=1) <= a.probabilities.max(axis=1) + 1e-9).all()
    assert P.max(axis=1).mean() < a.probabilities.max(axis=1).mean() - 0.01


def test_the_per_world_scoring_is_the_whole_loop_with_each_worlds_own_calibrator_and_level():
    """bench/feedback_per_world.score (session 28): its ``mesh`` is mesh_after_feedback's on
    the same answers; on a sample of one world each world's own calibrator is the sample's;
    a world's cross-fitted level never uses a household's own feedback (one household per
    world: no level, the loop as it is); the exact level per world on sure answers of one
    world reaches ECE 0."""
    from bench.feedback_per_world import score
    hs, fed, probs, ages = _fed_batch_sample()
    served = [[_as_served(p)] * 2 for p in probs]
    loop = E.mesh_after_feedback(hs, probs, served, fed, ages, sample_before=True)
    one = score(hs, probs, served, fed, ages, sample_before=True)
    assert one["per_draw"]["mesh"] == [round(x, 4) for x in loop["per_draw"]["mesh"]]
    assert one["per_draw"]["mesh_per_world"] == one["per_draw"]["mesh"]
    sure = [np.eye(p.shape[1])[p.argmax(axis=1)] for p in probs]
    assert score(hs, probs, [[_as_served(s)] * 2 for s in sure], fed, ages, True)["world_level_ceiling"] < 1e-12
    apart = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=1)
    assert len({h.world_id for h in apart}) == 2
    fed = E.feedback_draws(apart, draws=2)
    probs = [E.hearth_batch(h)[1] for h in apart]
    two = score(apart, probs, [[_as_served(p)] * 2 for p in probs], fed, E.model_ages(apart, "batch"), True)
    assert two["per_draw"]["mesh_world_level_crossfit"] == two["per_draw"]["mesh"]


def test_the_shipped_calibrator_scoring_is_the_whole_loop_beside_a_calibrator_fitted_elsewhere():
    """bench/feedback_shipped (session 29): its ``mesh`` is mesh_after_feedback's on the same
    answers; a deployment adds the training worlds' served level plus its own feedback's
    shrunk by the prior — with no prior variance every deployment gets the training level
    only, and with one household per world the cross-fitted level never reads a household's
    own feedback; who is answered never changes (accuracy as the labels left it)."""
    from bench.feedback_shipped import draws_of, fit_shipped, level_prior, score
    hs, fed, probs, ages = _fed_batch_sample()
    outs = [{"batch": p, "fed_batch": [_as_served(p)] * 2} for p in probs]
    sample = draws_of("tuning", hs, outs, 2)
    loop = E.mesh_after_feedback(hs, probs, [o["fed_batch"] for o in outs], fed, ages, sample_before=True)
    shipped = fit_shipped([sample])
    prior = level_prior(shipped, [sample])
    assert set(prior) >= {"mu_fed", "mu_served", "tau2"} and prior["tau2"] >= 0.0
    out = score(sample, shipped, {**prior, "tau2": 0.0})
    assert out["per_draw"]["mesh"] == [round(x, 4) for x in loop["per_draw"]["mesh"]]
    assert out["accuracy_after"] == round(float(np.mean(loop["per_draw"]["accuracy_after"])), 4)
    assert out["mean_abs_level"] == round(abs(prior["mu_served"]), 4)
    if prior["mu_served"] == 0.0:
        assert out["shipped_level"] == out["shipped"]
    apart = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=2, households_per_world=1)
    probs = [E.hearth_batch(h)[1] for h in apart]
    lone = draws_of("tuning", apart, [{"batch": p, "fed_batch": [_as_served(p)] * 2} for p in probs], 2)
    alone = score(lone, shipped, {**prior, "mu_served": 0.0, "tau2": 1.0})
    assert alone["per_draw"]["shipped_level"] == alone["per_draw"]["shipped"]
    assert alone["mean_abs_level"] == 0.0


def test_a_per_deployment_rule_chooses_between_the_shipped_calibrator_alone_and_its_level():
    """bench/feedback_shipped's rules (count30, session 30): a gate at |z| >= 0 is the design
    (shipped + level), a gate no deployment passes is the shipped calibrator alone; z is the
    deployment's level over its own noise, and James-Stein with noise multiple M leaves a level
    within sqrt(M) standard errors alone."""
    from bench.feedback_shipped import deployment_evidence, draws_of, fit_shipped, level_prior, rule_shift, score
    d, z = deployment_evidence(np.full(100, 0.8), np.r_[np.ones(50), np.zeros(50)], 0.0)
    assert d == pytest.approx(-0.3) and z == pytest.approx(-0.3 / (np.sqrt(100 * 0.16) / 100))
    assert deployment_evidence(np.full(100, 0.7), np.r_[np.ones(50), np.zeros(50)], -0.2)[0] == pytest.approx(0.0)
    assert rule_shift("js4", 0.1, 2.0, 0.05, 0.01) == 0.0
    assert rule_shift("js1", 0.1, 2.0, 0.05, 0.01) == pytest.approx(0.075)
    assert rule_shift("gate2", 0.1, 1.9, 0.05, 0.01) == 0.0 and rule_shift("gate2", 0.1, -2.1, 0.05, 0.01) == 0.05
    assert rule_shift("full2", 0.1, 2.1, 0.05, 0.01) == pytest.approx(0.11)
    assert rule_shift("over2", 0.1, 2.1, 0.05, 0.01) == 0.0 and rule_shift("over2", -0.1, -2.1, 0.05, 0.01) == pytest.approx(-0.09)
    hs, fed, probs, ages = _fed_batch_sample()
    sample = draws_of("tuning", hs, [{"batch": p, "fed_batch": [_as_served(p)] * 2} for p in probs], 2)
    shipped = fit_shipped([sample])
    prior = {**level_prior(shipped, [sample]), "tau2": 0.01}
    out = score(sample, shipped, prior, ("gate0", "gate1000"))
    assert out["per_draw"]["rule:gate0"] == out["per_draw"]["shipped_level"]
    assert out["per_draw"]["rule:gate1000"] == out["per_draw"]["shipped"]
    assert out["applied:gate1000"] == 0.0


def test_a_level_shipped_per_population_is_fitted_on_other_samples_than_the_calibrator():
    """bench/feedback_shipped --level-train (viewers31b, session 31): the calibrator is fitted on
    ``train``, the level's prior on ``level_train`` through it (one population's level carried to
    another); ``shipped_prior_level`` is the prior's served level alone — the design with no
    deployment's feedback (tau2 = 0), the shipped calibrator alone when that level is none."""
    from bench.feedback_shipped import draws_of, fit_shipped, fit_shipped_and_prior, level_prior, score
    hs, fed, probs, ages = _fed_batch_sample()
    sample = draws_of("tuning", hs, [{"batch": p, "fed_batch": [_as_served(p)] * 2} for p in probs], 2)
    other_hs = W.generate(W.TUNING, families=("bingers",), worlds_per_family=1, households_per_world=2)
    other_probs = [E.hearth_batch(h)[1] for h in other_hs]
    other = draws_of("tuning", other_hs, [{"batch": p, "fed_batch": [_as_served(p)] * 2} for p in other_probs], 2)
    shipped, prior = fit_shipped_and_prior([sample], [other])
    assert prior == level_prior(fit_shipped([sample]), [other])
    assert prior != level_prior(fit_shipped([sample]), [sample])
    assert fit_shipped_and_prior([sample])[1] == level_prior(fit_shipped([sample]), [sample])
    out = score(sample, shipped, {**prior, "tau2": 0.0})
    assert out["per_draw"]["shipped_prior_level"] == out["per_draw"]["shipped_level"]
    none = score(sample, shipped, {**prior, "mu_served": 0.0, "tau2": 0.0})
    assert none["per_draw"]["shipped_prior_level"] == none["per_draw"]["shipped"]


def _answers_of_households(miss_together: bool, n_households: int = 60, per: int = 60, seed: int = 3):
    """Calibrated answers of ``n_households`` households: each right with its confidence, or
    (``miss_together``) with its confidence + the household's own offset (+-0.15)."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.55, 0.95, n_households * per)
    account = np.repeat(np.arange(n_households), per)
    offset = rng.choice((-0.15, 0.15), n_households)[account] if miss_together else 0.0
    right = rng.random(conf.size) < np.clip(conf + offset, 0.0, 1.0)
    return conf, right, account


def test_the_household_floor_is_wider_than_the_binning_floor_when_households_miss_together():
    from bench._clustering_eval import ece_floor, household_bootstrap
    conf, right, account = _answers_of_households(miss_together=True)
    boot = household_bootstrap(conf, right, account, seed=0)
    binning = ece_floor(conf, seed=0)
    assert boot["clustered_floor"] > 1.4 * binning
    # the 95 % interval over households is wider than over answers taken one by one
    alone = household_bootstrap(conf, right, np.arange(conf.size), seed=0)
    assert boot["boot_p975"] - boot["boot_p025"] > 1.4 * (alone["boot_p975"] - alone["boot_p025"])


def test_the_household_floor_is_the_binning_floor_when_households_are_independent():
    from bench._clustering_eval import ece_floor, household_bootstrap
    conf, right, account = _answers_of_households(miss_together=False)
    boot = household_bootstrap(conf, right, account, seed=0)
    binning = ece_floor(conf, seed=0)
    assert 0.75 * binning < boot["clustered_floor"] < 1.33 * binning
    assert boot["boot_p025"] <= boot["ece"] + 0.01 and boot["boot_p975"] >= boot["ece"]


def test_the_fed_streams_member_id_does_not_depend_on_the_processs_hash_seed():
    """A member's label id on a tie (two ids answered equally often) is the one answered
    first, in every interpreter: the tie used to be broken by a set's iteration order,
    which follows Python's per-process salted ``hash`` of the strings, so identical runs
    of the benchmark labelled members differently (the streaming whole-loop ECE moved)."""
    import os
    import subprocess
    import sys

    answered = ["p7", "p3", "p3", "p7", "p12", "p12"]
    assert E.member_id(answered, 0) == "p7"
    assert E.member_id(["p3", "p7", "p7"], 0) == "p7"
    assert E.member_id([], 2) == f"p{E.NEW_MEMBER_ID + 2}"
    code = f"from bench._worlds_eval import member_id; print(member_id({answered!r}, 0))"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in (0, 1)}
    assert seen == {"p7"}
