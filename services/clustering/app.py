"""Use cases of the clustering service: what one RPC does, over the store and the
domain modules. Servicers call exactly one method here."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from prometheus_client import Counter, Gauge

from services.common import strict_json
from services.clustering.domain import features as F
from services.clustering.domain.events import MAX_EVENTS_PER_BATCH, ViewingEvent
from services.clustering.domain.persons import PERSONAL_DEVICE_TYPES, own_and_shared_devices
from services.common.ids import check_id
from services.common.text import MAX_REASON_CHARS, check_text
from services.clustering.domain.model import (MIN_SESSIONS, PRIOR_MAX_HOUSEHOLDS, BatchAssignment, HouseholdModel,
                                             PopulationPrior, feedback_calibrator_rows, population_prior)
from services.clustering.batch_scoring import score_households
from services.clustering.household import Envelope
from services.clustering.modeling import ModelKeeper, folds_in, known_person, persons_for
from services.clustering.prediction_log import (PredictionLog, PredictionRecord, PredictionRun, PredictionRuns,
                                                SessionPerson)
from services.clustering.store import ClusteringStore, HouseholdView, IngestResult, StoredSession
from services.common.consent import ConsentChecker
from services.common.erasure import ErasureOutcome, ErasureScope
from services.common.errors import InvalidArgument, NotFound, naming_the_item
from services.common.identity import Principal
from services.common.permissions import Permission, principal_allowed
from services.common.failure_log import FailureLog
from services.common.calibration import IDENTITY, Calibrator

log = logging.getLogger("hearth.clustering.app")
MAX_LABELS = 10_000
# The households the background refresh takes from its queue at a time: their variants are
# asked in one call; each is still refreshed on its own (ClusteringApp._refresh_one).
REFRESH_BATCH = 500
MAX_SOURCE_CHARS = 64   # a label's source, e.g. "feedback:profile_confirmed"
# No label per genre name: callers choose the names, so a label would be unbounded.
UNKNOWN_GENRE_EVENTS = Counter("hearth_unknown_genre_events_total",
                               "Events received carrying a genre name outside the genre vocabulary")
UNKNOWN_GENRE_POLICIES = ("hash", "other", "reject")
# The erasure fence as this replica watches it (HEARTH_ERASURE_FENCE_S; store.py). Its read
# failing only logged until review30: a replica whose reads lapse trusts no held model
# version (every answer asks the database) and an operator saw nothing. Alert
# HearthErasureFenceStale (docs/deploy.md): the age past the bound.
ERASURE_FENCE_READ_AGE = Gauge("hearth_erasure_fence_read_age_seconds",
                               "Seconds since this replica's last successful read of the erasure fence began "
                               "(+Inf before the first; 0 when it does not watch the fence)")
ERASURE_FENCE_BOUND = Gauge("hearth_erasure_fence_seconds",
                            "HEARTH_ERASURE_FENCE_S: a held model version is trusted only while the last "
                            "read of the erasure fence began within this (0 when not watching)")
ERASURE_FENCE_READ_FAILURES = Counter("hearth_erasure_fence_read_failures_total",
                                      "Reads of the erasure fence that failed (the database unreachable)")
ERASURES_SEEN = Counter("hearth_erasure_fence_moves_seen_total",
                        "Erasures completed anywhere (moves of the erasure fence) this replica has seen")
SUPERSEDED_MODELS_DROPPED = Counter("hearth_erasure_fence_models_dropped_total",
                                    "Decoded models dropped because the fence moved and their version "
                                    "is no longer the stored one")


@dataclass
class HouseholdExtras:
    persons: list = field(default_factory=list)
    drift_events: list = field(default_factory=list)
    model_version: int = 0
    model_variant: str = ""
    # model status: has the model caught up with the closed sessions?
    sessions_in_model: int = 0
    sessions_pending: int = 0
    # the keeper has caught up (modeling.folds_in): answers move only with new sessions or labels
    settled: bool = False
    last_refit: float = 0.0
    n_persons: int = 0
    next_page_token: str = ""
    # genre names outside the vocabulary in the household's sessions -> events
    unknown_genres: dict[str, int] = field(default_factory=dict)


def encode_page_token(cursor: tuple[float, str] | None) -> str:
    """Opaque keyset cursor (start time, session id) of the next page."""
    if cursor is None:
        return ""
    return base64.urlsafe_b64encode(json.dumps([cursor[0], cursor[1]]).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        start, session_id = strict_json.loads(raw)
        if (not isinstance(start, (int, float)) or isinstance(start, bool) or not math.isfinite(start)
                or not isinstance(session_id, str)):
            # NaN / Infinity (json.loads reads them) compare differently in SQLite and
            # PostgreSQL (an empty page or every session): never issued, so refused.
            raise ValueError("bad cursor")
        check_id(session_id, "page_token")
        return float(start), session_id
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError, InvalidArgument):
        raise InvalidArgument("is not a page token this service issued", "page_token") from None


@dataclass(frozen=True)
class AssignmentOut:
    person_id: str
    confidence: float
    probabilities: dict[str, float]
    model_variant: str
    model_version: int
    cold_start: str            # "" when the full model answered, else the strategy
    sessions_until_full_model: int
    prediction_id: str


@dataclass(frozen=True)
class Answers:
    """One household's answers to several sessions, column by column: what AssignSessions
    encodes its protobuf from without an object a session (servicer.assignments_response).
    Row ``r`` is ``AssignmentOut(person_ids[r], probabilities[r][person_ids[r]],
    probabilities[r], model_variant, model_version, cold_start, sessions_until_full_model,
    prediction_ids[r])`` (``outs``)."""

    person_ids: list[str]
    probabilities: list[dict[str, float]]
    prediction_ids: list[str]
    model_variant: str
    model_version: int
    cold_start: str
    sessions_until_full_model: int

    def outs(self) -> list[AssignmentOut]:
        return [AssignmentOut(pid, probs[pid], probs, self.model_variant, self.model_version, self.cold_start,
                              self.sessions_until_full_model, prediction_id)
                for pid, probs, prediction_id in zip(self.person_ids, self.probabilities, self.prediction_ids)]


def prediction_ids(n: int) -> list[str]:
    """``n`` prediction ids of 128 random bits each (as uuid4), from one read of os.urandom."""
    hexed = os.urandom(16 * n).hex()
    return ["pr-" + hexed[i:i + 32] for i in range(0, 32 * n, 32)]


class ClusteringApp:
    def __init__(self, store: ClusteringStore, consent: ConsentChecker | None = None, *,
                 keeper: ModelKeeper | None = None, predictions: PredictionLog | None = None,
                 calibrator_of=None, background: bool = True, unknown_genres: str = "hash",
                 erasure_fence_s: float | None = None, warm_variants=None) -> None:
        if unknown_genres not in UNKNOWN_GENRE_POLICIES:
            raise ValueError(f"unknown_genres must be one of {UNKNOWN_GENRE_POLICIES}, got {unknown_genres!r}")
        self.store = store
        # A genre name outside the vocabulary: "hash" / "other" = counted (in a hashed
        # genre slot / in "other": the store's vocabulary places it) and reported
        # (metric, model status); "reject" = the ingest is refused naming it.
        self.unknown_genres = unknown_genres
        # Consent (privacy service); None = not enforced (unit tests).
        self.consent = consent
        self.keeper = keeper or ModelKeeper(store, lambda _account: "gmm")
        self.predictions = predictions
        self.calibrator_of = calibrator_of or (lambda _variant: IDENTITY)
        # The variants of the households a refresh batch takes, asked in one call before
        # it (FeedbackPeer.warm_variants; the keeper's variant_of then finds them cached).
        self.warm_variants = warm_variants or (lambda _accounts: None)
        self._pending: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        # One traceback per run of identical failures (a database outage), not one per account.
        self.refresh_failures = FailureLog(log, "background model refresh")
        self._worker = threading.Thread(target=self._refresh_loop, name="model-refresh", daemon=True)
        if background:
            self._worker.start()
        # The erasure fence (HEARTH_ERASURE_FENCE_S; store.py, MODEL_CONFIRM_S): watched by a
        # thread of its own, and every Erase waits it out. None: neither (unit tests with
        # one replica).
        self.erasure_fence_s = erasure_fence_s
        self._stopping = threading.Event()
        self.fence_failures = FailureLog(log, "erasure fence read")
        if erasure_fence_s is not None:
            ERASURE_FENCE_BOUND.set(erasure_fence_s)
            ERASURE_FENCE_READ_AGE.set_function(store.erasure_fence_read_age_s)
            self._watch_fence()   # the first read before the first request
            threading.Thread(target=self._fence_loop, name="erasure-fence", daemon=True).start()

    # ---- consent, ingest -------------------------------------------------------------

    def require_processing(self, account_ids) -> None:
        """FAILED_PRECONDITION (field account_id) when an account withdrew consent to
        processing; called before anything is stored or processed (ingest, assignment,
        feedback labels, refit)."""
        if self.consent is not None:
            self.consent.require(account_ids, ("processing",))

    def ingest(self, events: list[ViewingEvent]) -> IngestResult:
        accounts = [e.account_id for e in events]
        with naming_the_item(accounts, "events"):   # a withdrawn household: which item
            self.require_processing(accounts)
        unknown = [(i, names) for i, e in enumerate(events) if (names := self.store.vocabulary.unknown(e.genres))]
        if unknown and self.unknown_genres == "reject":
            i, names = unknown[0]
            raise InvalidArgument(f"genre {names[0]!r} is not in the genre vocabulary "
                                  "(HEARTH_GENRE_ALIASES maps a name to a feature genre)", f"events[{i}].genres")
        UNKNOWN_GENRE_EVENTS.inc(len(unknown))
        with naming_the_item(accounts, "events"):   # an erased household (its key destroyed): nothing stored
            result = self.store.ingest(events)
        if result.sessions_touched:
            for account in {e.account_id for e in events}:
                self.schedule_refresh(account)
        return result

    # ---- the model kept current in the background ---------------------------------

    def schedule_refresh(self, account_id: str) -> None:
        with self._queued_lock:
            if account_id in self._queued:
                return
            self._queued.add(account_id)
        self._pending.put(account_id)

    def _refresh_loop(self) -> None:
        while True:
            accounts = self._next_refreshes()
            # Their variants in one feedback call (``warm_variants``; session 32: a big
            # batch's thousands of refreshes asked one GetExperiment each).
            wanted = [a for a in accounts if a is not None]
            if wanted:
                try:
                    self.warm_variants(wanted)
                except Exception:  # noqa: BLE001 - each refresh then asks for its own, as before
                    log.debug("variants not warmed", exc_info=True)
            for account in accounts:
                if account is None:
                    return
                self._refresh_one(account)

    def _next_refreshes(self) -> list[str | None]:
        """The queued households, waiting for the first, up to REFRESH_BATCH (None: stop,
        after those queued before it)."""
        accounts = [self._pending.get()]
        while accounts[-1] is not None and len(accounts) < REFRESH_BATCH:
            try:
                accounts.append(self._pending.get_nowait())
            except queue.Empty:
                break
        return accounts

    def _refresh_one(self, account: str) -> None:
        """One household's refresh, on its own: a failure (its key erased, a fit that
        fails, the database) is counted and logged, and the next household is refreshed
        (each refresh is its own transactions: one household's failure rolls back no
        other's)."""
        with self._queued_lock:
            self._queued.discard(account)
        try:
            self.keeper.refresh(account)
        except Exception:  # noqa: BLE001 - the next ingest or assignment retries
            self.refresh_failures.failed()
        else:
            self.refresh_failures.succeeded()
        finally:
            self._pending.task_done()

    def _fence_loop(self) -> None:
        while not self._stopping.wait(self.erasure_fence_s / 4):
            self._watch_fence()

    def _watch_fence(self) -> None:
        """One read of the fence (one thread calls this: __init__'s first, then the loop's)."""
        before = self.store.erasure_fence_epoch
        try:
            if self.store.watch_erasure_fence(self.erasure_fence_s):
                SUPERSEDED_MODELS_DROPPED.inc(self.keeper.drop_superseded())
        except Exception:  # noqa: BLE001 - the database down: the held versions lapse within the fence
            ERASURE_FENCE_READ_FAILURES.inc()
            self.fence_failures.failed()
        else:
            self.fence_failures.succeeded()
        after = self.store.erasure_fence_epoch
        if before is not None and after is not None and after > before:
            ERASURES_SEEN.inc(after - before)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until queued refreshes are done (tests, graceful stop)."""
        deadline = time.monotonic() + timeout_s
        while self._pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._stopping.set()
        self._pending.put(None)
        if self._worker.is_alive():
            self._worker.join(10)
        if self.predictions is not None:
            self.predictions.close()

    # ---- assignment ------------------------------------------------------------------

    def _model(self, account_id: str) -> tuple[int, Envelope]:
        version, envelope = self.keeper.load(account_id)
        if envelope is None:
            version, envelope = self.keeper.refresh(account_id)
        if envelope is None:
            raise NotFound(f"no sessions for account {account_id!r} yet", "account_id")
        return version, envelope

    def assign(self, account_id: str, *, session_id: str = "", vector: np.ndarray | None = None) -> AssignmentOut:
        check_id(account_id, "account_id")
        self.require_processing([account_id])
        device_id = ""
        label = None
        session = None
        if session_id:
            check_id(session_id, "session_id")
            # The session and its feedback label in one read transaction.
            session, feedback_label = self.store.labelled_session(account_id, session_id)
            vector, device_id = session.features, session.device_id
            span = (session.start_ts, session.end_ts)
            label = feedback_label if feedback_label is not None else session.label
        if vector is None:
            raise InvalidArgument("a session_id or a feature_vector is required", "session")
        # The session's person is stored with the prediction in one group commit when
        # the prediction log can (one fsync for a batch of concurrent assignments).
        together = bool(session_id) and self.predictions is not None and self.predictions.writes_session_persons
        (out,) = self._assign_rows(account_id, np.asarray(vector, dtype=np.float64)[None, :],
                                   [session_id], [device_id], [label],
                                   [span if session_id else None], record_persons=together, stored=session)
        if session_id and not together:
            self.store.set_persons(account_id, {session_id: out.person_id}, {session_id: out.probabilities})
        return out

    def assign_many(self, account_ids: list[str], X: np.ndarray) -> list[AssignmentOut]:
        """Bare vectors of many households (AssignSessions), answered in the order of the
        vectors (``answer_many``'s answers, one object a vector)."""
        out: list[AssignmentOut | None] = [None] * X.shape[0]
        for rows, answers in self.answer_many(account_ids, X):
            for i, a in zip(rows.tolist(), answers.outs()):
                out[i] = a
        return out  # type: ignore[return-value]

    def answer_many(self, account_ids: list[str], X: np.ndarray) -> list[tuple[np.ndarray, Answers]]:
        """Bare vectors of many households (AssignSessions): every household's model is
        loaded, then the mixture-answered ones are scored together in one vectorised
        pass (batch_scoring) and recalibrated together (``_calibrated``); returns each
        household's rows (indices into X) and its answers to them, in that order."""
        if len(account_ids) not in (1, X.shape[0]):
            raise InvalidArgument(f"give one account id or one per vector ({X.shape[0]})", "account_ids")
        accounts = account_ids * X.shape[0] if len(account_ids) == 1 else account_ids
        for i, a in enumerate(dict.fromkeys(accounts)):
            check_id(a, f"account_ids[{i}]")
        self.require_processing(set(accounts))
        X = self._check_vectors(X)
        unique, inverse = np.unique(np.array(accounts, dtype=object), return_inverse=True)
        rows = {str(a): np.flatnonzero(inverse == i) for i, a in enumerate(unique)}
        self.store.confirm_model_versions(rows)   # one read for the message, not one per household
        loaded = {a: self._model(a) for a in rows}
        scored = score_households({a: env.model for a, (_, env) in loaded.items()}, rows, X)
        calibrated = self._calibrated([(loaded[a][1].model, scored[a]) for a in rows])
        out: list[tuple[np.ndarray, Answers]] = []
        recorded: list[Sequence[PredictionRecord]] = []
        for (account, r), (probabilities, group) in zip(rows.items(), calibrated):
            version, envelope = loaded[account]
            answers, records = self._household_answers(account, version, envelope.model, scored[account],
                                                       probabilities, group, [""] * r.size, [""] * r.size)
            recorded.append(records)
            out.append((r, answers))
        if self.predictions is not None:   # one durable write for the whole message
            self.predictions.record(PredictionRuns(recorded))
        return out

    def _assign_rows(self, account_id: str, X: np.ndarray, session_ids: list[str],
                     device_ids: list[str], labels: list[str | None] | None = None,
                     spans: list[tuple[float, float] | None] | None = None,
                     record_persons: bool = False, stored: StoredSession | None = None) -> list[AssignmentOut]:
        """``stored``: the one stored session X is (AssignSession by id): if the model
        already includes it, it is answered as the keeper re-records it (the "settled"
        confidence map of a stream, the "fitted" one of a model fitted at once), not as
        a new arrival."""
        X = self._check_vectors(X)
        version, envelope = self._model(account_id)
        included = bool(stored is not None and stored.closed
                        and self.store.closed_session_count(account_id, before=stored) < envelope.included)
        batch = envelope.model.assign_batch(X, device_ids=device_ids, included=included)
        answers, records = self._answer(account_id, version, envelope.model, batch, session_ids, device_ids,
                                        labels, spans)
        if self.predictions is not None:   # durable before we answer
            self.predictions.record(records, [SessionPerson(account_id, r.session_id, r.person_id, r.probabilities)
                                              for r in records if record_persons and r.session_id])
        return answers

    @staticmethod
    def _check_vectors(X: np.ndarray) -> np.ndarray:
        if X.ndim != 2 or X.shape[1] != F.FEATURE_DIM:
            raise InvalidArgument(f"feature vectors must have {F.FEATURE_DIM} float32 values", "feature_vector")
        if not np.isfinite(X).all():
            raise InvalidArgument("feature vectors must be finite", "feature_vector")
        return X

    def _calibrated(self, scored: list[tuple[HouseholdModel, BatchAssignment]]) -> list[tuple[np.ndarray, str]]:
        """Each household's probabilities recalibrated by feedback's calibrator, argmax
        preserved, per the model's age (services/common/calibration.py): distributions
        over persons through its maps, a one-person answer (sums to < 1 on purpose: the
        rest is an unseen member) by its shift; which rows and with which group's
        calibrator: feedback_calibrator_rows (not a cold start's answer over several
        persons; a model whose persons labels added is its own group), also returned: the
        group is recorded with each prediction so that feedback fits the group's
        calibrator on the group's answers.

        One ``Calibrator.apply`` per variant, group and number of persons over all the
        households' rows to recalibrate, not one a household: the calibrator maps each row
        on its own (its model's age given per row), so the numbers are the ones a call per
        household gives (tests/unit/clustering/test_answer_encoding.py holds them equal)."""
        out: list[tuple[np.ndarray, str]] = []
        together: dict[tuple[str, str, int], list[tuple[int, np.ndarray, int]]] = defaultdict(list)
        for i, (model, batch) in enumerate(scored):
            calibrate, group = feedback_calibrator_rows(model, batch)
            out.append((batch.probabilities, group))
            if calibrate.any():
                together[(model.variant, group, batch.probabilities.shape[1])].append(
                    (i, calibrate, int(model.n_sessions)))
        calibrators: dict[str, Calibrator] = {}
        for (variant, group, _k), members in together.items():
            calibrator = calibrators.get(variant)
            if calibrator is None:
                calibrator = calibrators[variant] = self.calibrator_of(variant)
            counts = [int(calibrate.sum()) for _i, calibrate, _age in members]
            matrix = np.concatenate([scored[i][1].probabilities[calibrate] for i, calibrate, _age in members])
            ages = np.repeat(np.array([age for _i, _c, age in members], dtype=np.int64), counts)
            mapped = calibrator.apply(matrix, ages, group)
            start = 0
            for (i, calibrate, _age), n in zip(members, counts):
                probabilities = np.array(scored[i][1].probabilities, dtype=np.float64, copy=True)
                probabilities[calibrate] = mapped[start:start + n]
                start += n
                out[i] = (probabilities, group)
        return out

    def _answer(self, account_id: str, version: int, model, batch, session_ids: list[str],
                device_ids: list[str], labels: list[str | None] | None = None,
                spans: list[tuple[float, float] | None] | None = None,
                ) -> tuple[list[AssignmentOut], list[PredictionRecord]]:
        """A household's scored rows -> answers (recalibrated by feedback's calibrator,
        labels applied) and the prediction records the caller logs before answering."""
        ((probabilities, group),) = self._calibrated([(model, batch)])
        answers, records = self._household_answers(account_id, version, model, batch, probabilities, group,
                                                   session_ids, device_ids, labels, spans)
        return answers.outs(), records

    def _household_answers(self, account_id: str, version: int, model, batch, probabilities: np.ndarray,
                           group: str, session_ids: list[str], device_ids: list[str],
                           labels: list[str | None] | None = None,
                           spans: list[tuple[float, float] | None] | None = None,
                           ) -> tuple[Answers, Sequence[PredictionRecord]]:
        """A household's recalibrated rows (``_calibrated``) -> its answers, labels applied,
        and the prediction records the caller logs before answering: a ``PredictionRun``
        (the records by column, every field but the four that differ held once) when the
        rows share their device and span, as a bare vector's do; else a list."""
        variant = model.variant
        cold = batch.strategy.removeprefix("cold_start:") if batch.strategy.startswith("cold_start") else ""
        model_sessions = int(model.n_sessions)
        person_ids = batch.person_ids
        # Constrained assignment: a session whose person is known (label) is that person,
        # also one the model reserved an id for but has not fitted yet (known_person).
        labelled: dict[int, str] = {}
        for r, label in enumerate(labels or []):
            known = known_person(model, label)
            if known is not None:
                labelled[r] = known
                if probabilities is batch.probabilities:
                    probabilities = np.array(probabilities, dtype=np.float64, copy=True)
                probabilities[r] = np.array([1.0 if p == known else 0.0 for p in person_ids])
        n = probabilities.shape[0]
        chosen = [person_ids[i] for i in probabilities.argmax(axis=1).tolist()]
        probs = [dict(zip(person_ids, row)) for row in probabilities.tolist()]
        for r, known in labelled.items():
            if known not in person_ids:
                chosen[r], probs[r] = known, {known: 1.0}
        ids = prediction_ids(n)
        now = time.time()
        size, spans = len(person_ids), spans or [None] * n
        if n and device_ids.count(device_ids[0]) == n and spans.count(spans[0]) == n:
            shared = PredictionRecord("", account_id, "", "", {}, variant, version, now, bool(cold), size,
                                      device_ids[0], *(spans[0] or (None, None)), model_sessions, group)
            records: Sequence[PredictionRecord] = PredictionRun(
                shared, ids, [s or i for s, i in zip(session_ids, ids)], chosen, probs)
        else:
            records = [PredictionRecord(ids[r], account_id, session_ids[r] or ids[r], chosen[r], probs[r], variant,
                                        version, now, bool(cold), size, device_ids[r], *(spans[r] or (None, None)),
                                        model_sessions, group) for r in range(n)]
        return Answers(chosen, probs, ids, variant, version, cold, batch.sessions_until_model), records

    # ---- households, refit, labels ----------------------------------------------------

    def household(self, account_id: str, max_sessions: int,
                  page_token: str = "") -> tuple[HouseholdView, HouseholdExtras]:
        check_id(account_id, "account_id")
        cursor = decode_page_token(page_token)
        view = self.store.household(account_id, max_sessions, cursor=cursor)
        version, envelope = self.keeper.load(account_id)
        extras = HouseholdExtras(drift_events=self.store.drift_events(account_id), model_version=version,
                                 next_page_token=encode_page_token(view.next_cursor))
        closed = self.store.closed_session_count(account_id)
        extras.sessions_pending = closed
        extras.unknown_genres = self.store.unknown_genres(account_id)
        if envelope is not None:
            # Persons a label named that the model has not fitted yet (a stream waits for
            # its next full refit) are persons of the household too: their labelled
            # sessions already show them. Listed with their sessions and no profile.
            # So are a cold start's persons (no fitted model, no profile): until session 32
            # `persons` was [] while the sessions and `status.persons` named p1 (user32).
            reserved = envelope.model.reserved_person_ids()
            unprofiled = envelope.model.cold_start_person_ids() + reserved
            sessions_of = self.store.person_session_counts(account_id, unprofiled)
            extras.persons = envelope.model.profiles() + [{"person_id": p, "sessions": sessions_of[p]}
                                                          for p in unprofiled]
            extras.model_variant = envelope.model.active_variant
            extras.sessions_in_model = envelope.included
            extras.sessions_pending = max(closed - envelope.included, 0)
            # Not "nothing pending": a warm model leaves up to MICRO_BATCH - 1 sessions
            # out until more arrive, so a caller waiting for nothing pending after its last
            # events waited for ever (bench.api_accuracy: 0 of 3 households).
            extras.settled = version > 0 and not folds_in(envelope, closed)
            extras.last_refit = envelope.last_refit
            extras.n_persons = envelope.model.n_persons + len(reserved)
            view = self._with_fresh_persons(account_id, view, envelope)
        return view, extras

    def _with_fresh_persons(self, account_id: str, view: HouseholdView, envelope: Envelope) -> HouseholdView:
        """Closed sessions of the page that have no person yet (just ingested; the
        background refresh has not stored theirs) are answered by the current model
        here, the same way the refresh will store them, and the refresh is queued: a
        caller never sees a closed session without a person once a model exists."""
        missing = [s for s in view.sessions if s.closed and not s.person_id]
        if not missing:
            return view
        labels = self.store.labels(account_id)
        persons, probs = persons_for(envelope.model, missing, [labels.get(s.session_id, s.label) for s in missing])
        self.schedule_refresh(account_id)
        sessions = [replace(s, person_id=persons[s.session_id]) if s.session_id in persons else s
                    for s in view.sessions]
        probability = dict(view.person_probability)
        probability.update({sid: p[persons[sid]] for sid, p in probs.items()})
        return replace(view, sessions=sessions, person_probability=probability)

    def refit(self, account_id: str, reason: str = "") -> tuple[int, int, int]:
        """Full refit from the stored sessions and labels: (version, persons, sessions)."""
        check_id(account_id, "account_id")
        check_text(reason, "reason", max_chars=MAX_REASON_CHARS)
        self.require_processing([account_id])  # a refit processes the stored sessions
        version, envelope = self.keeper.refresh(account_id, force=reason or "requested")
        if envelope is None:
            raise NotFound(f"no sessions for account {account_id!r}", "account_id")
        return version, envelope.model.n_persons, envelope.included

    def event_status(self, account_id: str, event_ids: Sequence[str],
                     caller: Principal | None = None) -> tuple[list[str], list[str], list[str]]:
        """(stored, erased, not stored) among ``event_ids`` of the household, each in the
        order asked, an id asked twice once: the answer to "was my batch stored?" after an
        ingest that ended without one (a 504, a deadline). Read-only, no consent needed (it
        says what is held, as GetHousehold does)."""
        check_id(account_id, "account_id")
        if not 0 < len(event_ids) <= MAX_EVENTS_PER_BATCH:
            raise InvalidArgument(f"give 1..{MAX_EVENTS_PER_BATCH} event ids (an ingest batch's bound)", "event_ids")
        for i, event_id in enumerate(event_ids):
            check_id(event_id, f"event_ids[{i}]")
        stored, erased = self.store.event_status(account_id, event_ids)
        if caller is not None and not principal_allowed(caller, Permission.INGEST_EVENTS):
            # Only a sender needs "erased" (not to resend). Told to a data scientist, it said
            # which of a household's events an erasure deleted — that a member had a device or
            # a person erased — which the household view never shows (attack28): answered as
            # never stored, the work done the same.
            erased = set()
        asked = list(dict.fromkeys(event_ids))
        return ([i for i in asked if i in stored], [i for i in asked if i in erased],
                [i for i in asked if i not in stored and i not in erased])

    def record_labels(self, labels: list[tuple[str, str, str, str]]) -> tuple[int, int]:
        if len(labels) > MAX_LABELS:
            raise InvalidArgument(f"at most {MAX_LABELS} labels", "labels")
        for i, (account, session, person, source) in enumerate(labels):
            check_id(account, f"labels[{i}].account_id")
            check_id(session, f"labels[{i}].session_id")
            check_id(person, f"labels[{i}].person_id")
            check_text(source, f"labels[{i}].source", max_chars=MAX_SOURCE_CHARS)
        # A label is personal data (who watched) and triggers a refit: consent first.
        self.require_processing({a for a, *_ in labels})
        accepted, unknown = self.store.record_labels(labels)
        for account in {a for a, *_ in labels}:
            self.keeper.refresh(account, force="labels")  # labels are rare: refit with them now
        return accepted, unknown

    def set_population_prior(self, prior: PopulationPrior | None) -> None:
        self.keeper.population_prior = prior

    def build_population_prior(self, pace: Callable[[float], object] | None = None) -> PopulationPrior | None:
        """Persona mixture over households that have a full model's worth of sessions
        (the Bayesian prior of the population cold-start strategy; which households and
        when: model.population_prior, the rule the benchmarks' streams share).
        ``pace(seconds)`` is called after each household's read with the time it took,
        so a caller can throttle the rebuild against the requests being served
        (__main__ does)."""
        matrices = []
        for account in self.store.accounts_with_sessions(MIN_SESSIONS, PRIOR_MAX_HOUSEHOLDS):
            started = time.perf_counter()
            matrices.append(self.keeper.snapshot(account).X)
            if pace is not None:
                pace(time.perf_counter() - started)
        return population_prior(matrices)

    # ---- other reads, erasure ---------------------------------------------------------

    def export_account(self, account_id: str) -> dict:
        """DataHolder.ExportAccount (services/common/erasure.py validates the id)."""
        return self.store.export_sections(account_id)   # lazy: streamed a page at a time

    def resolve_persons(self, instants: list[tuple[str, str, float]]) -> list[tuple[str, dict[str, float]]]:
        for n, (account, device, _) in enumerate(instants):
            check_id(account, f"instants[{n}].account_id")
            check_id(device, f"instants[{n}].device_id")
        return self.store.resolve_persons(instants)

    def person_devices(self, account_id: str, person_id: str) -> tuple[list[str], list[str]]:
        """GetPersonDevices: the person's own devices and the shared ones their sessions are
        on (persons.own_and_shared_devices), from the stored assignments."""
        check_id(account_id, "account_id")
        check_id(person_id, "person_id")
        rows = self.store.person_device_sessions(account_id, person_id)
        return own_and_shared_devices([r[0] for r in rows], [r[1] in PERSONAL_DEVICE_TYPES for r in rows],
                                      [r[2] for r in rows], [r[3] for r in rows], person_id)

    def rekey(self, account_id: str, dek_version: int, defer_purge: bool = False) -> tuple[int, list[dict]]:
        """DataHolder.Rekey: the household's sealed values under data key ``dek_version``."""
        return self.store.rekey(account_id, dek_version, defer_purge)

    def erase(self, scope: ErasureScope, job_id: str = "") -> ErasureOutcome:
        """Delete the scope's data, then refit the household from what remains: exact
        unlearning (the model equals one fitted without the erased sessions)."""
        outcome = self.store.erase(scope)
        refitted = False
        if scope.all_accounts:
            # Only households whose session list changed refit (refresh detects it).
            for account in self.store.accounts_with_models():
                self.keeper.forget(account)
                self.keeper.refresh(account)
        else:
            self.keeper.forget(scope.account_id)
            # The erasing transaction noted the refit; the note outlives a refit that failed
            # or a process that died before it, so the job's retry of this Erase, which
            # deletes nothing, still unlearns (until session 23 it answered "nothing left"
            # and the model fitted on the erased sessions stayed: chaos23).
            noted = self.store.refit_owed(scope.account_id) if scope.kind != "household" else None
            if noted is not None:
                self.keeper.refresh(scope.account_id, force="erasure", retire=scope.person_id or "")
                self.store.refit_done(scope.account_id, noted)
                refitted = True
        model_replaced = scope.kind != "household" and (refitted or not outcome.empty)
        if scope.kind != "household":
            # The refit replaced the model blob that was fitted on the erased sessions:
            # purge again so its old bytes leave the WAL / dead tuples too.
            outcome.purges[-1:] = [self.store.purge_erased(model_replaced=model_replaced)]
        if self.erasure_fence_s is not None:
            # Every Erase, a repeat included (one whose fence failed is retried by its job):
            # the other replicas' confirmed versions of the replaced or removed model are
            # not trusted once this answers (store.py, MODEL_CONFIRM_S).
            self.store.move_erasure_fence()
            time.sleep(self.erasure_fence_s)
            if not scope.all_accounts:
                # Meanwhile another replica that had not read the fence yet may have answered
                # from the model it held and logged that answer: taken out of the outbox now,
                # before feedback's erase (the next stage) and the forwarder can meet it.
                logged = self.store.erase_logged_predictions(scope, outcome.deleted_ids_of("sessions"))
                if logged:
                    outcome.add("pending_predictions", logged)
                    outcome.purges[-1:] = [self.store.purge_erased(model_replaced=model_replaced)]
        return outcome
