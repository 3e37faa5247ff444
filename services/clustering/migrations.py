"""Versioned schema of the clustering service (applied at start by storage.sql.migrate)."""

from services.common.erasure_fences import ERASURE_FENCES_SQL
from services.common.field_crypto import HOUSEHOLD_ERASURES_SQL, HOUSEHOLD_KEY_EPOCHS_SQL
from services.common.storage.sql import Migration

MIGRATIONS = [
    Migration(1, "events, devices, sessions, models, drift", """
CREATE TABLE IF NOT EXISTS devices (
    account_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    device_type TEXT NOT NULL,
    last_ts {double} NOT NULL,
    PRIMARY KEY (account_id, device_id)
);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    device_type TEXT NOT NULL,
    ts {double} NOT NULL,
    kind TEXT NOT NULL,
    title_id TEXT NOT NULL,
    series_id TEXT,
    genres TEXT NOT NULL,
    duration_s {double} NOT NULL,
    maturity TEXT,
    country TEXT,
    vpn INTEGER NOT NULL,
    profile_hint TEXT
);
CREATE INDEX IF NOT EXISTS events_device_ts ON events (account_id, device_id, ts);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    device_type TEXT NOT NULL,
    start_ts {double} NOT NULL,
    end_ts {double} NOT NULL,
    event_count INTEGER NOT NULL,
    watch_seconds {double} NOT NULL,
    feature_version INTEGER NOT NULL,
    features {blob} NOT NULL,
    label TEXT,
    person_id TEXT
);
CREATE INDEX IF NOT EXISTS sessions_account_start ON sessions (account_id, start_ts);
CREATE INDEX IF NOT EXISTS sessions_device_end ON sessions (account_id, device_id, end_ts);
CREATE TABLE IF NOT EXISTS household_models (
    account_id TEXT PRIMARY KEY,
    version {bigint} NOT NULL,
    variant TEXT NOT NULL,
    model {blob} NOT NULL,
    updated_at {double} NOT NULL
);
CREATE TABLE IF NOT EXISTS drift_events (
    id {serial_pk},
    account_id TEXT NOT NULL,
    drift_type TEXT NOT NULL,
    severity {double} NOT NULL,
    statistic {double} NOT NULL,
    detected_at {double} NOT NULL,
    refit_triggered INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS drift_events_account ON drift_events (account_id, detected_at)
"""),
    Migration(2, "person probabilities per session", """
ALTER TABLE sessions ADD COLUMN person_probs TEXT
"""),
    Migration(3, "prediction outbox", """
CREATE TABLE IF NOT EXISTS prediction_outbox (
    prediction_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at {double} NOT NULL
);
CREATE INDEX IF NOT EXISTS prediction_outbox_created ON prediction_outbox (created_at)
"""),
    Migration(4, "session labels from feedback", """
CREATE TABLE IF NOT EXISTS session_labels (
    account_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    person_id TEXT NOT NULL,
    source TEXT NOT NULL,
    recorded_at {double} NOT NULL,
    PRIMARY KEY (account_id, session_id)
)
"""),
    # Event ids are the sender's, unique only within its household: another household
    # reusing one is a different event, not a duplicate. The primary key becomes
    # (account_id, event_id); a table rebuild is the one way that works on SQLite and
    # PostgreSQL alike.
    Migration(5, "event ids scoped per household", """
CREATE TABLE events_v5 (
    event_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    device_type TEXT NOT NULL,
    ts {double} NOT NULL,
    kind TEXT NOT NULL,
    title_id TEXT NOT NULL,
    series_id TEXT,
    genres TEXT NOT NULL,
    duration_s {double} NOT NULL,
    maturity TEXT,
    country TEXT,
    vpn INTEGER NOT NULL,
    profile_hint TEXT,
    PRIMARY KEY (account_id, event_id)
);
INSERT INTO events_v5 (event_id, account_id, device_id, device_type, ts, kind, title_id, series_id, genres,
    duration_s, maturity, country, vpn, profile_hint)
SELECT event_id, account_id, device_id, device_type, ts, kind, title_id, series_id, genres,
    duration_s, maturity, country, vpn, profile_hint FROM events;
DROP TABLE events;
ALTER TABLE events_v5 RENAME TO events;
CREATE INDEX IF NOT EXISTS events_device_ts ON events (account_id, device_id, ts)
"""),
    # Genre names outside the vocabulary, per session (sealed JSON [[name, events], ...];
    # NULL when none): the model status reports them per household, and an erasure of
    # the session's events takes them too.
    Migration(6, "unknown genres per session", """
ALTER TABLE sessions ADD COLUMN unknown_genres TEXT
"""),
    # How many households this store has erased: a write reads it and drops cached data
    # keys when it moved, so a replica that did not run a household's Erase cannot keep
    # writing for it (services/common/field_crypto.py, docs/privacy.md "Order").
    Migration(7, "household erasures", HOUSEHOLD_ERASURES_SQL),
    # The prediction outbox by chunks (session 19, services/clustering/prediction_log.py):
    # a row holds up to a forward batch of predictions as the serialized
    # RecordPredictionRequest feedback receives; ``accounts`` (" a b ") finds an erased
    # household's chunks. Rows of prediction_outbox (migration 3) still forward.
    Migration(8, "prediction outbox chunks", """
CREATE TABLE IF NOT EXISTS prediction_chunks (
    chunk_id TEXT PRIMARY KEY,
    created_at {double} NOT NULL,
    predictions INTEGER NOT NULL,
    accounts TEXT NOT NULL,
    traceparents TEXT NOT NULL,
    body {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS prediction_chunks_created ON prediction_chunks (created_at)
"""),
    # The earliest session start among a chunk's predictions (NULL: one has none, or the
    # chunk was written before): an erasure of a time window reads only the chunks that can
    # hold predictions about the sessions it deletes (prediction_log.erase_pending; the
    # retention purge parsed every chunk of the outbox, docs/benchmarks.md "bench-outbox-purge").
    Migration(9, "prediction chunks' earliest session", """
ALTER TABLE prediction_chunks ADD COLUMN session_from {double};
CREATE INDEX IF NOT EXISTS prediction_chunks_session_from ON prediction_chunks (session_from)
"""),
    # The running state of a device's newest session (domain/sessions.py SessionState,
    # sealed JSON: its feature sums, distinct titles and series episodes, hint and unknown
    # genre counts, last event), NULL on every other session: a batch that only appends
    # to that session extends it from this instead of re-reading the session's events
    # (ClusteringStore._update_sessions, docs/clustering.md "Incremental sessions"). It
    # goes with the session row on every erasure.
    Migration(10, "newest session's running state", """
ALTER TABLE sessions ADD COLUMN state {blob}
"""),
    # The device's UTC offset an event carried (minutes, local = UTC + offset; NULL: not
    # sent): the session builder computes the hour and weekday features in local time
    # from it (domain/sessions.py). TEXT so that it is sealed under the household key like
    # country (it reveals rough location: docs/privacy.md §10); it goes with its event row
    # on every erasure.
    Migration(11, "events' UTC offset", """
ALTER TABLE events ADD COLUMN utc_offset_minutes TEXT
"""),
    # Keyed digests of the ids of events a device, person or window erasure deleted (never
    # the id, its time or anything else of the event): an event sent again with such an id
    # (a client's retry or a replayed stream) is a duplicate, not stored, so erased data
    # does not come back (ClusteringStore.ingest; docs/privacy.md "An erased scope stays
    # erased"). A household erasure drops its rows (its key is shredded); the retention
    # purge drops rows older than its window (such a replay is refused as expired).
    Migration(12, "erased event digests", """
CREATE TABLE IF NOT EXISTS erased_events (
    account_id TEXT NOT NULL,
    digest {blob} NOT NULL,
    erased_at {double} NOT NULL,
    PRIMARY KEY (account_id, digest)
);
CREATE INDEX IF NOT EXISTS erased_events_at ON erased_events (erased_at)
"""),
    # A household whose unlearning refit a device, person or window erasure owes: noted in
    # the erasing transaction, cleared once the refit replaced the model. An Erase whose
    # refit failed or whose process died before it is retried by its deletion job, deletes
    # nothing the second time and refits because of the note (ClusteringApp.erase).
    Migration(13, "unlearning refits owed", """
CREATE TABLE IF NOT EXISTS refits_owed (
    account_id TEXT PRIMARY KEY,
    noted_at {double} NOT NULL
)
"""),
    # Each household's count of re-keys (DataHolder/Rekey, a rotation of its data key): a
    # write reads its households' counts and drops the keys it cached of one whose count
    # moved (services/common/field_crypto.py). Per household (session 27): the global
    # count of household erasures made every replica refetch every household's key.
    Migration(14, "household key epochs", HOUSEHOLD_KEY_EPOCHS_SQL),
    # A counter every Erase moves once its deletion and refit are committed (session 30):
    # replicas read it every HEARTH_ERASURE_FENCE_S / 4 and forget the model versions they
    # confirmed when it moved (ClusteringStore.watch_erasure_fence). No account id in it.
    Migration(15, "erasure fence", """
CREATE TABLE erasure_fence (id INTEGER PRIMARY KEY, epoch {bigint} NOT NULL);
INSERT INTO erasure_fence (id, epoch) VALUES (1, 0)
"""),
    # What a device, person or window erasure fenced off (session 31): events of the scope
    # recorded up to the erasure that arrive after it — a batch in flight during the
    # erasure, a retry of one, a device's backlog — are refused, not stored
    # (ClusteringStore.ingest; docs/privacy.md "An erased scope stays erased"). A row holds
    # the account id, the keyed digest of the device id (NULL: every device, a window) and
    # the fenced span of event time (lo NULL: from the beginning; hi: the erasure's time, or
    # the window's end if earlier) — never an event's id or time. A household erasure drops
    # its rows; the retention purge drops those whose span ended before its window.
    Migration(16, "erasure fences", ERASURE_FENCES_SQL),
]
