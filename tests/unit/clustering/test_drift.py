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
