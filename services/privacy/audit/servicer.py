"""gRPC adapter of the audit log: AppendAudit, QueryAudit, GetAuditProof, VerifyAudit.

Thin: validate -> convert -> one call on the ``AuditApp`` -> convert back.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

from hearth.common.v1 import common_pb2
from hearth.privacy.v1 import privacy_pb2 as pb
from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.common import identity
from services.common.audit import OUTCOME_ALIASES, AuditRecord
from services.common.errors import InvalidArgument
from services.common.ids import MIN_QUERY_TS, check_query_ts, check_ts
from services.common.pbutil import float_to_ts
from services.privacy.audit.app import AuditApp
from services.privacy.audit.rows import StoredEntry
from services.privacy.audit.store import MAX_QUERY_LIMIT, AuditQuery
from services.privacy.audit.domain import SignedTreeHead, canonical_json

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuditLog"].full_name

_ROLE_NAME = {v.number: v.name[len("ROLE_"):].lower()
              for v in common_pb2.Role.DESCRIPTOR.values if v.number}
_ROLE_PB = {name: number for number, name in _ROLE_NAME.items()}


def _ts_seconds(message, name: str, field: str) -> float | None:
    if not message.HasField(name):
        return None
    ts = getattr(message, name)
    return check_query_ts(ts.seconds + ts.nanos / 1e9, field)


# A record's details as JSON, at most (attack31): every reader of the log carries them —
# a page of QueryAudit, the export, VerifyAudit (which holds the whole log) — and until
# then they took up to 1,000,000 characters (the details map as many entries as 16 MiB
# holds): 200 records of 900 KB made one QueryAudit take privacy to 2 GB. The records
# Hearth writes hold under 1 KB (an RPC's name, code, component and a few counts).
MAX_DETAILS_CHARS = 65_536


def record_from_pb(message: pb.AuditRecord, index: int, caller: identity.Principal,
                   now: float) -> AuditRecord:
    """An AuditRecord from the wire. The principal defaults to the caller; ts to now;
    details_json wins over the details map; record_id defaults to a fresh id (then a
    retry is not recognised as a repeat)."""
    # Every text field was checked under the one text rule before the handler ran
    # (text.check_text_fields, the server's interceptor): a NUL failed PostgreSQL's group
    # commit, INTERNAL for every record in the flush, and SQLite stored it (attack29).
    where = f"records[{index}]"
    if message.HasField("principal") and message.principal.id:
        role = _ROLE_NAME.get(message.principal.role)
        if role is None:
            raise InvalidArgument("must be one of the five roles", f"{where}.principal.role")
        principal, role_name = message.principal.id, role
    else:
        principal, role_name = caller.id, caller.role.value
    if message.details_json:
        details_json = message.details_json
    else:
        details_json = json.dumps(dict(message.details), sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=False)
    if len(details_json) > MAX_DETAILS_CHARS:
        raise InvalidArgument(f"at most {MAX_DETAILS_CHARS} characters of details (as JSON), got {len(details_json)}",
                              f"{where}.details_json" if message.details_json else f"{where}.details")
    # A record tells what happened: no further ahead than ingest allows (attack34: one dated
    # a day ahead moved the suspicious-activity detector's clock past every later entry, and
    # no alert fired after it), from 1970-01-01 as the log's records always were.
    ts = (check_ts(message.ts.seconds + message.ts.nanos / 1e9, f"{where}.ts", now, earliest=MIN_QUERY_TS)
          if message.HasField("ts") else None)
    return AuditRecord(
        ts=now if ts is None else ts, event_type=message.event_type, principal=principal,
        role=role_name, resource=message.resource,
        outcome=OUTCOME_ALIASES.get(message.outcome or "success", message.outcome or "success"),
        trace_id=message.trace_id, details_json=details_json,
        record_id=message.record_id or uuid.uuid4().hex)


def entry_to_pb(stored: StoredEntry) -> pb.AuditRecord:
    e = stored.entry
    details = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"),
                                                           ensure_ascii=False)
               for k, v in e.details.items()}
    return pb.AuditRecord(
        seq=e.seq, ts=float_to_ts(e.ts.timestamp()), event_type=e.event_type.value,
        principal=common_pb2.Principal(id=e.principal, role=_ROLE_PB[e.role.value]),
        resource=e.resource, outcome=e.outcome.value, trace_id=e.trace_id, details=details,
        entry_hash=stored.chain_hash, details_json=canonical_json(e.details).decode("utf-8"),
        canonical=stored.canonical)


def sth_to_pb(sth: SignedTreeHead | None) -> pb.SignedTreeHead | None:
    if sth is None:
        return None
    return pb.SignedTreeHead(
        tree_size=sth.tree_size, root_hash=sth.root, timestamp=float_to_ts(sth.timestamp.timestamp()),
        signature=sth.signature, chain_head=sth.chain_head, key_id=sth.key_id,
        json=canonical_json(sth.to_dict()).decode("utf-8"))



class AuditLogServicer(pb_grpc.AuditLogServicer):
    """The four audit RPCs over one ``AuditApp``."""

    def __init__(self, app: AuditApp) -> None:
        self._app = app

    def AppendAudit(self, request, context) -> pb.AppendAuditResponse:
        app = self._app
        if len(request.records) > 10_000:
            raise InvalidArgument("at most 10000 records per call", "records")
        caller = identity.current_principal()
        now = time.time()
        records = [record_from_pb(r, i, caller, now) for i, r in enumerate(request.records)]
        seqs = app.append_untrusted(records, caller)
        sth = app.latest_sth()
        return pb.AppendAuditResponse(first_seq=seqs[0] if seqs else -1,
                                      tree_size=sth.tree_size if sth else 0, seqs=seqs)

    def QueryAudit(self, request, context) -> pb.QueryAuditResponse:
        app = self._app
        if not 0 <= request.limit <= MAX_QUERY_LIMIT:
            raise InvalidArgument(f"must be in 0..{MAX_QUERY_LIMIT}", "limit")
        start = end = None
        if request.HasField("window"):
            s = _ts_seconds(request.window, "start", "window.start")
            e = _ts_seconds(request.window, "end", "window.end")
            start = datetime.fromtimestamp(s, UTC) if s is not None else None
            end = datetime.fromtimestamp(e, UTC) if e is not None else None
            # An empty window by construction answers "no records", which a reader takes
            # for "nothing happened then" (attack26); the other windows refuse it too.
            if start is not None and end is not None and end <= start:
                raise InvalidArgument("end must be after start", "window.end")
        # The text filters were checked under the one text rule before the handler ran
        # (a NUL made PostgreSQL refuse the query, INTERNAL, and SQLite match nothing).
        outcome = OUTCOME_ALIASES.get(request.outcome, request.outcome)
        q = AuditQuery(principal_id=request.principal_id, resource_prefix=request.resource_prefix,
                       event_type=request.event_type, trace_id=request.trace_id, outcome=outcome,
                       start=start, end=end,
                       after_seq=request.after_seq if request.HasField("after_seq") else None,
                       limit=request.limit or 100)
        # The head is read BEFORE the rows: every entry it covers is already committed.
        sth = app.latest_sth() if request.with_tree_head else None
        entries, more = app.query(q)
        response = pb.QueryAuditResponse(records=[entry_to_pb(s) for s in entries], has_more=more)
        if sth is not None:
            response.tree_head.CopyFrom(sth_to_pb(sth))
        return response

    def GetAuditProof(self, request, context) -> pb.GetAuditProofResponse:
        app = self._app
        kind = request.WhichOneof("proof")
        if kind is None:
            raise InvalidArgument("set inclusion_seq or consistency_from_size", "proof")
        if request.tree_size < 0:
            raise InvalidArgument("must be >= 0", "tree_size")
        response = pb.GetAuditProofResponse(public_key_pem=app.public_key_pem)
        if kind == "inclusion_seq":
            sth, path, leaf, stored = app.inclusion_proof(request.inclusion_seq, request.tree_size)
            response.leaf_hash = leaf
            response.record.CopyFrom(entry_to_pb(stored))
        else:
            sth, path, old = app.consistency_proof(request.consistency_from_size, request.tree_size)
            if old is not None:
                response.old_tree_head.CopyFrom(sth_to_pb(old))
        response.tree_head.CopyFrom(sth_to_pb(sth))
        response.path.extend(path)
        return response

    def VerifyAudit(self, request, context) -> pb.VerifyAuditResponse:
        app = self._app
        checked = app.verify()
        r = checked.result
        response = pb.VerifyAuditResponse(
            valid=r.ok, entries=checked.entries,
            first_bad_seq=-1 if r.first_bad_seq is None else r.first_bad_seq,
            reason=r.reason.value if r.reason else "", message=r.message,
            public_key_pem=app.public_key_pem)
        if checked.sth is not None:
            response.tree_head.CopyFrom(sth_to_pb(checked.sth))
        return response
