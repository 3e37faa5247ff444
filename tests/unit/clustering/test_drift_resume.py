"""A fold's drift check resumes the detector from the state the previous check left in
the envelope (DriftDetector.checkpoint / resume, ModelKeeper._drift_detector) instead
of rebuilding it over the whole reference, and gives the same drift answers as the
detector fed the whole stream at once (docs/clustering.md "A fold's drift check
resumes the detector")."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.clustering.domain import drift as D
from services.clustering.domain.simulator import DRIFT_TYPES, simulate_household
from services.clustering.household import Envelope
from services.clustering.modeling import ModelKeeper, Snapshot, _drift_state
from services.clustering.store import StoredSession

# Batched matrix products round differently for another number of rows (~1e-14); the
# detector fed in pieces already differed from one fed at once by that much
# (test_drift.py::test_batching_does_not_change_the_statistics holds it to 1e-9).
TOL = 1e-9
OFF = D.DriftThresholds(np.inf, np.inf, mmd_threshold=np.inf, agreement_h=np.inf, weight_h=np.inf,
                        glr_h=np.inf)


def _low(scale: float) -> D.DriftThresholds:
    """Default thresholds scaled down, so that stable streams raise events too."""
    th = D.DEFAULT_THRESHOLDS
    return D.DriftThresholds(th.cusum_h * scale, th.kl_threshold * scale, mmd_threshold=th.mmd_threshold * scale,
                             agreement_h=th.agreement_h * scale, weight_h=th.weight_h * scale,
                             glr_h=th.glr_h * scale)


def _same_events(a: list[D.DriftEvent], b: list[D.DriftEvent]) -> None:
    assert [(e.type, e.statistic_name, e.session_index, e.change_index, e.recluster, e.time) for e in a] == \
        [(e.type, e.statistic_name, e.session_index, e.change_index, e.recluster, e.time) for e in b]
    for x, y in zip(a, b):
        assert x.severity == pytest.approx(y.severity, rel=TOL, abs=TOL)
        assert x.statistic == pytest.approx(y.statistic, rel=TOL, abs=TOL)
        assert x.kl_excess == pytest.approx(y.kl_excess, rel=TOL, abs=TOL)
        assert x.details == pytest.approx(y.details, rel=TOL, abs=TOL)


def _pieces(X, ts, ref, cuts, thresholds):
    """Feed X[ref:] cut at ``cuts``, the detector checkpointed (through JSON, as the
    envelope stores it) and resumed between pieces; returns (events, last detector)."""
    det = D.build_detector(X[:ref], thresholds=thresholds)
    events: list[D.DriftEvent] = []
    bounds = [ref, *cuts, X.shape[0]]
    for a, b in zip(bounds, bounds[1:]):
        events += det.update(X[a:b], ts[a:b])
        state = json.loads(json.dumps(det.checkpoint()))
        det = D.DriftDetector.resume(state, X[:ref], X[ref:b], thresholds=thresholds)
    return events, det


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), drift=st.sampled_from((None, *DRIFT_TYPES)),
       ref_share=st.floats(0.25, 0.6), scale=st.sampled_from((0.3, 0.6, 1.0, None)),
       cut_seed=st.integers(0, 2**31 - 1))
def test_a_resumed_detector_gives_the_same_answers_as_one_fed_the_whole_stream(seed, drift, ref_share, scale,
                                                                                cut_seed):
    h = simulate_household(np.random.default_rng(seed), difficulty=0.3, drift_type=drift, days=60)
    X = h.features.astype(np.float64)
    ts = np.asarray(h.timestamps, dtype=np.float64)
    ref = max(40, int(ref_share * X.shape[0]))
    if X.shape[0] - ref < 2:
        return
    thresholds = OFF if scale is None else _low(scale)
    whole = D.build_detector(X[:ref], thresholds=thresholds)
    expected = whole.update(X[ref:], ts[ref:])
    rng = np.random.default_rng(cut_seed)
    n_cuts = int(rng.integers(1, min(12, X.shape[0] - ref)))
    cuts = sorted(set(rng.integers(ref + 1, X.shape[0], n_cuts).tolist()))
    events, det = _pieces(X, ts, ref, cuts, thresholds)
    _same_events(events, expected)
    np.testing.assert_allclose(det.maxima(), whole.maxima(), rtol=TOL, atol=TOL)
    assert det.alarmed == whole.alarmed and det.index == whole.index
    np.testing.assert_allclose(det.weight_cusum, whole.weight_cusum, rtol=TOL, atol=TOL)
    assert (det.cusum, det.agree_cusum) == pytest.approx((whole.cusum, whole.agree_cusum), rel=TOL, abs=TOL)
    # the reference part alone: the detector as built, then the whole stream
    fresh = D.DriftDetector.resume(json.loads(json.dumps(det.checkpoint())), X[:ref], None, thresholds=thresholds)
    _same_events(fresh.update(X[ref:], ts[ref:]), expected)
    np.testing.assert_allclose(fresh.maxima(), whole.maxima(), rtol=TOL, atol=TOL)


def test_events_before_and_after_a_resume_and_the_state_holds_no_session_vector():
    # A newcomer from session 60 of the stream on (test_drift's composition change), the
    # checkpoint taken every 10 sessions as the keeper's folds take it.
    h = simulate_household(np.random.default_rng(2), difficulty=0.1, n_persons=2, days=120)
    other = simulate_household(np.random.default_rng(52), difficulty=0.1, n_persons=1, days=120)
    ref = h.n_sessions // 3
    own = h.features[ref:].astype(np.float64)
    rest = np.vstack([own[60:], other.features[: max(40, own.shape[0] - 60)]])
    X = np.vstack([h.features[:ref], own[:60], rest[np.random.default_rng(2).permutation(rest.shape[0])]])
    ts = np.arange(X.shape[0], dtype=np.float64)
    whole = D.build_detector(X[:ref])
    expected = whole.update(X[ref:], ts[ref:])
    assert expected and expected[0].session_index >= 60
    events, det = _pieces(X, ts, ref, list(range(ref + 10, X.shape[0], 10)), D.DEFAULT_THRESHOLDS)
    _same_events(events, expected)
    np.testing.assert_allclose(det.maxima(), whole.maxima(), rtol=TOL, atol=TOL)
    # no session's vector (as given or standardised) is in the state: the arrays it
    # holds are the reference mixture's statistics and per-session scalars of the last
    # windows, and none holds the bytes of the last session's vector
    state = json.loads(json.dumps(det.checkpoint()))
    packed = {k: D._unpack(v) for k, v in state.items() if isinstance(v, str)}
    assert set(packed) == {"stats", "tail_cross", "glr_lse", "weight_cusum"}
    assert packed["tail_cross"].size <= D.DEFAULT_THRESHOLDS.window - 1
    assert packed["glr_lse"].size <= 2 * D.GLR_WINDOW - 1
    for row in (X[-1], X[ref - 1], det.mmd.tail[-1]):
        for arr in packed.values():
            assert row[:4].tobytes() not in arr.tobytes()


def test_a_state_that_does_not_fit_the_sessions_is_refused():
    h = simulate_household(np.random.default_rng(4), difficulty=0.3, n_persons=2)
    X = h.features.astype(np.float64)
    ref = X.shape[0] // 2
    det = D.build_detector(X[:ref])
    det.update(X[ref:ref + 30])
    state = det.checkpoint()
    with pytest.raises(ValueError, match="does not fit"):
        D.DriftDetector.resume(state, X[:ref], X[ref:ref + 29])
    with pytest.raises(ValueError, match="does not fit"):
        D.DriftDetector.resume({**state, "v": 0}, X[:ref], X[ref:ref + 30])


# -- the keeper -----------------------------------------------------------------------


class RebuildingKeeper(ModelKeeper):
    """Main's drift check: the detector built over the reference at every fold."""

    def _drift_detector(self, state, snap, ref, reference_digest=None):
        return super()._drift_detector(None, snap, ref, reference_digest)


