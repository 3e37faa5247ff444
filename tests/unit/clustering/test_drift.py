import numpy as np
import pytest

from services.clustering.domain import drift as D
from services.clustering.domain.simulator import BASE_EPOCH, DAY_S, simulate_household

REF = 0.4


def run(h, days=90):
    ref_end = int(np.searchsorted(h.timestamps, BASE_EPOCH + REF * days * DAY_S))
    det = D.build_detector(h.features[:ref_end])
    events = det.update(h.features[ref_end:], h.timestamps[ref_end:])
    return ref_end, events


def test_quiet_on_stable_households():
    alarms = 0
    for s in range(8):
        _, events = run(simulate_household(np.random.default_rng(100 + s), difficulty=0.3, n_persons=3))
        alarms += bool(events)
    assert alarms == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_detects_a_newcomer_after_the_change(seed):
    # Injected composition drift: from session 60 of the stream on, a person of another
    # household (a different archetype mix) starts watching alongside.
    h = simulate_household(np.random.default_rng(seed), difficulty=0.1, n_persons=2, days=120)
    other = simulate_household(np.random.default_rng(seed + 50), difficulty=0.1, n_persons=1, days=120)
    ref_end = h.n_sessions // 3
    det = D.build_detector(h.features[:ref_end])
    stream_own = h.features[ref_end:]
    first = stream_own[:60]
    rest = np.vstack([stream_own[60:], other.features[: max(40, stream_own.shape[0] - 60)]])
    rest = rest[np.random.default_rng(seed).permutation(rest.shape[0])]
    assert det.update(first) == []  # quiet before the change
    events = det.update(rest)
    assert events, "newcomer not detected"
    e = events[0]
    assert e.session_index >= 60 and e.severity >= 1.0
    assert e.type in ("behavioural", "composition", "seasonal", "gradual", "sudden")


def test_composition_kl_fires_when_a_person_leaves():
    # Synthetic stream: only one of two equally weighted persons keeps watching.
    h = simulate_household(np.random.default_rng(7), difficulty=0.1, n_persons=2, drift_type=None, days=120)
    det = D.build_detector(h.features)
    comp = det.reference.predict_proba(h.features).argmax(1)
    stay = h.features[comp == np.bincount(comp).argmin()]  # the larger person leaves
    events = det.update(np.vstack([stay] * 3))
    assert events and events[0].type == "composition" and events[0].recluster


def test_calibrate_sets_quantiles_and_validates():
    rng = np.random.default_rng(0)
    maxima = np.column_stack((rng.exponential(5, 1000), rng.exponential(3, 1000)))
    th = D.calibrate(maxima, alpha=0.02)
    assert np.mean(maxima[:, 0] > th.cusum_h) == pytest.approx(0.01, abs=0.002)
    with pytest.raises(ValueError, match="alpha"):
        D.calibrate(maxima, alpha=0.0)
    with pytest.raises(ValueError, match="maxima"):
        D.calibrate(maxima[:3])


def test_bad_stream_rejected():
    h = simulate_household(np.random.default_rng(1), n_persons=1)
    det = D.build_detector(h.features[:40])
    with pytest.raises(ValueError, match="X"):
        det.update(np.zeros((2, 3)))
    assert det.update(np.zeros((0, 35))) == []


def test_calibrate_holds_the_union_at_alpha():
    # Four statistics, correlated through a shared factor: the share of households
    # with any statistic above its threshold must be at most alpha, and each
    # threshold must leave more room than the Bonferroni level alpha / 4.
    rng = np.random.default_rng(3)
    shared = rng.exponential(1.0, 2000)
    maxima = np.column_stack([shared + rng.exponential(1.0, 2000) for _ in range(4)])
    th = D.calibrate(maxima, alpha=0.05)
    limits = np.array([th.cusum_h, th.kl_threshold, th.mmd_threshold, th.agreement_h])
    union = np.mean(np.any(maxima > limits, axis=1))
    assert union <= 0.05 and union >= 0.04
    assert np.all(np.mean(maxima > limits, axis=0) > 0.05 / 4)


