"""Two replicas of clustering on one PostgreSQL forward one prediction outbox, as real
processes: each chunk is sent once (docs/feedback.md, "Clustering's outbox"). Until session
20 both forwarders read the same oldest undelivered chunks and both sent them: feedback
stored each prediction once (RecordPrediction is idempotent by prediction_id), but every
delivery was made twice. Now a forward claims its chunks ``FOR UPDATE SKIP LOCKED`` and
deletes them in the same transaction: the other replica takes the next ones.

The backlog is built while feedback is down (as after an outage), by a third writer of the
outbox table (the test, with the clustering code), then feedback comes back and both
replicas drain it; each replica's ``hearth_predictions_forwarded_total`` says what it sent."""

from __future__ import annotations

import re
import time

import httpx
import psycopg

from services.clustering.prediction_log import PredictionLog
from services.common.predictions import PredictionRecord
from services.common.storage.sql import PostgresDatabase
from services.testing.mesh import running_mesh
from tests.helpers.servers import running_postgres
from tests.helpers.waiting import SLOW_MACHINE_S, wait_for

CHUNKS, PER_CHUNK = 24, 1000


def _forwarded(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    match = re.search(r"^hearth_predictions_forwarded_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_two_replicas_forward_each_chunk_once(tmp_path):
    with running_postgres() as pg:
        env = {"HEARTH_STORAGE": "postgres", "HEARTH_POSTGRES_DSN": pg.dsn, "HEARTH_RETENTION_CHECK_S": "0"}
        with running_mesh(tmp_path, {"olivia": "admin"}, timeout_s=SLOW_MACHINE_S, extra_env=env) as mesh:
            replica_metrics = mesh.spawn_on_free_ports("clustering-2", "services.clustering", mesh.env(),
                                                       ("HEARTH_GRPC_PORT", "HEARTH_METRICS_PORT"))["HEARTH_METRICS_PORT"]
            wait_for(lambda: _try(lambda: _forwarded(replica_metrics) == 0.0), SLOW_MACHINE_S,
                     "the second clustering replica to serve its metrics")
            mesh.stop_process("feedback")

            db = PostgresDatabase(pg.dsn, "hearth_clustering", max_size=1)
            try:
                writer = PredictionLog(db, None)   # writes the outbox, forwards nothing
                now = time.time()
                for c in range(CHUNKS):           # one record call, one chunk
                    writer.record([PredictionRecord(f"rp-{c}-{i}", f"acc-rep-{i % 50}", f"s-{c}-{i}", "p1",
                                                    {"p1": 0.75, "p2": 0.25}, "gmm", 1, now, False, 2)
                                   for i in range(PER_CHUNK)])
                writer.close()
            finally:
                db.close()

            mesh.start_service("feedback")
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                wait_for(lambda: conn.execute("SELECT count(*) FROM hearth_clustering.prediction_chunks")
                         .fetchone()[0] == 0, SLOW_MACHINE_S, "both replicas to drain the outbox")
                stored = conn.execute("SELECT count(*) FROM hearth_feedback.predictions "
                                      "WHERE prediction_id LIKE 'rp-%'").fetchone()[0]
            sent = [_forwarded(mesh.metrics_ports["clustering"]), _forwarded(replica_metrics)]
            assert stored == CHUNKS * PER_CHUNK
            assert sum(sent) == CHUNKS * PER_CHUNK, f"sent by each replica: {sent} (duplicates)"


def _try(fn):
    try:
        return fn()
    except httpx.HTTPError:
        return False
