"""The feedback service's repository: prediction log, feedback, experiment flags,
calibrators, retraining triggers, and erasure.

Every write is idempotent by id (predictions by ``prediction_id``, feedback by
``feedback_id``) or guarded by a primary key acting as compare-and-swap (flag and
calibrator versions), so two replicas never lose or duplicate an update.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.erasure import ErasureOutcome, ErasureScope
from services.common.errors import AlreadyExists, NotFound
from services.common.predictions import PredictionRecord  # noqa: F401 - re-exported
from services.common.storage.cache import Cache, MemoryCache
from services.common.export_stream import materialised
from services.common.storage.sql import Database, Tx, keyset_rows, migrate, record_erasure
from services.feedback.domain.calibrator_versions import versions_kept
from services.feedback.migrations import MIGRATIONS

# Every table an erasure deletes from (purged physically after it: Database.purge_erased;
# kept out of PostgreSQL's planner statistics: migrate(personal_tables=...)).
_ERASED_TABLES = ("predictions", "feedback", "triggers")


@dataclass(frozen=True)
class FeedbackItem:
    """One feedback signal as stored. ``kind`` is a ``SignalKind`` value
    (``profile_confirmed`` ...); ``true_person_id`` is None for implicit signals."""

    feedback_id: str
    prediction_id: str
    kind: str
    true_person_id: str | None
    weight: float
    ts: float
    unprompted: bool = False   # volunteered, not asked for: out of calibration (docs/feedback.md)


@dataclass(frozen=True)
class FeedbackJoined:
    """A feedback signal joined with the prediction it is about (what metrics need)."""

    feedback_id: str
    kind: str
    true_person_id: str | None
    ts: float
    received_at: float
    prediction: PredictionRecord


@dataclass(frozen=True)
class StoredFlags:
    version: int
    flags_json: str
    reason: str
    principal_id: str
    ts: float
    audit_result: str | None


@dataclass(frozen=True)
class StoredCalibrator:
    variant: str
    version: int
    calibrator_json: str
    fitted_at: float


@dataclass(frozen=True)
class StoredTrigger:
    trigger_id: int
    kind: str
    scope: str
    scope_key: str
    value: float
    threshold: float
    n: int
    ts: float
    refit_requested: bool
    refit_result: str | None
    refit_ts: float | None


_PREDICTION_COLUMNS = ("p.prediction_id, p.account_id, p.session_id, p.person_id, p.probabilities, "
                       "p.model_variant, p.model_version, p.ts, p.cold_start, p.household_size, p.device_id, "
                       "p.session_start, p.session_end, p.model_sessions, p.calibration_group")


def _prediction(row: Sequence) -> PredictionRecord:
    return PredictionRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], int(row[6]),
                            float(row[7]), bool(row[8]), int(row[9]), row[10] or "",
                            None if row[11] is None else float(row[11]), None if row[12] is None else float(row[12]),
                            int(row[13] or 0), row[14] or "")


def _refuse_other_content(tx, items: Sequence[PredictionRecord]) -> None:
    """AlreadyExists naming the first item whose ``prediction_id`` is stored with other
    content (raised inside the write transaction: nothing of the request is kept)."""
    ids = list(dict.fromkeys(p.prediction_id for p in items))
    stored: dict[str, PredictionRecord] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for row in tx.query(f"SELECT {_PREDICTION_COLUMNS} FROM predictions p WHERE p.prediction_id IN "
                            f"({', '.join('?' * len(chunk))})", chunk):
            stored[row[0]] = _prediction(row)
    for i, p in enumerate(items):
        if stored.get(p.prediction_id, p) != p:
            raise AlreadyExists("already used for a different prediction (an id names one prediction; "
                                "the same content again is a duplicate)", f"predictions[{i}].prediction_id")


def _trigger(row: Sequence) -> StoredTrigger:
    return StoredTrigger(int(row[0]), row[1], row[2], row[3], float(row[4]), float(row[5]), int(row[6]),
                         float(row[7]), bool(row[8]), row[9], None if row[10] is None else float(row[10]))


_TRIGGER_COLUMNS = ("trigger_id, kind, scope, scope_key, value, threshold, n, ts, refit_requested, "
                    "refit_result, refit_ts")


class FeedbackStore:
    def __init__(self, db: Database, cache: Cache | None = None) -> None:
        self.db = db
        self.cache = cache or MemoryCache("feedback")

    def migrate(self) -> list[int]:
        return migrate(self.db, MIGRATIONS, personal_tables=_ERASED_TABLES)

    # ------------------------------------------------------------------ predictions

    def record_predictions(self, items: Sequence[PredictionRecord]) -> tuple[int, int]:
        """Store the predictions; returns (accepted, duplicates). A ``prediction_id`` names
        one prediction, forever (as ``feedback_id`` names one feedback): the same content
        again is a duplicate (clustering's forwarder resends a chunk after a crash), other
        content AlreadyExists naming ``predictions[i].prediction_id`` and nothing of the
        request is stored. Until session 33 other content was counted a duplicate and the
        first kept, silently."""
        with self.db.transaction() as tx:
            accepted = tx.executemany(
                "INSERT INTO predictions (prediction_id, account_id, session_id, person_id, probabilities, "
                "model_variant, model_version, ts, cold_start, household_size, device_id, session_start, "
                "session_end, model_sessions, calibration_group) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (prediction_id) DO NOTHING",
                [(p.prediction_id, p.account_id, p.session_id, p.person_id,
                  json.dumps(p.probabilities, sort_keys=True), p.model_variant, p.model_version, p.ts,
                  int(p.cold_start), p.household_size, p.device_id, p.session_start, p.session_end,
                  p.model_sessions, p.calibration_group)
                 for p in items])
            if accepted < len(items):
                # Only when some were already held (the common forward is all new): the rows
                # as stored now, the request's own first copies included, each compared with
                # its item. Read after the insert, in its transaction: a concurrent insert of
                # the same id (another replica's) is compared too, not missed.
                _refuse_other_content(tx, items)
        return accepted, len(items) - accepted

    def prediction(self, prediction_id: str) -> PredictionRecord | None:
        # Reads in read transactions (review33): in a write one (SQLite: the one write lock)
        # each waited behind any write of this database (tests/integration/test_feedback_read_beside_a_write.py).
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query(f"SELECT {_PREDICTION_COLUMNS} FROM predictions p WHERE p.prediction_id = ?",
                            (prediction_id,))
        return _prediction(rows[0]) if rows else None

    def counts(self) -> tuple[int, int]:
        """(predictions, predictions with at least one feedback)."""
        with self.db.transaction(readonly=True) as tx:
            predictions = tx.query("SELECT COUNT(*) FROM predictions")[0][0]
            with_feedback = tx.query("SELECT COUNT(DISTINCT prediction_id) FROM feedback")[0][0]
        return int(predictions), int(with_feedback)

    # ------------------------------------------------------------------ feedback

    def record_feedback(self, item: FeedbackItem, received_at: float) -> tuple[PredictionRecord, bool]:
        """Store one feedback signal; returns (its prediction, duplicate).

        NotFound (field ``prediction_id``) when the prediction is unknown; a repeat of the
        same ``feedback_id`` with the same content is a duplicate, with other content
        AlreadyExists (field ``feedback_id``): an id names one fact, forever."""
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT {_PREDICTION_COLUMNS} FROM predictions p WHERE p.prediction_id = ?",
                            (item.prediction_id,))
            if not rows:
                raise NotFound(f"unknown prediction {item.prediction_id!r}", "prediction_id")
            prediction = _prediction(rows[0])
            inserted = tx.execute(
                "INSERT INTO feedback (feedback_id, prediction_id, account_id, kind, true_person_id, weight, "
                "ts, received_at, unprompted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (feedback_id) DO NOTHING",
                (item.feedback_id, item.prediction_id, prediction.account_id, item.kind, item.true_person_id,
                 item.weight, item.ts, received_at, int(item.unprompted)))
            if inserted:
                return prediction, False
            existing = tx.query("SELECT prediction_id, kind, true_person_id, unprompted FROM feedback "
                                "WHERE feedback_id = ?", (item.feedback_id,))
        if existing and (*existing[0][:3], bool(existing[0][3])) != (item.prediction_id, item.kind,
                                                                      item.true_person_id, item.unprompted):
            raise AlreadyExists("already used for a different feedback", "feedback_id")
        return prediction, True

    def feedback_joined(self, account_id: str | None = None, received_after: float | None = None,
                        prompted_only: bool = False, newest: int | None = None) -> list[FeedbackJoined]:
        """Every feedback signal with its prediction, optionally of one account and/or
        received strictly after a time and/or only what was asked for (``prompted_only``:
        not FeedbackItem.unprompted) and/or only the ``newest`` signals by (received_at,
        feedback_id); ordered by received_at then feedback_id."""
        where, params = ["f.unprompted = 0"] if prompted_only else [], []
        if account_id is not None:
            where.append("f.account_id = ?")
            params.append(account_id)
        if received_after is not None:
            where.append("f.received_at > ?")
            params.append(received_after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        # The newest N: read backwards and turned round, the same order as reading all (the
        # key is unique); the database keeps N rows of its sort, this process only N.
        order, limit = ("DESC", " LIMIT ?") if newest is not None else ("", "")
        with self.db.transaction() as tx:
            rows = tx.query(
                f"SELECT f.feedback_id, f.kind, f.true_person_id, f.ts, f.received_at, {_PREDICTION_COLUMNS} "
                f"FROM feedback f JOIN predictions p ON p.prediction_id = f.prediction_id {clause} "
                f"ORDER BY f.received_at {order}, f.feedback_id {order}{limit}",
                [*params, newest] if newest is not None else params)
        if newest is not None:
            rows.reverse()
        return [FeedbackJoined(r[0], r[1], r[2], float(r[3]), float(r[4]), _prediction(r[5:])) for r in rows]

    # ------------------------------------------------------------------ flags

    def current_flags(self, experiment: str) -> StoredFlags | None:
        # A read (``prediction``): flags change by compare-and-swap on the version (insert_flags).
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT version, flags_json, reason, principal_id, ts, audit_result FROM flags "
                            "WHERE experiment = ? ORDER BY version DESC LIMIT 1", (experiment,))
        if not rows:
            return None
        r = rows[0]
        return StoredFlags(int(r[0]), r[1], r[2], r[3], float(r[4]), r[5])

    def insert_flags(self, experiment: str, version: int, flags_json: str, reason: str,
                     principal_id: str, ts: float) -> bool:
        """Insert a flags version; False when that version exists already (a concurrent
        writer won the compare-and-swap: re-read and retry)."""
        with self.db.transaction() as tx:
            return tx.execute(
                "INSERT INTO flags (experiment, version, flags_json, reason, principal_id, ts) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (experiment, version) DO NOTHING",
                (experiment, version, flags_json, reason, principal_id, ts)) == 1

    def set_flags_audit_result(self, experiment: str, version: int, result: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE flags SET audit_result = ? WHERE experiment = ? AND version = ?",
                       (result, experiment, version))

    # ------------------------------------------------------------------ calibrators

    def next_calibrator_version(self, variant: str) -> int:
        with self.db.transaction() as tx:
            rows = tx.query("SELECT COALESCE(MAX(version), 0) FROM calibrators WHERE variant = ?", (variant,))
        return int(rows[0][0]) + 1

    def save_calibrator(self, variant: str, version: int, calibrator_json: str, fitted_at: float,
                        unless_held_by: str | None = None) -> bool:
        """Store a calibrator version and make it current, in one transaction. False when
        the version exists already (another replica fitted concurrently), or when the
        newest choice of ``unless_held_by`` (the variant's flags history key) holds the
        variant: a rollback made while this fit ran is not undone by it (review32: the
        refit read the held variants before fitting and then moved the pointer anyway)."""
        with self.db.transaction() as tx:
            self._lock_calibrator_choice(tx, variant)
            if unless_held_by is not None and self._held(tx, unless_held_by):
                return False
            if not tx.execute("INSERT INTO calibrators (variant, version, calibrator_json, fitted_at) "
                              "VALUES (?, ?, ?, ?) ON CONFLICT (variant, version) DO NOTHING",
                              (variant, version, calibrator_json, fitted_at)):
                return False
            self._purge_calibrators(tx, variant, version, fitted_at)
            self._point(tx, variant, version)
        return True

    def _purge_calibrators(self, tx: Tx, variant: str, current: int, now: float) -> None:
        """Delete the versions of ``variant`` no rollback needs (domain/calibrator_versions.py)
        in the transaction that stores ``current`` and then puts it in force (the pointer is
        moved after this, so this holds no lock an ``activate_calibrator`` waits for). On
        PostgreSQL the doomed rows are locked first: an activation that checked one of them
        exists (FOR SHARE) is waited for, and the version in force once it committed is not
        deleted (the DELETE reads the pointer afresh); one that checks after finds it gone
        (NotFound, ``version``) — never a pointer at a deleted version."""
        stored = tx.query("SELECT version, fitted_at FROM calibrators WHERE variant = ?", (variant,))
        doomed = sorted({int(v) for v, _ in stored}
                        - versions_kept(((int(v), float(t)) for v, t in stored), current, now))
        lock = " FOR UPDATE" if self.db.dialect == "postgres" else ""
        for start in range(0, len(doomed), 500):
            chunk = doomed[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            tx.query(f"SELECT version FROM calibrators WHERE variant = ? AND version IN ({marks}){lock}",
                     (variant, *chunk))
            tx.execute(f"DELETE FROM calibrators WHERE variant = ? AND version IN ({marks}) AND version NOT IN "
                       "(SELECT version FROM calibrator_current WHERE variant = ?)", (variant, *chunk, variant))

    def _lock_calibrator_choice(self, tx: Tx, variant: str) -> None:
        """PostgreSQL: a fit's save and an activation of ``variant`` run one after the other
        (a transaction-scoped advisory lock in this schema), so a save reads the hold of an
        activation that committed before it, and an activation's pointer, written after a
        save committed, stays. SQLite: BEGIN IMMEDIATE serialises them already."""
        if self.db.dialect == "postgres":
            tx.query("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))",
                     (f"{self.db.schema}:calibrator:{variant}",))

    def held(self, key: str) -> bool:
        """Whether the newest choice of flags history ``key`` (``calibrator:<variant>``)
        holds its variant: automatic refits leave it alone."""
        with self.db.transaction(readonly=True) as tx:
            return self._held(tx, key)

    @staticmethod
    def _held(tx: Tx, key: str) -> bool:
        """``held`` inside a transaction."""
        rows = tx.query("SELECT flags_json FROM flags WHERE experiment = ? ORDER BY version DESC LIMIT 1", (key,))
        return bool(rows and json.loads(rows[0][0]).get("hold"))

    @staticmethod
    def _point(tx: Tx, variant: str, version: int) -> None:
        tx.execute("INSERT INTO calibrator_current (variant, version) VALUES (?, ?) "
                   "ON CONFLICT (variant) DO UPDATE SET version = excluded.version", (variant, version))

    def activate_calibrator(self, variant: str, version: int, choice_key: str, choice_version: int,
                            choice_json: str, reason: str, principal_id: str, ts: float) -> bool:
        """Point ``variant`` at stored ``version`` (0: none, identity) and record the
        choice as version ``choice_version`` of the flags history ``choice_key``, in one
        transaction. False when that choice version exists already (a concurrent change
        won the compare-and-swap: re-read and retry)."""
        with self.db.transaction() as tx:
            self._lock_calibrator_choice(tx, variant)
            # FOR SHARE (PostgreSQL): a refit's purge of old versions cannot delete it under
            # this choice (_purge_calibrators).
            lock = " FOR SHARE" if self.db.dialect == "postgres" else ""
            if version and not tx.query("SELECT 1 FROM calibrators WHERE variant = ? AND version = ?" + lock,
                                        (variant, version)):
                raise NotFound(f"no calibrator version {version} for variant {variant!r}", "version")
            if tx.execute("INSERT INTO flags (experiment, version, flags_json, reason, principal_id, ts) "
                          "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (experiment, version) DO NOTHING",
                          (choice_key, choice_version, choice_json, reason, principal_id, ts)) != 1:
                return False
            if version:
                self._point(tx, variant, version)
            else:
                tx.execute("DELETE FROM calibrator_current WHERE variant = ?", (variant,))
        return True

    def calibrator_versions(self, variant: str) -> list[StoredCalibrator]:
        """Every stored calibrator of ``variant``, newest first."""
        with self.db.transaction() as tx:
            rows = tx.query("SELECT variant, version, calibrator_json, fitted_at FROM calibrators "
                            "WHERE variant = ? ORDER BY version DESC", (variant,))
        return [StoredCalibrator(r[0], int(r[1]), r[2], float(r[3])) for r in rows]

    def current_calibration_groups(self, account_ids: Sequence[str], chunk: int = 500) -> dict[str, str]:
        """Each account's calibration group now: that of its newest prediction (the model
        that answers it now stamped it; predictions_account index). Accounts without
        predictions are absent."""
        out: dict[str, str] = {}
        accounts = list(account_ids)
        with self.db.transaction() as tx:
            for start in range(0, len(accounts), chunk):
                part = accounts[start:start + chunk]
                rows = tx.query(
                    f"SELECT p.account_id, p.calibration_group FROM predictions p "
                    f"WHERE p.account_id IN ({', '.join('?' * len(part))}) AND p.ts = "
                    "(SELECT MAX(q.ts) FROM predictions q WHERE q.account_id = p.account_id) "
                    "ORDER BY p.account_id, p.prediction_id", part)
                out.update({r[0]: r[1] or "" for r in rows})   # ties on ts: the last prediction id
        return out

    def current_calibrators(self) -> dict[str, StoredCalibrator]:
        with self.db.transaction() as tx:
            rows = tx.query("SELECT c.variant, c.version, c.calibrator_json, c.fitted_at FROM calibrators c "
                            "JOIN calibrator_current cur ON cur.variant = c.variant AND cur.version = c.version "
                            "ORDER BY c.variant")
        return {r[0]: StoredCalibrator(r[0], int(r[1]), r[2], float(r[3])) for r in rows}

    # ------------------------------------------------------------------ triggers

    def insert_trigger(self, kind: str, scope: str, scope_key: str, value: float, threshold: float, n: int,
                       ts: float, refit_requested: bool) -> int:
        with self.db.transaction() as tx:
            rows = tx.query(
                "INSERT INTO triggers (kind, scope, scope_key, value, threshold, n, ts, refit_requested) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING trigger_id",
                (kind, scope, scope_key, value, threshold, n, ts, int(refit_requested)))
        return int(rows[0][0])

    def last_trigger_ts(self, scope: str, scope_key: str, kind: str | None = None,
                        now: float | None = None) -> float | None:
        """The newest trigger's time; with ``now``, the newest not later than it: one
        stamped later was recorded while the clock was ahead (a step since put right), and
        counting it silenced the triggers until the clock caught up (session 24)."""
        sql = "SELECT MAX(ts) FROM triggers WHERE scope = ? AND scope_key = ?"
        params: list = [scope, scope_key]
        if now is not None:
            sql += " AND ts <= ?"
            params.append(now)
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        with self.db.transaction() as tx:
            value = tx.query(sql, params)[0][0]
        return None if value is None else float(value)

    def set_refit_result(self, trigger_id: int, result: str, ts: float) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE triggers SET refit_result = ?, refit_ts = ? WHERE trigger_id = ?",
                       (result, ts, trigger_id))

    def pending_refits(self, limit: int = 100) -> list[StoredTrigger]:
        """Triggers whose Refit was requested but never answered (e.g. the process stopped)."""
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT {_TRIGGER_COLUMNS} FROM triggers WHERE refit_requested = 1 "
                            "AND refit_result IS NULL ORDER BY trigger_id LIMIT ?", (limit,))
        return [_trigger(r) for r in rows]

    def triggers(self, scope_key: str | None = None, limit: int = 1000) -> list[StoredTrigger]:
        sql = f"SELECT {_TRIGGER_COLUMNS} FROM triggers"
        params: list = []
        if scope_key is not None:
            sql += " WHERE scope_key = ?"
            params.append(scope_key)
        with self.db.transaction() as tx:
            rows = tx.query(sql + " ORDER BY trigger_id LIMIT ?", [*params, limit])
        return [_trigger(r) for r in rows]

    # ------------------------------------------------------------------ export

    def export_account(self, account_id: str) -> dict:
        """``export_sections`` read whole (the tests' and tools' form)."""
        return materialised(self.export_sections(account_id))

    def export_sections(self, account_id: str) -> dict:
        """Everything held for the account (privacy's household export): predictions,
        feedback and the household's retraining triggers. Predictions and feedback are
        lazy, a page at a time as the stream is written (services/common/export_stream.py)."""
        with self.db.transaction(readonly=True) as tx:
            triggers = tx.query(f"SELECT {_TRIGGER_COLUMNS} FROM triggers WHERE scope = 'household' "
                                "AND scope_key = ? ORDER BY trigger_id", (account_id,))
        predictions = keyset_rows(self.db, f"SELECT {_PREDICTION_COLUMNS} FROM predictions p WHERE p.account_id = ?",
                                  (account_id,), ("p.ts", "p.prediction_id"), (7, 0))
        feedback = keyset_rows(self.db, "SELECT feedback_id, prediction_id, kind, true_person_id, weight, ts, "
                               "received_at, unprompted FROM feedback WHERE account_id = ?", (account_id,),
                               ("ts", "feedback_id"), (5, 0))
        return {
            "predictions": ({"prediction_id": p.prediction_id, "session_id": p.session_id, "person_id": p.person_id,
                             "probabilities": p.probabilities, "model_variant": p.model_variant,
                             "model_version": p.model_version, "ts": p.ts, "cold_start": p.cold_start,
                             "household_size": p.household_size, "calibration_group": p.calibration_group,
                             # Held with the prediction, so exported too (until session 19 they
                             # were not: the device and viewing times of each answer).
                             "device_id": p.device_id, "session_start": p.session_start,
                             "session_end": p.session_end, "model_sessions": p.model_sessions}
                            for p in map(_prediction, predictions)),
            "feedback": ({"feedback_id": r[0], "prediction_id": r[1], "kind": r[2], "true_person_id": r[3],
                          "weight": float(r[4]), "ts": float(r[5]), "received_at": float(r[6]),
                          "unprompted": bool(r[7])} for r in feedback),
            "triggers": [{"trigger_id": t.trigger_id, "kind": t.kind, "value": t.value, "threshold": t.threshold,
                          "n": t.n, "ts": t.ts, "refit_result": t.refit_result} for t in map(_trigger, triggers)],
        }

    # ------------------------------------------------------------------ erasure

    def erase(self, scope: ErasureScope) -> ErasureOutcome:
        """Delete what ``scope`` covers, in one transaction; the outcome lists the ids.

        household: every prediction, feedback signal and household trigger of the
        account. device: the predictions made on that device and those whose device is
        unknown (recorded before predictions carried one: kept conservative), with their
        feedback. person: the predictions of that predicted person,
        their feedback, and every feedback naming the person as the true one. window:
        the predictions about the sessions the window overlaps (whenever made; without
        session times, by their own time in [start, end)), their feedback, and feedback
        given in it.
        """
        account = scope.account_id
        outcome = ErasureOutcome()
        with self.db.transaction() as tx:
            if scope.kind == "household":
                prediction_ids = [r[0] for r in tx.query(
                    "SELECT prediction_id FROM predictions WHERE account_id = ?", (account,))]
                feedback_ids = [r[0] for r in tx.query(
                    "SELECT feedback_id FROM feedback WHERE account_id = ?", (account,))]
                trigger_ids = [str(r[0]) for r in tx.query(
                    "SELECT trigger_id FROM triggers WHERE scope = 'household' AND scope_key = ?", (account,))]
                tx.execute("DELETE FROM feedback WHERE account_id = ?", (account,))
                tx.execute("DELETE FROM predictions WHERE account_id = ?", (account,))
                tx.execute("DELETE FROM triggers WHERE scope = 'household' AND scope_key = ?", (account,))
                outcome.add("predictions", prediction_ids)
                outcome.add("feedback", feedback_ids)
                outcome.add("triggers", trigger_ids)
            else:
                self._erase_part(tx, scope, outcome)
            if not outcome.empty:
                record_erasure(tx)
        outcome.purges.append(self.db.purge_erased(_ERASED_TABLES))
        return outcome

    @staticmethod
    def _erase_part(tx: Tx, scope: ErasureScope, outcome: ErasureOutcome) -> None:
        """The device, person and window scopes of ``erase``."""
        account = scope.account_id
        if scope.kind == "device":
            prediction_where = "account_id = ? AND (device_id = ? OR device_id = '')"
            prediction_params = [account, scope.device_id]
            feedback_extra, feedback_extra_params = "1 = 0", []
        elif scope.kind == "person":
            prediction_where = "account_id = ? AND person_id = ?"
            prediction_params: list = [account, scope.person_id]
            feedback_extra, feedback_extra_params = "true_person_id = ?", [scope.person_id]
        elif scope.kind == "window":
            # account "*" (retention purge, privacy service only): every account.
            conditions, prediction_params = ([], []) if scope.all_accounts else (["account_id = ?"], [account])
            window, window_params = [], []
            if scope.start is not None:
                window.append("ts >= ?")
                window_params.append(scope.start)
            if scope.end is not None:
                window.append("ts < ?")
                window_params.append(scope.end)
            # A prediction about a session the window overlaps goes with the session (the
            # clustering service's rule: end >= start of window and start < its end),
            # whenever it was made; one with no known session goes by its own time.
            lo = scope.start if scope.start is not None else float("-inf")
            hi = scope.end if scope.end is not None else float("inf")
            about = ("((session_end IS NOT NULL AND session_end >= ? AND session_start < ?) OR "
                     f"(session_end IS NULL AND {' AND '.join(window)}))")
            prediction_where = " AND ".join(conditions + [about])
            prediction_params += [lo, hi, *window_params]
            feedback_extra, feedback_extra_params = " AND ".join(window), window_params
        else:
            raise ValueError(f"scope.kind: unknown erasure kind {scope.kind!r}")
        account_where, account_params = ("1 = 1", []) if scope.all_accounts else ("account_id = ?", [account])
        feedback_where = (f"{account_where} AND (prediction_id IN (SELECT prediction_id FROM predictions "
                          f"WHERE {prediction_where}) OR ({feedback_extra}))")
        feedback_params = [*account_params, *prediction_params, *feedback_extra_params]
        feedback_ids = [r[0] for r in tx.query(f"SELECT feedback_id FROM feedback WHERE {feedback_where}",
                                               feedback_params)]
        prediction_ids = [r[0] for r in tx.query(
            f"SELECT prediction_id FROM predictions WHERE {prediction_where}", prediction_params)]
        tx.execute(f"DELETE FROM feedback WHERE {feedback_where}", feedback_params)
        tx.execute(f"DELETE FROM predictions WHERE {prediction_where}", prediction_params)
        outcome.add("predictions", prediction_ids)
        outcome.add("feedback", feedback_ids)

