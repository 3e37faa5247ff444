"""The one permission matrix: complete over routes and RPCs, the policy decisions hold,
unknown targets are refused, and docs/security.md shows the current matrix."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import permissions
from services.common.errors import PermissionDenied
from services.common.identity import Principal, Role, service_principal
from services.common.permissions import Permission, authorize_route, authorize_rpc

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("clustering", "attribution", "privacy", "feedback", "common")  # common: DataHolder


def proto_rpcs() -> set[str]:
    rpcs = set()
    for name in SERVICES:
        module = importlib.import_module(f"hearth.{name}.v1.{name}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            rpcs |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return rpcs


def who(role: Role) -> Principal:
    return Principal(f"test-{role.value}", role)


def test_every_rpc_in_the_protos_is_in_the_matrix_and_nothing_else():
    mapped = {f"/{svc}/{m}" for svc, methods in permissions.RPCS.items() for m in methods}
    assert proto_rpcs() == mapped


def test_every_route_the_gateway_serves_is_in_the_matrix():
    from gateway.app import create_app
    from gateway.config import GatewaySettings

    app = create_app(GatewaySettings())
    served = {f"{method.upper()} {path}" for path, operations in app.openapi()["paths"].items()
              if path.startswith("/v1/") for method in operations}
    assert "POST /v1/events" in served
    missing = [route for route in served if permissions.route_permission(route) is None]
    assert not missing


def test_admin_may_do_everything_but_fetch_data_keys_list_withdrawn_accounts_or_erase():
    # Key material goes to stores only, the list of withdrawn accounts to attribution only,
    # Erase at a data holder to the privacy service's deletion fan-out only (admin deletes
    # through RequestDeletion), Rekey at a data holder to the privacy service's data key
    # rotation only (admin rotates through RotateDataKey); the generated table says so
    # (docs/security.md).
    assert permissions.ROLE_PERMISSIONS[Role.ADMIN] == frozenset(Permission) - {
        Permission.USE_DATA_KEY, Permission.LIST_WITHDRAWN_CONSENT, Permission.ERASE_DATA, Permission.REKEY_DATA}
    for rpc in proto_rpcs():
        if rpc.endswith(("/GetDataKey", "/GetDataKeys", "/ListWithdrawnConsent", "/Erase", "/Rekey")):
            with pytest.raises(PermissionDenied):
                authorize_rpc(who(Role.ADMIN), rpc)
        else:
            authorize_rpc(who(Role.ADMIN), rpc)
    for route in permissions.ROUTES:
        authorize_route(who(Role.ADMIN), route)


def test_only_the_attribution_service_lists_withdrawn_accounts():
    from services.common.identity import service_principal

    rpc = "/hearth.privacy.v1.Consent/ListWithdrawnConsent"
    authorize_rpc(service_principal("attribution"), rpc)
    for other in (service_principal("clustering"), service_principal("feedback"), service_principal("privacy"),
                  who(Role.PRIVACY_OFFICER), who(Role.ADMIN)):
        with pytest.raises(PermissionDenied):
            authorize_rpc(other, rpc)


@pytest.mark.parametrize("route", ["POST /v1/delete", "GET /v1/delete/{job_id}",
                                   "GET /v1/household/{account_id}/export", "PUT /v1/consent/{account_id}",
                                   "GET /v1/audit"])
def test_only_privacy_officer_and_admin_delete_export_consent_and_read_audit(route):
    permission = permissions.route_permission(route)
    assert set(permissions.roles_for(permission)) == {Role.ADMIN, Role.PRIVACY_OFFICER}


def test_analyst_reads_attribution_but_no_household_or_sessions():
    authorize_route(who(Role.ANALYST), "POST /v1/attribution")
    for target in ("GET /v1/household/{account_id}", "POST /v1/events", "POST /v1/assign"):
        with pytest.raises(PermissionDenied):
            authorize_route(who(Role.ANALYST), target)
    with pytest.raises(PermissionDenied):
        authorize_rpc(who(Role.ANALYST), "/hearth.clustering.v1.ClusteringService/GetHousehold")


def test_data_scientist_reads_households_records_feedback_but_sets_no_flag():
    for route in ("GET /v1/household/{account_id}", "GET /v1/calibration", "GET /v1/experiment",
                  "POST /v1/feedback"):
        authorize_route(who(Role.DATA_SCIENTIST), route)
    with pytest.raises(PermissionDenied):
        authorize_route(who(Role.DATA_SCIENTIST), "PUT /v1/experiment")


def test_service_ingests_assigns_and_erases_but_cannot_delete_or_export():
    for rpc in ("/hearth.clustering.v1.ClusteringService/IngestEvents",
                "/hearth.clustering.v1.ClusteringService/AssignSessions",
                "/hearth.attribution.v1.AttributionService/RecordTouchpoints",
                "/hearth.feedback.v1.FeedbackService/RecordPrediction"):
        authorize_rpc(who(Role.SERVICE), rpc)
    erase = [rpc for rpc in proto_rpcs() if rpc.endswith("/Erase")]
    assert erase == ["/hearth.common.v1.DataHolder/Erase"]  # one erasure contract
    for rpc in erase:
        authorize_rpc(service_principal("privacy"), rpc)   # the deletion fan-out, and only it
        for other in (who(Role.SERVICE), service_principal("feedback"), who(Role.ADMIN)):
            with pytest.raises(PermissionDenied):
                authorize_rpc(other, rpc)
        with pytest.raises(PermissionDenied):
            authorize_rpc(who(Role.PRIVACY_OFFICER), rpc)  # humans go through RequestDeletion
    for route in ("POST /v1/delete", "GET /v1/household/{account_id}/export", "GET /v1/audit"):
        with pytest.raises(PermissionDenied):
            authorize_route(who(Role.SERVICE), route)


@given(role=st.sampled_from(list(Role)),
       target=st.text(alphabet="/ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.{}", max_size=60))
def test_targets_outside_the_matrix_are_refused_for_every_role(role, target):
    if permissions.rpc_permission(target) is None:
        with pytest.raises(PermissionDenied):
            authorize_rpc(who(role), target)
    if permissions.route_permission(target) is None:
        with pytest.raises(PermissionDenied):
            authorize_route(who(role), target)


@pytest.mark.parametrize("given_route,expected", [
    ("get /v1/household/{id}", "GET /v1/household/{}"),
    ("GET  /v1/household/{account_id}/", "GET /v1/household/{}"),
    ("PUT /v1/consent/{x}", "PUT /v1/consent/{}"),
])
def test_route_templates_compare_without_parameter_names(given_route, expected):
    assert permissions.normalize_route(given_route) == expected


def test_parameter_names_do_not_matter_but_methods_do():
    assert permissions.route_permission("GET /v1/household/{id}/export") == Permission.EXPORT_HOUSEHOLD
    assert permissions.route_permission("DELETE /v1/household/{id}") is None


def test_denials_name_the_role_and_target():
    with pytest.raises(PermissionDenied) as info:
        authorize_route(who(Role.ANALYST), "POST /v1/delete")
    assert "analyst" in str(info.value) and "POST /v1/delete" in str(info.value)


def test_docs_security_md_shows_the_current_matrix():
    doc = (ROOT / "docs" / "security.md").read_text()
    assert permissions.render_doc(doc) == doc, (
        "docs/security.md is stale: run python -m services.common.permissions --write docs/security.md")


def test_generated_table_marks_exactly_the_granted_cells():
    table = permissions.matrix_markdown()
    roles = [r for r in Role]
    for route, permission in permissions.ROUTES.items():
        line = next(l for l in table.splitlines() if l.startswith(f"| `{route}` |"))
        cells = [c.strip() for c in line.strip("|").split("|")][2:]
        assert cells == ["yes" if permissions.client_may(r, permission) else "—" for r in roles]
    for service, methods in permissions.RPCS.items():
        for method, permission in methods.items():
            line = next(l for l in table.splitlines() if l.startswith(f"| `{service.split('.')[-1]}/{method}` |"))
            cells = [c.strip() for c in line.strip("|").split("|")][2:]
            assert cells == ["yes" if permissions.allowed(r, permission) else "—" for r in roles]


CONSENT_READS = ("/hearth.privacy.v1.Consent/GetConsent", "/hearth.privacy.v1.Consent/GetConsents")


def test_in_the_service_role_only_the_data_holders_read_consent():
    """An API key is bound to a principal and a role, no account: in the service role (an
    ingest pipeline's) it read every account's consent until session 34. The data holders
    that enforce consent (as svc:<name>, signed with their own keys) and the people's roles
    that set it read it; no other service-role principal does, over HTTP or gRPC."""
    for rpc in CONSENT_READS:
        for reader in (service_principal("clustering"), service_principal("attribution"),
                       service_principal("feedback"), who(Role.ADMIN), who(Role.PRIVACY_OFFICER)):
            authorize_rpc(reader, rpc)
        for other in (who(Role.SERVICE), Principal("ingest-pipeline", Role.SERVICE), service_principal("privacy"),
                      who(Role.ANALYST), who(Role.DATA_SCIENTIST)):
            with pytest.raises(PermissionDenied):
                authorize_rpc(other, rpc)
    route = "GET /v1/consent/{account_id}"
    for reader in (who(Role.ADMIN), who(Role.PRIVACY_OFFICER)):
        authorize_route(reader, route)
    for other in (who(Role.SERVICE), Principal("ingest-pipeline", Role.SERVICE), who(Role.ANALYST)):
        with pytest.raises(PermissionDenied):
            authorize_route(other, route)
    assert [r for r in Role if permissions.client_may(r, Permission.READ_CONSENT)] == [
        Role.ADMIN, Role.PRIVACY_OFFICER]


def test_a_service_role_key_keeps_what_it_ingests_with():
    """The restriction is read_consent's alone: the service role's other permissions
    stay an API key's."""
    for permission in permissions.ROLE_PERMISSIONS[Role.SERVICE]:
        named = permission in permissions.ONLY_PRINCIPALS or permission in permissions.SERVICE_ROLE_ONLY
        assert permissions.client_may(Role.SERVICE, permission) is not named, permission
        assert permissions.principal_allowed(Principal("ingest-pipeline", Role.SERVICE), permission) is not named


@given(st.text(min_size=1, max_size=40).filter(lambda s: not s.lower().startswith("svc:")),
       st.sampled_from(list(Role)), st.sampled_from(list(Permission)))
def test_every_client_of_a_role_gets_what_the_route_table_shows(principal_id, role, permission):
    """One rule (ledger35): the route table's cell (``client_may``: ``principal_allowed`` for ``client_principal``) and the gateway's
    decision for any API key or JWT in that role (``authorize_route`` ->
    ``principal_allowed``) are one function of the role, whatever the caller's id — until
    session 35 ``client_allowed`` restated the rule for the table and the access tests."""
    assert permissions.principal_allowed(Principal(principal_id, role), permission) is \
        permissions.client_may(role, permission)


def test_a_permission_limited_to_a_principal_that_is_not_a_mesh_service_is_refused_at_import():
    """What makes the route table true for every client: the principals a permission is
    limited to are svc: names, which no API key or JWT may take. One that is not (a
    client's id) would make the table wrong for that client, so it is refused."""
    with pytest.raises(ValueError, match="read_consent: 'ingest-pipeline' is not a svc: name"):
        permissions._named_principals_are_the_mesh_services(
            {Permission.READ_CONSENT: frozenset({"svc:clustering", "ingest-pipeline"})})
    permissions._named_principals_are_the_mesh_services(permissions.ONLY_PRINCIPALS, permissions.SERVICE_ROLE_ONLY)


def test_a_service_may_fetch_the_calibrator_clustering_applies():
    """Clustering (a service principal) fetches feedback's calibration map; before
    issue #10 this call was refused and the recalibration never reached assignments."""
    authorize_rpc(who(Role.SERVICE), "/hearth.feedback.v1.FeedbackService/GetCalibrator")
    with pytest.raises(PermissionDenied):
        authorize_rpc(who(Role.SERVICE), "/hearth.feedback.v1.FeedbackService/SetFlag")
