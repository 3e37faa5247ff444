"""Keeping each household model current: fit, micro-batch updates, drift checks, refits
and exact unlearning, all through compare-and-swap on the stored envelope.

Policy (why it is shaped like this):
* The model is derived from the stored closed sessions; nothing here is the only copy
  of anything. A refit on the sessions is always a correct answer, so every unusual
  case (sessions shifted by an erasure or by late events, an unreadable blob, a drift
  alarm) is handled by refitting.
* New sessions are folded in by micro-batches of ``MICRO_BATCH`` (incremental EM on
  sufficient statistics for the GMM, 1/(n+1) steps for k-means), not one by one.
* A refresh with nothing to fold in (most of those an ingest batch schedules) reads only
  the sessions closed since the model's last update (``_arrivals``, ``_answer_arrivals``); a fold, a refit
  and a drift check read them all (docs/clustering.md "The model refresh reads what
  changed").
* Each micro-batch also feeds the drift detector, whose reference is the last full
  refit; every alarm refits at once and restarts the reference (see _check_drift),
  and the model's own join/leave re-selections are stored as composition events.
* Two replicas may update one household concurrently: the store's compare-and-swap
  makes the loser re-read and redo its update on top of the winner's, so no update is
  lost (tests/integration/test_clustering_service.py).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter

from services.clustering.domain.drift import DriftDetector, build_detector
from services.clustering.domain.model import MIN_SESSIONS, PERSON_ID, HouseholdModel, PopulationPrior
from services.clustering.household import MICRO_BATCH, MIN_DRIFT_REFERENCE, Envelope
from services.clustering.store import Answers, ClosedTail, ClusteringStore, DriftRow, RefreshReads, StoredSession
from services.common.client import serving_time_left
from services.common.errors import Conflict, DeadlineExceeded
from services.common.feedback_to_clustering import is_feedback_trigger
from services.common.telemetry import pseudonym

log = logging.getLogger("hearth.clustering.modeling")
GMM_FALLBACKS = Counter("hearth_gmm_fallbacks_total", "GMM numerical failures answered by k-means")
REFITS = Counter("hearth_model_refits_total", "Full household refits", ["reason"])
DRIFT_EVENTS = Counter("hearth_drift_events_total", "Drift events detected", ["drift_type"])
# Refits a drift alarm triggered, by whether they changed the household's persons. An
# alarm whose refit keeps the same person ids is counted as a false positive (an upper
# bound: a real change of taste that keeps the persons counts too); the alert is the
# report's 5 % rate.
DRIFT_REFITS = Counter("hearth_drift_refits_total", "Drift-triggered refits by outcome", ["outcome"])
for _outcome in ("persons_changed", "persons_unchanged"):
    DRIFT_REFITS.labels(_outcome)
for _drift_type in ("composition", "seasonal", "behavioural"):   # domain/drift.py's kinds
    DRIFT_EVENTS.labels(_drift_type)
CAS_ATTEMPTS = 8


@dataclass
class Step:
    """What one refresh does (ModelKeeper.advance): ``envelope`` is the model to store
    (``save``) or, unchanged, the current one; the persons of sessions from
    ``answer_from`` on are (re-)recorded with it, those before ``included`` through the
    "settled" map (sessions the model had included before this refresh), the others at
    arrival; ``drift``: the drift events to store; ``refit``: the reason of a full refit
    ("" when none; "drift" for a drift alarm's)."""

    envelope: Envelope
    save: bool
    answer_from: int
    included: int
    drift: list[DriftRow]
    refit: str


@dataclass
class Snapshot:
    """The household's closed sessions as the model sees them."""

    sessions: list[StoredSession]
    X: np.ndarray
    labels: list[str | None]
    timestamps: np.ndarray
    # per session: its label was volunteered (feedback's unprompted), None when none was
    volunteered: np.ndarray | None = None
    # what each session's person and probabilities were when the snapshot was read
    # (ModelKeeper.snapshot), so that only the answers that change are written; None: unknown
    recorded: ClosedTail | None = None

    @property
    def device_ids(self) -> list[str]:
        """One per session: device identity is evidence for the model (a personal
        device is mostly one person, a shared TV is not)."""
        return [s.device_id for s in self.sessions]

    @property
    def first_id(self) -> str:
        return self.sessions[0].session_id if self.sessions else ""

    @property
    def last_id(self) -> str:
        return self.sessions[-1].session_id if self.sessions else ""


class ModelKeeper:
    def __init__(self, store: ClusteringStore, variant_of: Callable[[str], str],
                 population_prior: PopulationPrior | None = None, cold_start: str = "population_prior",
                 seed: int = 0, gmm_fault_prefix: str = "", model_options: dict | None = None) -> None:
        self.store = store
        # Further HouseholdModel arguments of every new model (the benchmarks' raw,
        # uncalibrated answers: {"calibrated": False}); the service passes none.
        self.model_options = model_options or {}
        # Fault injection (HEARTH_FAULT_GMM_NUMERICAL): households whose id starts with
        # this prefix get a GMM fit that fails numerically; "" = off.
        self.gmm_fault_prefix = gmm_fault_prefix
        self.variant_of = variant_of
        self.population_prior = population_prior
        self.cold_start = cold_start
        self.seed = seed
        self._decoded: dict[str, tuple[int, Envelope]] = {}
        self._lock = threading.Lock()
        # account -> (its refresh lock, refreshes running or waiting on it); see _one_refresh_at_a_time
        self._refreshing: dict[str, tuple[threading.Lock, int]] = {}

    # ---- reading --------------------------------------------------------------------

    def load(self, account_id: str, reads: RefreshReads | None = None) -> tuple[int, Envelope | None]:
        """(version, envelope) of the stored model; decoded models are cached per version.
        ``reads``: read in a refresh's one read transaction."""
        with self._lock:
            hit = self._decoded.get(account_id)
        # The store is asked every time (another replica may have saved a newer
        # version); the blob is decrypted only when the version is not the cached one.
        get_model = reads.model if reads is not None else self.store.get_model
        stored = get_model(account_id, decoded_version=hit[0] if hit else 0)
        if stored is None:
            return 0, None
        if hit and hit[0] == stored.version:
            return hit
        try:
            envelope = Envelope.from_bytes(stored.blob, self.population_prior)
        except Exception as exc:  # noqa: BLE001 - a blob we cannot read is rebuilt from sessions
            log.warning("unreadable model for %s (version %s): %s; refitting", pseudonym(account_id),
                        stored.version, exc)
            return stored.version, None
        with self._lock:
            if len(self._decoded) > 10_000:
                self._decoded.clear()
            self._decoded[account_id] = (stored.version, envelope)
        return stored.version, envelope

    def forget(self, account_id: str) -> None:
        with self._lock:
            self._decoded.pop(account_id, None)

    def drop_superseded(self) -> int:
        """Drop the decoded models whose version is no longer the stored one (another
        replica's erasure replaced or removed it; ClusteringStore.watch_erasure_fence saw it
        move): an erased household's model, or one fitted on erased sessions, is not kept in
        this process's memory until 10,000 others push it out. One read for them all; how
        many were dropped."""
        with self._lock:
            held = {account: version for account, (version, _) in self._decoded.items()}
        if not held:
            return 0
        stored = self.store.stored_model_versions(held)
        dropped = 0
        with self._lock:
            for account, version in held.items():
                hit = self._decoded.get(account)
                # a newer version decoded meanwhile (a save or a load after the read) stays
                if hit is not None and hit[0] == version and stored.get(account) != version:
                    del self._decoded[account]
                    dropped += 1
        return dropped

    def snapshot(self, account_id: str, reads: RefreshReads | None = None) -> Snapshot:
        """Every closed session (``closed_tail`` from the first: ``closed_sessions()``, with
        what each holds as its person and probabilities, so that a fold writes only the
        answers that change; ``_record_persons``). ``reads``: read in a refresh's one read
        transaction (else the store's own, one each)."""
        tail = reads.closed_tail(account_id, 0) if reads is not None else self.store.closed_tail(account_id, 0)
        snap = self.snapshot_of(account_id, tail.sessions, reads=reads)
        snap.recorded = tail
        return snap

    def snapshot_of(self, account_id: str, sessions: list[StoredSession], volunteered: bool = True,
                    reads: RefreshReads | None = None) -> Snapshot:
        """``sessions`` with their feedback labels (``volunteered``: and which labels
        were volunteered; only a fit or an update reads them)."""
        source = reads if reads is not None else self.store
        feedback_labels = source.labels(account_id)
        X = (np.vstack([s.features for s in sessions]).astype(np.float64) if sessions
             else np.zeros((0, 0)))
        labels = [feedback_labels.get(s.session_id, s.label) for s in sessions]
        unasked = source.volunteered_label_sessions(account_id) if feedback_labels and volunteered else set()
        volunteered = np.array([s.session_id in unasked for s in sessions], dtype=bool) if unasked else None
        return Snapshot(sessions, X, labels, np.array([s.start_ts for s in sessions]), volunteered)

    # ---- writing --------------------------------------------------------------------

    def new_model(self, variant: str) -> HouseholdModel:
        return HouseholdModel(variant, cold_start=self.cold_start, population_prior=self.population_prior,
                              seed=self.seed, **self.model_options)

    def fit(self, snap: Snapshot, base: HouseholdModel | None, variant: str, account_id: str = "") -> Envelope:
        """Full fit on every closed session. Starting from ``base`` keeps person ids
        stable (new components are matched to the old persons); the parameters depend
        only on the sessions, so after an erasure this *is* the model fitted without
        the erased sessions."""
        model = base if base is not None else self.new_model(variant)
        model.variant = variant
        model.population_prior = self.population_prior
        model.bind_id_labels(snap.labels)   # feedback labels name persons by their ids: keep them
        had_fallbacks = model.fallback_count
        if snap.sessions:
            model.fit(snap.X, labels=snap.labels if any(snap.labels) else None, device_ids=snap.device_ids,
                      volunteered=snap.volunteered,
                      inject_gmm_failure=bool(self.gmm_fault_prefix) and account_id.startswith(self.gmm_fault_prefix))
        if model.fallback_count > had_fallbacks:
            GMM_FALLBACKS.inc()
        n = len(snap.sessions)
        return Envelope(model, included=n, reference_end=n, drift_checked=n, first_session_id=snap.first_id,
                        last_refit=time.time(), last_included_id=snap.last_id)

    def refresh(self, account_id: str, *, force: str = "", retire: str = "") -> tuple[int, Envelope | None]:
        """Bring the stored model up to date with the stored sessions. ``force`` (a
        reason) makes it a full refit; ``retire`` is an erased person whose id must not
        come back. Returns the (version, envelope) now stored."""
        # Sessions stored under an older feature schema are rebuilt first; when that
        # changed vectors (unknown genre names), the model fitted on the old ones is
        # refitted. (A crash between the two leaves the old model until the household's
        # next full refit: its sessions are already current.)
        with self._one_refresh_at_a_time(account_id):
            return self._refresh(account_id, force, retire)

    def refreshes_of(self, account_id: str) -> int:
        """How many refreshes of the household run or wait in this process (0 or 1 running)."""
        with self._lock:
            return self._refreshing.get(account_id, (None, 0))[1]

    @contextmanager
    def _one_refresh_at_a_time(self, account_id: str) -> Iterator[None]:
        """One refresh of a household at a time in this process; the others wait for it.
        Why: an ingest queues the background refresh, and an assignment of a household
        with no model yet refreshes too (ClusteringApp._model); both fitted the same
        sessions at once, each with half the CPU (the GIL), and the loser of the
        compare-and-swap read the winner's model afterwards anyway. On a 2-core machine at
        load 10-16 the assignment took 18.9 s instead of one fit's time and the gateway
        answered 504 at its 10 s deadline (tests/e2e/test_mesh.py, session 25). Waiting,
        the assignment gets the model the running refresh stores (one fit), and waits no
        longer than the deadline of the RPC it serves. Replicas still meet at the store's
        compare-and-swap."""
        with self._lock:
            lock, users = self._refreshing.get(account_id, (threading.Lock(), 0))
            self._refreshing[account_id] = (lock, users + 1)
        try:
            left = serving_time_left()
            if not lock.acquire(timeout=-1 if left is None else left):
                raise DeadlineExceeded("the household's model is being refitted; the deadline passed waiting for it")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._lock:
                lock, users = self._refreshing[account_id]
                if users > 1:
                    self._refreshing[account_id] = (lock, users - 1)
                else:
                    del self._refreshing[account_id]

    def _refresh(self, account_id: str, force: str, retire: str) -> tuple[int, Envelope | None]:
        upgraded = checked = False
        attempts = 0
        while attempts < CAS_ATTEMPTS:
            # The refresh's reads — the feature schema's check, the model, the closed
            # sessions (the tail since the model's last update, or all of them) and their
            # labels — in ONE read transaction, one snapshot of the database (session 34;
            # ClusteringStore.refresh_reads): before, five transactions, and a write
            # committed between two of them mixed two states into what was fitted.
            variant = self.variant_of(account_id)   # may ask the feedback service: not inside the transaction
            with self.store.refresh_reads() as reads:
                stale = not checked and reads.feature_schema_stale(account_id)
                if not stale:
                    version, current = self.load(account_id, reads)
                    if upgraded and current is not None and not force:
                        force = "feature_schema"
                    arrivals = (self._arrivals(account_id, current, variant, reads)
                                if current is not None and not force and not retire else None)
                    snap = self.snapshot(account_id, reads) if arrivals is None else None
            if stale:
                # Sessions stored under an older feature schema are rebuilt first (a write),
                # then read again; once a refresh, as before (an old replica may go on
                # storing them).
                upgraded, checked = self.store.upgrade_feature_vectors(account_id) > 0, True
                continue
            checked = True
            attempts += 1
            if arrivals is not None:
                self._answer_arrivals(account_id, current, *arrivals)
                return version, current
            step = self.advance(current, snap, variant, force=force, retire=retire, account_id=account_id)
            if step is None:
                return version, None
            if not step.save:
                self._record_persons(account_id, snap, step.envelope, start=step.answer_from)
                return version, current
            blob = step.envelope.to_bytes()
            # The model, its drift events and its sessions' answers in one write
            # transaction (ClusteringStore.save_model), written only if the
            # compare-and-swap wins: the answers are computed before it opens, so that it
            # holds the household's lock for the writes alone.
            try:
                new_version = self.store.save_model(account_id, version, step.envelope.model.active_variant, blob,
                                                    drift=step.drift,
                                                    answers=self._answers(snap, step.envelope, included=step.included))
            except Conflict:
                continue  # another replica updated it: redo on top of theirs
            for row in step.drift:
                DRIFT_EVENTS.labels(row.drift_type).inc()
            with self._lock:
                self._decoded[account_id] = (new_version, step.envelope)
            return new_version, step.envelope
        raise Conflict(f"household model of {account_id!r} kept changing; try again", "account_id")

    def _arrivals(self, account_id: str, current: Envelope, variant: str, reads: RefreshReads
                  ) -> tuple[ClosedTail, Snapshot | None] | None:
        """The refresh of a model whose included sessions are in place when nothing is to
        be folded in (``advance`` would neither save nor refit): the sessions closed since
        the model's last update are answered by the current model, as ``advance``'s Step
        records them, from the store's closed tail alone (``_answer_arrivals``, after the
        reads). None when ``advance`` would save, refit or fold in: the caller takes the
        full snapshot. Why: an ingest batch schedules a refresh, and a stream of small
        batches mostly closes no session; the full snapshot read and decrypted every closed
        session of the household each time (docs/clustering.md "The model refresh reads
        what changed"). Returns the tail and its sessions' snapshot (None: no session)."""
        tail = reads.closed_tail(account_id, current.included)
        if not sessions_in_place(current, variant, tail.count, tail.first_id, lambda: tail.before_id):
            return None
        if folds_in(current, tail.count):
            return None
        # advance's Step(current, False, current.included, ...)
        return tail, (self.snapshot_of(account_id, tail.sessions, volunteered=False, reads=reads)
                      if tail.sessions else None)

    def _answer_arrivals(self, account_id: str, current: Envelope, tail: ClosedTail, snap: Snapshot | None) -> None:
        if snap is None:
            return
        persons, probs = persons_for(current.model, snap.sessions, snap.labels, snap.X,
                                     included=np.arange(len(snap.sessions)) < 0)
        # Only what changes is written: the same model answers the same sessions
        # the same at every batch until the next fold (a write transaction each).
        changed = {s: p for s, p in persons.items() if not tail.recorded_as(s, p, probs[s])}
        if changed:
            self.store.set_persons(account_id, changed, {s: probs[s] for s in changed})

    def advance(self, current: Envelope | None, snap: Snapshot, variant: str, *, force: str = "",
                retire: str = "", account_id: str = "") -> Step | None:
        """What one refresh does to the household's model, without the store: given the
        stored envelope (None: no model yet) and the closed sessions, the envelope to
        store and which answers to record (Step); None when there is nothing to model.
        Why apart from ``refresh``: the streaming benchmark (bench/_worlds_eval.
        stream_steps) calls this same decision on world households, so every stream
        figure is the service's path (micro-batches, answers of smaller arrivals with
        the current model, drift-alarm refits, feedback binding or refitting) and not
        a second copy of it that could drift apart from it."""
        if not snap.sessions and current is None:
            return None
        drift: list[DriftRow] = []
        sessions_kept = current is not None and sessions_in_place(
            current, variant, len(snap.sessions), snap.first_id,
            lambda: snap.sessions[current.included - 1].session_id)
        if (force == "labels" or is_feedback_trigger(force)) and sessions_kept and current.model.binds_labels:
            # A stream is not refitted for feedback (HouseholdModel.binds_labels):
            # the labels bind to its persons; its drift reference and the sessions
            # still to fold in stay as they were. Nor for the feedback service's Refit
            # (its household disagreement trigger): on TUNING worlds 4-7 (144 fed
            # streams, 3 draws each) that refit cost the other sessions 0.019 / 0.034
            # of accuracy and the labels-only ECE rose 0.032 -> 0.038 / 0.040 -> 0.068
            # (docs/benchmarks.md, session 12).
            model = _private_copy(current.model)
            model.reserve_label_ids(snap.labels)
            envelope = Envelope(model, current.included, current.reference_end, current.drift_checked,
                                current.first_session_id, current.last_refit, current.last_included_id,
                                current.drift_state)
            return Step(envelope, True, 0, current.included, [], "")
        if not sessions_kept or force:
            reason = force or ("new" if current is None else "sessions_changed"
                               if current.model.variant == variant else "variant_changed")
            base = _private_copy(current.model) if current else None
            if retire:
                base = base or self.new_model(variant)
                base.retire_person(retire)
            envelope = self.fit(snap, base, variant, account_id)
            REFITS.labels(refit_reason_label(reason)).inc()
            if reason != refit_reason_label(reason):   # the caller's words go to the log
                log.info("refit of %s: %s", pseudonym(account_id), reason[:200])
            # a full fit includes every session
            return Step(envelope, True, 0, len(snap.sessions), [], reason)
        new = len(snap.sessions) - current.included
        if new <= 0:
            return Step(current, False, len(snap.sessions), 0, [], "")
        if not folds_in(current, len(snap.sessions)):
            # Not enough to fold into the model yet, but the new sessions get their
            # persons now (the current model assigns them, at arrival).
            return Step(current, False, current.included, 0, [], "")
        sessions_before = current.model.n_sessions
        envelope = self._update(current, snap)
        drift = self._check_drift(envelope, snap)
        drift += _composition_rows(envelope.model, sessions_before, snap)
        refit = ""
        if any(d.refit_triggered and d.drift_type != "composition" for d in drift):
            persons_before = tuple(envelope.model.person_ids)
            envelope = self.fit(snap, envelope.model, variant, account_id)
            REFITS.labels("drift").inc()
            DRIFT_REFITS.labels("persons_unchanged" if tuple(envelope.model.person_ids) == persons_before
                                else "persons_changed").inc()
            refit = "drift"
        # the sessions before this update were included; the rest arrive now
        return Step(envelope, True, 0, current.included, drift, refit)

    def _update(self, current: Envelope, snap: Snapshot) -> Envelope:
        lo = current.included
        model = _private_copy(current.model)
        labels = snap.labels[lo:]
        before = model.fallback_count
        model.update(snap.X[lo:], labels=labels if any(labels) else None, device_ids=snap.device_ids[lo:])
        if model.fallback_count > before:
            GMM_FALLBACKS.inc()
        reference_end = current.reference_end
        if current.model.n_sessions >= MIN_SESSIONS and reference_end < MIN_SESSIONS:
            reference_end = len(snap.sessions)   # the first full model is the reference
        return Envelope(model, len(snap.sessions), reference_end, current.drift_checked, snap.first_id,
                        current.last_refit, snap.last_id, current.drift_state)

    def _check_drift(self, envelope: Envelope, snap: Snapshot) -> list[DriftRow]:
        ref = envelope.reference_end
        state, envelope.drift_state = envelope.drift_state, None
        if ref < MIN_DRIFT_REFERENCE or envelope.model.mixture is None:
            envelope.drift_checked = len(snap.sessions)
            return []
        try:
            # the reference's digest once a check (the state is checked against it and the
            # new state records it: ~1-3 ms a digest at 2,548 reference sessions)
            reference_digest = _sessions_digest(snap.X[:ref])
            detector, start = self._drift_detector(state, snap, ref, reference_digest)
            events = detector.update(snap.X[start:], snap.timestamps[start:])
            envelope.drift_state = _drift_state(detector, ref, self.seed, snap.X, reference_digest)
        except (ValueError, ArithmeticError) as exc:
            log.warning("drift check skipped: %s", exc)
            return []
        # Every alarm refits, not only a "recluster" one: the detector fires as its
        # statistic crosses the threshold (severity ~1), so severe-only refits almost
        # never happened and a new member or new habits stayed out of the model. The
        # thresholds hold false alarms to their stated budget, so refits stay rare, and
        # a refit on the stored sessions is always a correct answer that also restarts
        # the drift reference (the number of persons is re-selected in it).
        rows = [DriftRow(e.type, float(e.severity), float(e.statistic),
                         float(e.time if e.time is not None else time.time()), True)
                for e in events if ref + e.session_index >= envelope.drift_checked]
        envelope.drift_checked = len(snap.sessions)
        return rows

    def _drift_detector(self, state: dict | None, snap: Snapshot, ref: int,
                        reference_digest: str | None = None) -> tuple[DriftDetector, int]:
        """The drift detector of the reference ``snap.X[:ref]`` and the position from
        which the sessions are still to be fed to it: the previous check's detector
        resumed from its state when that state is of this reference and the sessions
        it consumed are the ones it saw (digest), so a fold feeds only the sessions
        closed since; otherwise built anew (the reference mixture fitted, the window
        MMD's n x n kernel over the reference) and fed the whole stream since the
        reference, as every fold did until session 24.

        Why a state in the envelope and not a detector cached in the process: the
        detector's build is a pure function of the reference sessions and its stream
        state a function of the sessions after them, so a cached detector would be
        right too, but it holds the standardised reference vectors (n x features, in
        the clear) between folds days apart, which this process does not keep
        (session 21's reason for not keeping opened values). The state holds no
        vector (DriftDetector.checkpoint: the reference mixture's statistics, which
        the model's own mixture resembles, a few scalars and per-session log-densities
        of the last sessions), travels sealed with the model under the household's
        data key, is dropped with the model at every refit (an erasure's too), and is
        updated by the same compare-and-swap as the model. Bounding the reference
        instead would change the drift answers; rebuilding incrementally cannot give
        the same ones (the kernel's bandwidth is the median over all reference pairs,
        and the reference only grows at a refit, which changes everything).
        Same answers: tests/unit/clustering/test_drift_resume.py. ``reference_digest``:
        ``_sessions_digest(snap.X[:ref])`` when the caller has it."""
        if reference_digest is None:
            reference_digest = _sessions_digest(snap.X[:ref])
        if state is not None and state.get("reference_end") == ref and state.get("seed") == self.seed \
                and state.get("reference_digest") == reference_digest:
            try:
                seen = ref + int(state["detector"]["consumed"])
                if seen <= len(snap.sessions) and state.get("stream_digest") == _sessions_digest(snap.X[ref:seen]):
                    return DriftDetector.resume(state["detector"], snap.X[:ref], snap.X[ref:seen]), seen
                # A session after the reference changed since (a late event extended a
                # session the clock had closed): the stream is fed again from the
                # reference on, the reference's part (the O(n^2) one) still reused.
                return DriftDetector.resume(state["detector"], snap.X[:ref], None), ref
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("drift state not resumed (%s): the detector is rebuilt", exc)
        return build_detector(snap.X[:ref], seed=self.seed), ref

    def _record_persons(self, account_id: str, snap: Snapshot, envelope: Envelope, start: int = 0,
                        included: int = 0) -> None:
        """Store each session's person and probabilities (what ResolvePersons and
        GetHousehold serve); ``start``: only sessions from that position on;
        ``included``: the first sessions the model included before this update, whose
        answers are re-recorded through the "settled" confidence map (in-sample answers
        of a streamed model are right more often than at arrival at the same posterior);
        the others are answered at arrival."""
        answers = self._answers(snap, envelope, start, included)
        if answers is not None:
            self.store.set_persons(account_id, *answers)

    def _answers(self, snap: Snapshot, envelope: Envelope, start: int = 0, included: int = 0) -> Answers | None:
        """``_record_persons``' answers (``set_persons``' arguments after the account), None
        when there is no session from ``start`` on."""
        sessions = snap.sessions[start:]
        if not sessions:
            return None
        persons, probs = persons_for(envelope.model, sessions, snap.labels[start:], snap.X[start:],
                                     included=np.arange(start, len(snap.sessions)) < included)
        # Only the answers that change are written. A fold re-answers every included
        # session with the updated model ("settled" answers), so most rows do change, but
        # not all: 0-1,359 of ~2,600 a fold were already stored as answered
        # (bench.refresh_cpu --fold, 1,200 days; session 26), and each row is an UPDATE.
        return persons, probs, snap.recorded.recorded if snap.recorded is not None else None


def _sessions_digest(X: np.ndarray) -> str:
    """A digest of the feature vectors a drift state was computed from (shape and bytes):
    the state is resumed only over the very same sessions (ModelKeeper._drift_detector).
    Kept in the sealed envelope with the state; a 128-bit hash of float vectors reveals
    nothing usable of them."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    h = hashlib.blake2b(digest_size=16)
    h.update(np.array(X.shape, dtype=np.int64).tobytes())
    h.update(X.tobytes())
    return h.hexdigest()


def _drift_state(detector: DriftDetector, ref: int, seed: int, X: np.ndarray,
                 reference_digest: str | None = None) -> dict | None:
    """The envelope's drift state after ``detector`` consumed the sessions after the
    reference ``X[:ref]`` (whose ``_sessions_digest`` is ``reference_digest``;
    ModelKeeper._drift_detector); None when the detector cannot be resumed (then the next
    check rebuilds it)."""
    try:
        det_state = detector.checkpoint()
    except ValueError:
        return None
    seen = ref + int(det_state["consumed"])
    if reference_digest is None:
        reference_digest = _sessions_digest(X[:ref])
    return {"reference_end": ref, "seed": seed, "reference_digest": reference_digest,
            "stream_digest": _sessions_digest(X[ref:seen]), "detector": det_state}


def sessions_in_place(current: Envelope, variant: str, closed: int, first_id: str,
                      last_included_id: Callable[[], str]) -> bool:
    """Whether the closed sessions the model included are still the ones it saw, so new
    ones can be folded in (otherwise the keeper refits): the same variant, the same first
    session, at least as many closed sessions as it included, and (``_included_in_place``)
    the one at its last included position (``last_included_id()``, asked only then) the
    one it included last. ``advance`` asks it of a snapshot, ``refresh``'s arrivals-only
    path of the store's closed tail: one decision."""
    return current.first_session_id == first_id and current.included <= closed \
        and current.model.variant == variant and _included_in_place(current, last_included_id)


def _included_in_place(current: Envelope, last_included_id: Callable[[], str]) -> bool:
    """The sessions the model included still hold their positions: the one at its last
    included position is the one it included last. Sessions are ordered by start, but
    close one gap after their END (by the clock): a TV session of 20:00-23:00 closes after
    a phone session of 21:00-21:30 and lands before it. Checking only the first session
    (as until session 13) let such a session shift every later position: the keeper
    folded the session before it in twice, never folded it in, and never recorded its
    person (ResolvePersons answered nothing for it). A shift refits, like any other
    change of the session list."""
    if not current.last_included_id or current.included == 0:
        return True
    return last_included_id() == current.last_included_id


def folds_in(envelope: Envelope, closed: int) -> bool:
    """Whether a refresh of a household with ``closed`` closed sessions (and the same
    first session) folds new ones into ``envelope``'s model: a model in its cold start
    folds in every arrival, a warm one waits until MICRO_BATCH sessions are new and
    answers fewer with the model as it is. Not folding in is the settled state: the
    answers move only when more sessions (or labels) arrive (GET /v1/household's
    ``status.settled``)."""
    new = closed - envelope.included
    return new > 0 and (new >= MICRO_BATCH or envelope.model.n_sessions < MIN_SESSIONS)


# The keeper's own reasons for a full refit; any other is a Refit request's free text.
REFIT_REASONS = ("new", "sessions_changed", "variant_changed", "labels", "erasure", "feature_schema", "drift")


def refit_reason_label(reason: str) -> str:
    """hearth_model_refits_total's ``reason``: the keeper's own reasons as they are, a
    feedback trigger's Refit "feedback_trigger", any other Refit "requested". Why: the
    Refit RPC's reason is free text (an operator's words, a trigger's id and figures),
    and every distinct label value is a new time series in Prometheus."""
    if reason in REFIT_REASONS:
        return reason
    return "feedback_trigger" if is_feedback_trigger(reason) else "requested"


for _reason in (*REFIT_REASONS, "feedback_trigger", "requested"):   # every series from the start
    REFITS.labels(_reason)


def _private_copy(model: HouseholdModel) -> HouseholdModel:
    """A copy of a cached model to update or refit. The cached one is what readers
    (assign, GetHousehold) are using at this moment; changed in place, a reader could
    see a refit's new persons with the old person ids (an IndexError, seen once the
    streaming newcomer test made updates longer), and a save that loses its CAS would
    leave the cache holding an update that was never stored. The population prior is
    shared, not copied (read-only, and the largest part)."""
    prior = model.population_prior
    return copy.deepcopy(model, {id(prior): prior} if prior is not None else None)


def _composition_rows(model: HouseholdModel, sessions_before: int, snap: Snapshot) -> list[DriftRow]:
    """The model's own re-selection of the number of persons (a member joined or left)
    during the last update, as drift events the service reports: type "composition",
    severity 1, statistic = persons after, at the start time of the session where it
    was decided; refit_triggered because the model refitted its persons."""
    rows = []
    for event in model.composition_events:
        if event.get("session_count", 0) <= sessions_before:
            continue
        at = min(max(int(event["session_count"]) - 1, 0), len(snap.timestamps) - 1)
        rows.append(DriftRow("composition", 1.0, float(event.get("persons", model.n_persons)),
                             float(snap.timestamps[at]) if len(snap.timestamps) else time.time(), True))
    return rows


def persons_for(model: HouseholdModel, sessions: list[StoredSession], labels: list[str | None],
                X: np.ndarray | None = None, included: bool | np.ndarray = False,
                ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Each session's person and probabilities under ``model`` (one vectorised call;
    device ids as evidence), a labelled session being its labelled person; ``included``
    (bool or per session): sessions the model already includes (HouseholdModel.assign_batch)."""
    if X is None:
        X = np.vstack([s.features for s in sessions]).astype(np.float64)
    batch = model.assign_batch(X, device_ids=[s.device_id for s in sessions], included=included)
    ids = batch.person_ids
    persons = {s.session_id: ids[int(i)] for s, i in zip(sessions, batch.person_index)}
    # tolist(): Python floats at once (the same values as float() of each numpy scalar)
    probs = {s.session_id: {pid: round(p, 6) for pid, p in zip(ids, row)}
             for s, row in zip(sessions, batch.probabilities.tolist())}
    # Constrained assignment: a session whose person is known is that person.
    for s, label in zip(sessions, labels):
        known = known_person(model, label)
        if known is not None:
            persons[s.session_id] = known
            probs[s.session_id] = {known: 1.0}
    return persons, probs


def known_person(model: HouseholdModel, label: str | None) -> str | None:
    """The person id a label stands for (feedback labels are person ids; profile hints
    are names the model maps to ids), or None when unknown to the model. A person a
    stream has reserved an id for but not fitted yet (HouseholdModel.reserve_label_ids)
    is known: the caller said who it was, and the next full refit keeps that id."""
    if not label:
        return None
    pid = model.label_map.get(label, label if PERSON_ID.fullmatch(label) else None)
    if pid in model.person_ids:
        return pid
    return pid if label in model.label_map and pid in model.reserved_person_ids() else None
