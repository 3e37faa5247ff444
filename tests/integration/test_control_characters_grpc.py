"""A NUL or other control character in each text field of the state-changing gRPC methods
attack29's sweep left out — data key rotations, the data holders' Erase and Rekey,
SetConsent / GetConsent(s), Keys/GetDataKey(s) — over gRPC to real services on SQLite and on
PostgreSQL (whose text cannot hold a NUL: INTERNAL, a 502 at the gateway, where the value
reached a query). Each must be INVALID_ARGUMENT naming the field, with nothing stored
(attack29b)."""

from __future__ import annotations

import time

import grpc
import pytest

from hearth.common.v1 import common_pb2, common_pb2_grpc
from hearth.privacy.v1 import privacy_pb2 as ppb
from services.common import audit, identity
from services.common.errors import ERROR_FIELD_KEY
from tests.helpers.servers import inprocess_mesh_on

OFFICER = identity.Principal("olivia", identity.Role.PRIVACY_OFFICER)
BAD = ("acct\x00", "acct\x01x", "acct\n")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mesh(request, tmp_path_factory):
    m = inprocess_mesh_on(request.param, request, tmp_path_factory, "ctrl")
    yield m
    m.stop()


def _calls(mesh, bad: str):
    """(field the refusal must name, the call) for each text field."""
    officer = mesh.stub("privacy", OFFICER)
    admin = mesh.stub("privacy")
    clustering = mesh.stub("privacy", identity.service_principal("clustering"))
    attribution = mesh.stub("privacy", identity.service_principal("attribution"))
    holder = mesh.stub("clustering", identity.service_principal("privacy"), stub_cls=common_pb2_grpc.DataHolderStub)
    scope = common_pb2.ErasureScope
    return [
        ("request_id", lambda: officer.RequestDataKeyRotations(
            ppb.RequestDataKeyRotationsRequest(older_than_days=30, limit=10, request_id=f"rq-{bad}"))),
        ("job_id", lambda: officer.GetDataKeyRotations(ppb.GetDataKeyRotationsRequest(job_id=f"rot-{bad}"))),
        ("account_id", lambda: admin.RotateDataKey(ppb.RotateDataKeyRequest(account_id=bad))),
        ("new_active_kek_id", lambda: admin.RotateKeys(ppb.RotateKeysRequest(new_active_kek_id=bad))),
        ("account_id", lambda: clustering.GetDataKey(ppb.GetDataKeyRequest(account_id=bad))),
        ("account_ids[1]", lambda: clustering.GetDataKeys(ppb.GetDataKeysRequest(account_ids=["ok-1", bad]))),
        ("account_id", lambda: admin.SetConsent(ppb.SetConsentRequest(account_id=bad, processing=False))),
        ("account_id", lambda: admin.GetConsent(ppb.GetConsentRequest(account_id=bad))),
        ("account_ids[1]", lambda: admin.GetConsents(ppb.GetConsentsRequest(account_ids=["ok-1", bad]))),
        ("after_account_id", lambda: attribution.ListWithdrawnConsent(
            ppb.ListWithdrawnConsentRequest(after_account_id=bad))),
        ("job_id", lambda: holder.Erase(common_pb2.EraseRequest(
            scope=scope(account_id="ok-1", household=True), job_id=f"job-{bad}"))),
        ("scope.account_id", lambda: holder.Erase(common_pb2.EraseRequest(
            scope=scope(account_id=bad, household=True)))),
        ("scope.device_id", lambda: holder.Erase(common_pb2.EraseRequest(
            scope=scope(account_id="ok-1", device_id=bad)))),
        ("scope.person_id", lambda: holder.Erase(common_pb2.EraseRequest(
            scope=scope(account_id="ok-1", person_id=bad)))),
        ("account_id", lambda: holder.Rekey(common_pb2.RekeyRequest(account_id=bad, dek_version=2))),
    ]


@pytest.mark.parametrize("bad", BAD, ids=["nul", "soh", "newline"])
def test_a_control_character_in_a_text_field_is_refused_naming_it(mesh, bad):
    refused = []
    for field, call in _calls(mesh, bad):
        try:
            call()
            refused.append((field, "OK"))
        except grpc.RpcError as err:
            named = dict(err.trailing_metadata() or ()).get(ERROR_FIELD_KEY)
            refused.append((field, err.code().name if err.code() != grpc.StatusCode.INVALID_ARGUMENT
                            else f"INVALID_ARGUMENT:{named}"))
    assert refused == [(field, f"INVALID_ARGUMENT:{field}") for field, _ in _calls(mesh, bad)]
    # Nothing stored: no consent set, no rotation batch opened by the officer.
    admin = mesh.stub("privacy")
    admin = mesh.stub("privacy")
    assert list(mesh.stub("privacy", identity.service_principal("attribution")).ListWithdrawnConsent(ppb.ListWithdrawnConsentRequest()).accounts) == []
    opened = mesh.stub("privacy", OFFICER).RequestDataKeyRotations(
        ppb.RequestDataKeyRotationsRequest(older_than_days=30, limit=10, request_id=f"after-{BAD.index(bad)}"))
    assert opened.job_id
    # The refused calls are on record, their household written escaped: a NUL in a record's
    # resource failed PostgreSQL's group commit, and every record of its batch was dropped
    # with it (the officer's rotation below among them); SQLite stored it raw.
    escaped = "household:" + bad.encode("unicode_escape").decode("ascii")
    deadline, resources = time.monotonic() + 15, set()
    while time.monotonic() < deadline:
        found = admin.QueryAudit(ppb.QueryAuditRequest(resource_prefix="household:acct", limit=500))
        resources = {r.resource for r in found.records}
        batch = admin.QueryAudit(ppb.QueryAuditRequest(principal_id=OFFICER.id, limit=500)).records
        rotations = [r for r in batch if r.event_type == audit.KEY_ROTATION and r.outcome == "success"]
        if escaped in resources and len(rotations) >= BAD.index(bad) + 1:
            break
        time.sleep(0.2)
    assert escaped in resources, resources
    assert len(rotations) >= BAD.index(bad) + 1, [(r.event_type, r.outcome) for r in batch]
    assert all(r.isprintable() for r in resources), resources