def test_block_agreement_fires_when_hours_move_onto_another_member():
    # Two persons with distinct rhythms and genres; after the change person A watches
    # A's content at B's hours and on B's device: each block alone is still explained
    # by the mixture, the combination is not.
    h = simulate_household(np.random.default_rng(11), difficulty=0.1, n_persons=2, days=150)
    X = h.features.astype(np.float64)
    ref_end = h.n_sessions // 2
    det = D.build_detector(X[:ref_end], thresholds=D.DriftThresholds(np.inf, np.inf))
    stream = X[ref_end:]
    person = h.person[ref_end:]
    a, b = stream[person == 0], stream[person == 1]
    swapped = a.copy()
    m = min(a.shape[0], b.shape[0])
    when_where = np.r_[0:4, 4:10]  # hour, day of week, device (features.py layout)
    swapped[:m, when_where] = b[:m, when_where]
    det_null = D.build_detector(X[:ref_end], thresholds=D.DriftThresholds(np.inf, np.inf))
    det_null.update(np.vstack([a[:m], b[:m]]))
    det.update(np.vstack([swapped[:m], b[:m]]))
    assert det.max_agree > 2.0 * max(det_null.max_agree, 1.0)


def test_window_mmd_reacts_to_a_shifted_stream_only():
    h = simulate_household(np.random.default_rng(5), difficulty=0.1, n_persons=2, days=150)
    X = h.features.astype(np.float64)
    ref_end = h.n_sessions // 2
    quiet = D.build_detector(X[:ref_end], thresholds=D.DriftThresholds(np.inf, np.inf))
    quiet.update(X[ref_end:])
    shifted = X[ref_end:].copy()
    shifted[:, 4:10] = 0.0
    shifted[:, 7] = 1.0  # every session now on a desktop
    loud = D.build_detector(X[:ref_end], thresholds=D.DriftThresholds(np.inf, np.inf))
    loud.update(shifted)
    assert max(loud.mmd_hist) > 3.0 * max(max(quiet.mmd_hist), 1.0)


def test_batching_does_not_change_the_statistics():
    h = simulate_household(np.random.default_rng(9), difficulty=0.3, n_persons=3)
    X = h.features.astype(np.float64)
    ref_end = h.n_sessions // 3
    one = D.build_detector(X[:ref_end], thresholds=D.DriftThresholds(np.inf, np.inf))
    one.update(X[ref_end:])
    many = D.build_detector(X[:ref_end], thresholds=D.DriftThresholds(np.inf, np.inf))
    for chunk in np.array_split(X[ref_end:], 7):
        many.update(chunk)
    np.testing.assert_allclose(one.mmd_hist, many.mmd_hist, rtol=1e-9, atol=1e-9)
    assert one.max_agree == pytest.approx(many.max_agree)
    assert one.max_cusum == pytest.approx(many.max_cusum)
    assert one.max_glr > 0.0 and one.max_glr == pytest.approx(many.max_glr)


def test_refit_glr_rewards_a_persistent_change_not_a_stable_stream():
    # One of two persons switches to another person's genre mix for the whole stream:
    # a refit on block A predicts block B better than the reference; on the unchanged
    # stream it does not (the statistic is out of sample, so no in-sample gain).
    h = simulate_household(np.random.default_rng(21), difficulty=0.1, n_persons=2, days=150)
    other = simulate_household(np.random.default_rng(71), difficulty=0.1, n_persons=1, days=150)
    X = h.features.astype(np.float64)
    ref_end = h.n_sessions // 2
    free = D.DriftThresholds(np.inf, np.inf)
    stable = D.build_detector(X[:ref_end], thresholds=free)
    stable.update(X[ref_end:])
    changed_stream = X[ref_end:].copy()
    mover = h.person[ref_end:] == 0
    donor = other.features[np.arange(int(mover.sum())) % other.n_sessions]
    changed_stream[mover, 10:] = donor[:, 10:]  # content block (genres onwards) of the other household
    changed = D.build_detector(X[:ref_end], thresholds=free)
    changed.update(changed_stream)
    assert changed.max_glr > 2.0 * max(stable.max_glr, 5.0)