def _sessions(X: np.ndarray, start: np.ndarray) -> list[StoredSession]:
    return [StoredSession(f"s{i:05d}", "h", f"d{i % 3}", "tv", float(start[i]), float(start[i]), 1, 600.0, 0,
                          X[i], None, None, True) for i in range(X.shape[0])]


def _stream(keeper: ModelKeeper, X: np.ndarray, start: np.ndarray, first: int, ends: list[int],
            X_changed: np.ndarray | None = None):
    """The keeper's refreshes of a household imported with ``first`` sessions, then
    arriving up to each of ``ends`` (``X_changed``: the vectors from the arrival at
    ends[1] on, a late event having extended a session already folded in)."""
    sessions, envelope, out = _sessions(X, start), None, []
    for i, b in enumerate([first, *ends]):
        if X_changed is not None and i == 2:
            X, sessions = X_changed, _sessions(X_changed, start)
        snap = Snapshot(sessions[:b], X[:b], [None] * b, start[:b])
        step = keeper.advance(envelope, snap, "gmm")
        if step.save:
            envelope = Envelope.from_bytes(step.envelope.to_bytes(), None)   # as stored and read back
        det = (envelope.drift_state or {}).get("detector", {})
        stats = [round(float(det[k]), 9) for k in ("cusum", "agree_cusum", "max_cusum", "max_kl", "max_mmd",
                                                    "max_agree", "max_weight", "max_glr") if det.get(k) is not None]
        out.append((b, step.refit, [(d.drift_type, round(d.severity, 9), d.detected_at) for d in step.drift],
                    envelope.included, envelope.reference_end, envelope.drift_checked, stats))
    return out, envelope


