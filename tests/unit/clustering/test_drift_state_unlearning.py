"""review24: the drift detector's state kept in the envelope (drift24) is derived from the
household's sessions (the reference mixture's statistics, per-session log-densities of the
last sessions). An erasure's refit (exact unlearning by refit, ClusteringStore.erase) must
not carry it over: the envelope after ``advance(force="erasure")`` holds no drift state, and
the next fold builds a new detector over the sessions that remain instead of resuming the
one the erased sessions fed."""

from __future__ import annotations

import numpy as np

from services.clustering.domain.simulator import simulate_household
from services.clustering.household import Envelope
from services.clustering.modeling import ModelKeeper, Snapshot
from services.clustering.store import StoredSession


def _sessions(X: np.ndarray, start: np.ndarray) -> list[StoredSession]:
    return [StoredSession(f"s{i:05d}", "h", f"d{i % 3}", "tv", float(start[i]), float(start[i]), 1, 600.0, 0,
                          X[i], None, None, True) for i in range(X.shape[0])]


def _snap(sessions, X, start, keep):
    idx = np.flatnonzero(keep)
    return Snapshot([sessions[i] for i in idx], X[idx], [None] * len(idx), start[idx])


def test_an_erasure_refit_drops_the_drift_state_and_the_next_fold_rebuilds_the_detector(monkeypatch):
    import services.clustering.modeling as modeling

    h = simulate_household(np.random.default_rng(11), difficulty=0.3, n_persons=2, days=120)
    X = h.features.astype(np.float64)
    start = np.asarray(h.timestamps, dtype=np.float64)
    sessions = _sessions(X, start)
    keeper = ModelKeeper(None, lambda _a: "gmm")
    first = X.shape[0] // 2
    envelope = None
    for b in (first, first + 10, first + 20):
        step = keeper.advance(envelope, _snap(sessions, X, start, np.arange(X.shape[0]) < b), "gmm")
        envelope = Envelope.from_bytes(step.envelope.to_bytes(), None)
    assert envelope.drift_state is not None   # folds keep it (drift24)

    # device d1 erased: its sessions are gone; the unlearning refit
    kept = np.array([s.device_id != "d1" for s in sessions]) & (np.arange(X.shape[0]) < first + 20)
    step = keeper.advance(envelope, _snap(sessions, X, start, kept), "gmm", force="erasure")
    assert step.refit == "erasure"
    refitted = Envelope.from_bytes(step.envelope.to_bytes(), None)
    assert refitted.drift_state is None, "the drift state the erased sessions fed survived the erasure's refit"

    # the next fold: a detector built over what remains, not the erased sessions' resumed
    builds: list[int] = []
    real = modeling.build_detector
    monkeypatch.setattr(modeling, "build_detector", lambda X_ref, **kw: builds.append(len(X_ref)) or real(X_ref, **kw))
    later = np.array([s.device_id != "d1" for s in sessions]) & (np.arange(X.shape[0]) < first + 40)
    step = keeper.advance(refitted, _snap(sessions, X, start, later), "gmm")
    assert builds == [refitted.reference_end]
    state = step.envelope.drift_state
    assert state is not None and state["reference_end"] == refitted.reference_end
