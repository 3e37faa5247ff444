"""Privacy's streamed household export (services/privacy/deletion/app.py,
``export_household``; docs/privacy.md §9, "Streaming") over a real deletion-job store on
SQLite: the document is closed only when every part arrived whole; a deletion pending or
running refuses the export before any byte; one that ran while the parts were read fails
it before the document is closed; a part cut short or not matching its completion marker
fails it; and a data holder of an older release (no ExportAccountStream: UNIMPLEMENTED)
gives its part through the unary ExportAccount."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import grpc
import pytest

from hearth.common.v1 import common_pb2
from services.common.erasure import ErasureScope
from services.common.errors import Conflict, FailedPrecondition
from services.common.export_stream import IncompleteExport, chunks, json_pieces, verified
from services.common.storage.sql import SqliteDatabase
from services.privacy.consent.store import ConsentStore
from services.privacy.deletion.app import GrpcPeers, export_household
from services.privacy.deletion.domain import new_job
from services.privacy.deletion.store import DeletionJobStore

ACCOUNT = "acct-x"
CONSENT = {"processing": True, "attribution": True, "version": 1, "explicit": True}


class _Parts:
    """Data holders answering from documents, each part streamed and verified as
    GrpcPeers does (export_stream.chunks -> verified); ``during`` runs while clustering's
    part is read (a deletion racing the export)."""

    def __init__(self, documents: dict, during=None, cut: str = "") -> None:
        self.documents, self.during, self.cut = documents, during, cut
        self.ended: list[str] = []   # the holders whose streams ended (read or cancelled)

    def export(self, service, account_id):
        messages = list(chunks(json_pieces(self.documents[service]), 8))
        if service == self.cut:
            messages = messages[:-1]   # the stream ends without its completion marker

        def sent():
            try:
                for i, message in enumerate(messages):
                    if i == 1 and service == "clustering" and self.during is not None:
                        self.during()
                    yield message
            finally:
                self.ended.append(service)
        return verified(sent(), service)


@pytest.fixture
def jobs(tmp_path):
    db = SqliteDatabase(tmp_path / "privacy.sqlite")
    ConsentStore(db, None).migrate()
    return DeletionJobStore(db)


def _documents():
    return {"clustering": {"events": iter([{"event_id": f"e{i}", "ts": float(i)} for i in range(50)]),
                           "devices": []},
            "attribution": {"touchpoints": [], "conversions": []},
            "feedback": {"predictions": [], "feedback": [], "triggers": []}}


def _job(jobs, job_id: str):
    job = new_job(job_id, ErasureScope(ACCOUNT, "device", device_id="tv-1"), "olivia", "privacy_officer",
                  datetime.now(UTC))
    return jobs.create(job, f"r-{job_id}", "test", next_due=job.requested_at)


def _text(pieces) -> str:
    return b"".join(p.encode() if isinstance(p, str) else p for p in pieces).decode()


def test_the_document_is_whole_and_ends_with_the_completion_key(jobs):
    text = _text(export_household(ACCOUNT, _Parts(_documents()), jobs, None, CONSENT))
    data = json.loads(text)
    assert list(data) == ["account_id", "generated_at", "schema", "services", "v", "complete"]
    assert data["complete"] is True and len(data["services"]["clustering"]["events"]) == 50
    assert list(data["services"]) == ["attribution", "clustering", "feedback", "privacy"]


def test_a_deletion_in_progress_refuses_the_export_before_any_byte(jobs):
    _job(jobs, "job-pending")
    pieces = export_household(ACCOUNT, _Parts(_documents()), jobs, None, CONSENT)
    with pytest.raises(FailedPrecondition) as err:
        next(pieces)
    assert err.value.field == "account_id" and "job-pending" in str(err.value)


def test_a_deletion_that_ran_during_the_export_fails_it_before_the_document_is_closed(jobs):
    received = []
    pieces = export_household(ACCOUNT, _Parts(_documents(), during=lambda: _job(jobs, "job-racing")),
                              jobs, None, CONSENT)
    with pytest.raises(Conflict) as err:
        for piece in pieces:
            received.append(piece)
    assert "job-racing" in str(err.value) and err.value.field == "account_id"
    assert received and '"complete"' not in _text(received)
    with pytest.raises(json.JSONDecodeError):
        json.loads(_text(received))


def test_a_part_without_its_completion_marker_fails_the_export(jobs):
    received = []
    with pytest.raises(IncompleteExport, match="feedback's export ended before its completion marker"):
        for piece in export_household(ACCOUNT, _Parts(_documents(), cut="feedback"), jobs, None, CONSENT):
            received.append(piece)
    assert '"complete"' not in _text(received)


def test_a_part_whose_bytes_disagree_with_its_marker_fails():
    messages = list(chunks(json_pieces({"events": [1, 2, 3]}), 4))
    assert messages[0].data == b"{\"ev"
    messages[0] = common_pb2.ExportChunk(data=b"{\"e")   # one byte dropped on the way
    with pytest.raises(IncompleteExport, match="does not match its completion marker"):
        b"".join(verified(messages, "clustering"))


class _OldHolder:
    """A data holder of a release before session 26, as GrpcPeers' Peer sees it: no
    ExportAccountStream (the stream's first read raises ``code``: UNIMPLEMENTED, as such a
    release answers, or PERMISSION_DENIED, a holder that lists it but refuses the caller),
    ExportAccount only."""

    def __init__(self, code=grpc.StatusCode.PERMISSION_DENIED) -> None:
        self.code = code

    def call(self, method, request, **kwargs):
        if method == "ExportAccountStream":
            code = self.code

            class _Refused(grpc.RpcError):
                def code(self):
                    return code

            class _Stream:
                def __next__(self):
                    raise _Refused()

                def __iter__(self):
                    return self

                def cancel(self):
                    return True
            return _Stream()
        assert method == "ExportAccount" and kwargs.get("on_behalf_of_caller") is True
        return common_pb2.ExportAccountResponse(json=json.dumps({"touchpoints": [{"touchpoint_id": "t1"}]}))


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED])
def test_a_holder_without_the_stream_gives_its_part_through_the_unary_call(code):
    peers = GrpcPeers.__new__(GrpcPeers)
    peers._peers = {"attribution": _OldHolder(code)}
    peers._export_timeout = 30.0
    assert json.loads(b"".join(peers.export("attribution", ACCOUNT))) == {"touchpoints": [{"touchpoint_id": "t1"}]}


def test_a_reader_that_goes_away_ends_every_holders_stream_at_once(jobs):
    """The gateway's client disconnects after the first piece: privacy's generator is
    closed, and so is every data holder's stream it had opened (GrpcPeers cancels the
    call), instead of each holder's worker waiting on flow control until the deadline."""
    parts = _Parts(_documents())
    pieces = export_household(ACCOUNT, parts, jobs, None, CONSENT)
    next(pieces)
    assert parts.ended == []
    pieces.close()
    assert sorted(parts.ended) == ["attribution", "clustering", "feedback"]


def test_a_holder_streaming_its_most_exports_makes_the_export_retry_later_not_fail(jobs):
    """A data holder streams at most HEARTH_MAX_WORKERS / 4 exports at once and refuses
    another RESOURCE_EXHAUSTED (export_stream.bounded, review26): privacy's export then
    answers ResourceExhausted (429, retry later), not the holder's raw gRPC error (which
    the error table knows nothing of: an internal error, 5xx)."""
    from services.common.errors import ResourceExhausted

    class _Busy(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

    class _BusyClustering(_Parts):
        def export(self, service, account_id):
            if service == "clustering":
                def refused():
                    raise _Busy()
                    yield b""   # a generator, as GrpcPeers.export is
                return refused()
            return super().export(service, account_id)

    with pytest.raises(ResourceExhausted) as refused:
        b"".join(p.encode() if isinstance(p, str) else p
                 for p in export_household(ACCOUNT, _BusyClustering(_documents()), jobs, None, CONSENT))
    assert refused.value.field == "account_id" and "clustering" in str(refused.value)