def test_refit_glr_needs_two_blocks_before_it_speaks():
    # Evaluated first at the 2 * GLR_WINDOW-th monitored session, then every GLR_STRIDE.
    h = simulate_household(np.random.default_rng(3), difficulty=0.3, n_persons=2)
    X = h.features.astype(np.float64)
    det = D.build_detector(X[:80], thresholds=D.DriftThresholds(np.inf, np.inf))
    stream = X[80:80 + 2 * D.GLR_WINDOW + 2 * D.GLR_STRIDE]
    phi = det.reference.family.phi(stream)
    lse = np.log(np.exp(det.reference.log_joint(stream)).sum(axis=1))
    series = D._RefitGLR(det.reference).series(phi, lse)
    expected = np.zeros(series.size, dtype=bool)
    expected[2 * D.GLR_WINDOW - 1::D.GLR_STRIDE] = True
    np.testing.assert_array_equal(np.isfinite(series), expected)
    assert np.all(series[expected] <= D.GLR_CLIP * D.GLR_WINDOW)


def test_calibrate_accepts_six_columns_and_rejects_seven():
    rng = np.random.default_rng(3)
    maxima = rng.exponential(2.0, (500, 6))
    th = D.calibrate(maxima, alpha=0.05)
    limits = np.array([th.cusum_h, th.kl_threshold, th.mmd_threshold, th.agreement_h, th.weight_h, th.glr_h])
    assert np.all(np.isfinite(limits))
    assert np.mean(np.any(maxima > limits, axis=1)) <= 0.05
    with pytest.raises(ValueError, match="maxima"):
        D.calibrate(rng.exponential(2.0, (500, 7)))


def test_person_weight_cusum_sees_a_person_leave_not_a_stable_mix():
    h = simulate_household(np.random.default_rng(7), difficulty=0.1, n_persons=3, days=150)
    X = h.features.astype(np.float64)
    ref_end = h.n_sessions // 2
    stream, person = X[ref_end:], h.person[ref_end:]
    free = D.DriftThresholds(np.inf, np.inf)
    stable = D.build_detector(X[:ref_end], thresholds=free)
    stable.update(stream)
    left = D.build_detector(X[:ref_end], thresholds=free)
    left.update(stream[person != person[0]])  # one member stops watching
    assert left.max_weight > 2.0 * max(stable.max_weight, 1.0)


def test_one_person_household_has_no_weight_statistic():
    h = simulate_household(np.random.default_rng(2), difficulty=0.1, n_persons=1, days=120)
    X = h.features.astype(np.float64)
    det = D.build_detector(X[: X.shape[0] // 2], k_max=1, thresholds=D.DriftThresholds(np.inf, np.inf))
    det.update(X[X.shape[0] // 2:])
    assert det.max_weight == 0.0


def test_stream_maxima_feed_calibrate_and_reset_rearms():
    h = simulate_household(np.random.default_rng(4), difficulty=0.3, n_persons=3)
    X = h.features.astype(np.float64)
    ref_end = h.n_sessions // 3
    det = D.build_detector(X[:ref_end])
    m = D.stream_maxima(det.reference, X[ref_end - 10:ref_end], X[ref_end:], X[:ref_end])
    assert len(m) == 6 and all(v >= 0.0 for v in m)
    # An alarm, then reset: the CUSUMs restart from zero and can alarm again.
    shifted = X[ref_end:].copy()
    shifted[:, 4:10] = 0.0
    shifted[:, 7] = 1.0
    assert det.update(shifted)
    det.reset()
    assert det.cusum == 0.0 and det.agree_cusum == 0.0 and float(det.weight_cusum.max()) == 0.0
    assert det.update(shifted)