def _household(seed: int, drift: str | None, share: float = 1 / 3):
    h = simulate_household(np.random.default_rng(seed), difficulty=0.3, n_persons=2, drift_type=drift, days=60)
    X = h.features.astype(np.float64)
    first = max(30, int(X.shape[0] * share))
    return X, np.asarray(h.timestamps, dtype=np.float64), first, list(range(first + 10, X.shape[0] + 1, 10))


def test_the_keeper_resumes_and_stores_what_rebuilding_at_every_fold_stores():
    # seed 23: the detector alarms at the fold of session 65 (a refit: a new reference,
    # a detector built for it at the next fold, then resumed)
    X, start, first, ends = _household(23, "composition")
    resumed, env = _stream(ModelKeeper(None, lambda _a: "gmm"), X, start, first, ends)
    rebuilt, _ = _stream(RebuildingKeeper(None, lambda _a: "gmm"), X, start, first, ends)
    assert resumed == rebuilt
    assert any(refit == "drift" and rows for _, refit, rows, *_ in resumed)
    assert env.drift_state is not None and env.drift_state["reference_end"] == env.reference_end > first


def test_a_vector_changed_after_its_fold_is_read_as_a_rebuilt_detector_reads_it():
    # a late event extends a session of the stream already folded in (same id, same
    # position: the model keeps it): the drift check reads its new vector, as main did
    X, start, first, ends = _household(31, "sudden")
    ends = ends[:3]
    X2 = X.copy()
    X2[first + 2:first + 8] = X[-6:]   # rebuilt from their events: other minutes, titles, hours
    late, _ = _stream(ModelKeeper(None, lambda _a: "gmm"), X, start, first, ends, X_changed=X2)
    rebuilt, _ = _stream(RebuildingKeeper(None, lambda _a: "gmm"), X, start, first, ends, X_changed=X2)
    assert late == rebuilt


def test_a_fold_resumes_without_rebuilding(monkeypatch):
    h = simulate_household(np.random.default_rng(11), difficulty=0.3, n_persons=2, days=120)
    X = h.features.astype(np.float64)
    start = np.asarray(h.timestamps, dtype=np.float64)
    first = X.shape[0] // 2
    import services.clustering.modeling as modeling
    builds: list[int] = []
    real = modeling.build_detector
    monkeypatch.setattr(modeling, "build_detector", lambda X_ref, **kw: builds.append(len(X_ref)) or real(X_ref, **kw))
    out, env = _stream(ModelKeeper(None, lambda _a: "gmm"), X, start, first, [first + 10, first + 20, first + 30])
    assert not any(refit for _, refit, *_ in out[1:])
    assert builds == [first]   # built at the first fold, resumed at the next two
    assert env.drift_state["detector"]["consumed"] == 30


def test_the_state_travels_in_the_envelope_header_and_an_envelope_without_it_reads_as_before():
    X = simulate_household(np.random.default_rng(4), difficulty=0.3, n_persons=2).features.astype(np.float64)
    ref = X.shape[0] // 2
    det = D.build_detector(X[:ref])
    det.update(X[ref:])
    env = Envelope(ModelKeeper(None, lambda _a: "gmm").new_model("gmm"), X.shape[0], ref, X.shape[0],
                   drift_state=_drift_state(det, ref, 0, X))
    blob = env.to_bytes()
    assert Envelope.from_bytes(blob, None).drift_state == env.drift_state
    # the header is JSON an older replica reads key by key (it ignores "drift_state"),
    # and the model bytes after it are unchanged
    (n,) = struct.unpack_from("<I", blob)
    header = json.loads(blob[4:4 + n])
    assert header["drift_state"] == env.drift_state
    env.drift_state = None
    old = env.to_bytes()
    assert "drift_state" not in json.loads(old[4:4 + struct.unpack_from("<I", old)[0]])
    assert old[-len(env.model.to_bytes()):] == blob[-len(env.model.to_bytes()):]
    assert Envelope.from_bytes(old, None).drift_state is None
