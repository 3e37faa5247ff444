"""Who may do what: the ONE permission matrix, enforced at the gateway (``authorize_route``)
and again in every service (``authorize_rpc``, called by the server interceptor), so an
internal caller that skips the gateway meets the same rules.

The matrix is written once, as *permissions per role* (``ROLE_PERMISSIONS``). Routes and
RPCs are then mapped to the one permission each needs (``ROUTES``, ``RPCS``). Anything
not in those maps is refused (fail closed), and tests check that every gateway route and
every RPC in the protos is mapped. ``docs/security.md`` holds the table generated from
here (``python -m services.common.permissions --write docs/security.md``; a test fails
when the page is stale).

Decisions (the reasons are repeated in docs/security.md):

* Only privacy_officer and admin delete, export, set consent and read the audit log.
* analyst reads attribution, calibration and experiment results: aggregates across
  households. No raw sessions or household models.
* data_scientist reads households (pseudonymous ids, no names), attribution,
  calibration and experiments, records feedback labels and may trigger a refit (derived
  state, rebuilt from sessions). It may NOT set flags: a flag changes the variant served
  to every household and has a kill switch; separating "evaluate the experiment" from
  "change production" keeps one person from doing both unreviewed. admin sets flags.
* service principals ingest, assign, record touchpoints/conversions/predictions/
  feedback, append to the audit log, read consent and households and resolve persons
  (attribution builds per-person journeys with ``ResolvePersons`` — as itself, since the
  analyst who asked may not see persons — and privacy collects exports). read_consent
  only as the mesh's own data holders (``SERVICE_ROLE_ONLY``): an API key in the service
  role (an ingest pipeline's) reads no account's consent.
* erase_data (``DataHolder/Erase``) is ``svc:privacy``'s only (``ONLY_PRINCIPALS``), admin
  excluded: the privacy service fans every deletion out to the data holders' ``Erase``
  RPCs as itself, after auditing the human's request (see ``identity.acting_as``);
  nobody else erases outside a deletion job.
* ``DataHolder/ExportAccount`` on each data-holding service needs export_household: the privacy
  service gathers an export *on behalf of* the privacy officer or admin who asked, so
  the matrix (not a service role) decides who may read a whole household.
* service principals read calibration (``GetCalibrator``): the clustering service
  applies the feedback service's current calibration map to every assignment it
  answers; without it the recalibration never reached a running mesh (issue #10).
* list_withdrawn_consent (privacy ``ListWithdrawnConsent``) is for ``svc:attribution``
  only (``ONLY_PRINCIPALS``), admin excluded: it lists every account that withdrew
  consent, which the attribution service needs to leave those accounts out of an
  ``Attribute`` over all accounts and nobody else does.
* use_data_key (privacy ``GetDataKey``, ``GetDataKeys``) is ``svc:clustering``'s and ``svc:attribution``'s
  only (``ONLY_PRINCIPALS``), admin excluded: those stores fetch a household's data key to
  encrypt fields at rest, and no person (nor an API client in the service role) needs raw
  key material. rotate_keys is admin only. rotate_data_key (privacy ``RotateDataKey``: one
  household's data key rotated, its data re-encrypted) is the privacy officer's and admin's;
  rekey_data (``DataHolder/Rekey``, the re-encryption in each store) is ``svc:privacy``'s
  only (``ONLY_PRINCIPALS``), as erase_data.
* admin: everything else.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from enum import Enum
from pathlib import Path

from services.common.errors import PermissionDenied
from services.common.identity import Principal, Role, SecurityEvent, report_security_event, reserved_principal_id


class Permission(str, Enum):
    INGEST_EVENTS = "ingest_events"
    ASSIGN_SESSIONS = "assign_sessions"
    READ_HOUSEHOLD = "read_household"
    REFIT_MODEL = "refit_model"
    RESOLVE_PERSONS = "resolve_persons"
    RECORD_TOUCHPOINTS = "record_touchpoints"
    RECORD_CONVERSIONS = "record_conversions"
    READ_ATTRIBUTION = "read_attribution"
    ERASE_DATA = "erase_data"
    REQUEST_DELETION = "request_deletion"
    READ_DELETION = "read_deletion"
    VERIFY_RECEIPT = "verify_receipt"
    EXPORT_HOUSEHOLD = "export_household"
    SET_CONSENT = "set_consent"
    READ_CONSENT = "read_consent"
    LIST_WITHDRAWN_CONSENT = "list_withdrawn_consent"
    APPEND_AUDIT = "append_audit"
    READ_AUDIT = "read_audit"
    RECORD_PREDICTION = "record_prediction"
    RECORD_FEEDBACK = "record_feedback"
    READ_CALIBRATION = "read_calibration"
    READ_EXPERIMENT = "read_experiment"
    SET_FLAG = "set_flag"
    USE_DATA_KEY = "use_data_key"
    ROTATE_KEYS = "rotate_keys"
    ROTATE_DATA_KEY = "rotate_data_key"
    REKEY_DATA = "rekey_data"


P = Permission

# THE matrix.
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    # Everything but use_data_key: a household's data key goes to stores only (the table
    # in docs/security.md is generated from this, so it says what the services enforce).
    Role.ADMIN: frozenset(Permission) - {P.USE_DATA_KEY, P.LIST_WITHDRAWN_CONSENT, P.ERASE_DATA, P.REKEY_DATA},
    Role.ANALYST: frozenset({P.READ_ATTRIBUTION, P.READ_CALIBRATION, P.READ_EXPERIMENT}),
    Role.DATA_SCIENTIST: frozenset({
        P.READ_HOUSEHOLD, P.REFIT_MODEL, P.RESOLVE_PERSONS, P.READ_ATTRIBUTION, P.RECORD_FEEDBACK,
        P.READ_CALIBRATION, P.READ_EXPERIMENT}),
    Role.PRIVACY_OFFICER: frozenset({
        P.REQUEST_DELETION, P.READ_DELETION, P.VERIFY_RECEIPT, P.EXPORT_HOUSEHOLD,
        P.SET_CONSENT, P.READ_CONSENT, P.READ_AUDIT, P.ROTATE_DATA_KEY}),
    Role.SERVICE: frozenset({
        P.INGEST_EVENTS, P.ASSIGN_SESSIONS, P.READ_HOUSEHOLD, P.REFIT_MODEL, P.RESOLVE_PERSONS,
        P.RECORD_TOUCHPOINTS, P.RECORD_CONVERSIONS, P.ERASE_DATA, P.READ_CONSENT,
        P.LIST_WITHDRAWN_CONSENT, P.APPEND_AUDIT, P.RECORD_PREDICTION, P.RECORD_FEEDBACK, P.READ_EXPERIMENT,
        P.READ_CALIBRATION, P.USE_DATA_KEY, P.REKEY_DATA}),
}

# Gateway routes, "METHOD /path/template". Parameter names do not matter: templates are
# compared with every "{name}" reduced to "{}".
ROUTES: dict[str, Permission] = {
    "POST /v1/events": P.INGEST_EVENTS,
    "POST /v1/assign": P.ASSIGN_SESSIONS,
    # Which of a batch's event ids are stored (after a 504): says what a household holds,
    # so reading the household's permission, not ingesting's.
    "POST /v1/events/status": P.READ_HOUSEHOLD,
    "GET /v1/household/{account_id}": P.READ_HOUSEHOLD,
    "GET /v1/household/{account_id}/export": P.EXPORT_HOUSEHOLD,
    "POST /v1/attribution": P.READ_ATTRIBUTION,   # a query with a body, not a write
    "POST /v1/touchpoints": P.RECORD_TOUCHPOINTS,
    "POST /v1/conversions": P.RECORD_CONVERSIONS,
    "POST /v1/delete": P.REQUEST_DELETION,
    "GET /v1/delete/{job_id}": P.READ_DELETION,
    "POST /v1/feedback": P.RECORD_FEEDBACK,
    "GET /v1/calibration": P.READ_CALIBRATION,
    "GET /v1/experiment": P.READ_EXPERIMENT,
    "PUT /v1/experiment": P.SET_FLAG,
    "GET /v1/calibrators/{variant}": P.READ_CALIBRATION,
    "PUT /v1/calibrators/{variant}": P.SET_FLAG,
    "GET /v1/audit": P.READ_AUDIT,
    "GET /v1/audit/export": P.READ_AUDIT,
    "GET /v1/consent/{account_id}": P.READ_CONSENT,
    "PUT /v1/consent/{account_id}": P.SET_CONSENT,
    "POST /v1/keys/rotate": P.ROTATE_KEYS,   # `hearth keys rotate` (KEK rotation, admin)
    # `hearth keys rotate-household` (one household's data key, privacy officer or admin)
    "POST /v1/household/{account_id}/rotate-key": P.ROTATE_DATA_KEY,
    "POST /v1/keys/rotate-households": P.ROTATE_DATA_KEY,   # `hearth keys rotate-households` (a batch job)
    "GET /v1/keys/rotate-households/{job_id}": P.ROTATE_DATA_KEY,   # the batch job's state
}

# RPCs per full gRPC service name.
RPCS: dict[str, dict[str, Permission]] = {
    # The erasure contract, served by clustering, attribution and feedback alike.
    "hearth.common.v1.DataHolder": {
        "Erase": P.ERASE_DATA,
        "ExportAccount": P.EXPORT_HOUSEHOLD,
        "ExportAccountStream": P.EXPORT_HOUSEHOLD,
        "Rekey": P.REKEY_DATA,
    },
    "hearth.clustering.v1.ClusteringService": {
        "IngestEvents": P.INGEST_EVENTS,
        "AssignSession": P.ASSIGN_SESSIONS,
        "AssignSessions": P.ASSIGN_SESSIONS,
        "GetHousehold": P.READ_HOUSEHOLD,
        "GetEventStatus": P.READ_HOUSEHOLD,
        "Refit": P.REFIT_MODEL,
        "ResolvePersons": P.RESOLVE_PERSONS,
        "GetPersonDevices": P.RESOLVE_PERSONS,   # a person's own devices: attribution's person erasure
        "RecordLabels": P.RECORD_FEEDBACK,
    },
    "hearth.attribution.v1.AttributionService": {
        "RecordTouchpoints": P.RECORD_TOUCHPOINTS,
        "RecordConversions": P.RECORD_CONVERSIONS,
        "Attribute": P.READ_ATTRIBUTION,
    },
    # The privacy process hosts four services, one per room.
    "hearth.privacy.v1.Deletion": {
        "RequestDeletion": P.REQUEST_DELETION,
        "GetDeletion": P.READ_DELETION,
        "VerifyReceipt": P.VERIFY_RECEIPT,
        "ExportHousehold": P.EXPORT_HOUSEHOLD,
        "ExportHouseholdStream": P.EXPORT_HOUSEHOLD,
    },
    "hearth.privacy.v1.Consent": {
        "SetConsent": P.SET_CONSENT,
        "GetConsent": P.READ_CONSENT,
        "GetConsents": P.READ_CONSENT,
        "ListWithdrawnConsent": P.LIST_WITHDRAWN_CONSENT,
    },
    "hearth.privacy.v1.AuditLog": {
        "AppendAudit": P.APPEND_AUDIT,
        "QueryAudit": P.READ_AUDIT,
        "GetAuditProof": P.READ_AUDIT,
        "VerifyAudit": P.READ_AUDIT,
    },
    "hearth.privacy.v1.Keys": {
        "GetDataKey": P.USE_DATA_KEY,
        "GetDataKeys": P.USE_DATA_KEY,
        "RotateKeys": P.ROTATE_KEYS,
        "RotateDataKey": P.ROTATE_DATA_KEY,
        "RotateDataKeys": P.ROTATE_DATA_KEY,
        "RequestDataKeyRotations": P.ROTATE_DATA_KEY,
        "GetDataKeyRotations": P.ROTATE_DATA_KEY,   # a batch's state: who may rotate may follow it
    },
    "hearth.feedback.v1.FeedbackService": {
        "RecordPrediction": P.RECORD_PREDICTION,
        "RecordFeedback": P.RECORD_FEEDBACK,
        "GetCalibration": P.READ_CALIBRATION,
        "GetCalibrator": P.READ_CALIBRATION,
        "ListCalibrators": P.READ_CALIBRATION,
        "GetExperiment": P.READ_EXPERIMENT,
        "GetVariants": P.READ_EXPERIMENT,   # GetExperiment's variant, of many households
        "SetFlag": P.SET_FLAG,
        # Which calibrator is in force is a model flag: who may flip the experiment's
        # flags may roll a calibrator back.
        "ActivateCalibrator": P.SET_FLAG,
    },
}

# Permissions held by one service principal only, not by the whole service role: the
# list of withdrawn accounts is what the attribution service needs to leave them out of
# an Attribute call over all accounts; no other service (and no person: it lists every
# account that withdrew) has a use for it.
#
# erase_data (each data holder's DataHolder/Erase) is the privacy service's alone: it runs a
# deletion job's fan-out (after auditing the human's request, with retries and the signed
# receipt) and the retention purge. Until session 18 every service principal and admin
# held it, so a captured token of any of them (the gateway forwards an admin's on every
# admin request; a service's rides on each of its calls), replayed straight at a data
# holder's port within its 5 minutes, erased a household with no deletion job, consent
# record or receipt. People delete through POST /v1/delete.
ONLY_PRINCIPALS: dict[Permission, frozenset[str]] = {
    P.LIST_WITHDRAWN_CONSENT: frozenset({"svc:attribution"}),
    P.ERASE_DATA: frozenset({"svc:privacy"}),
    # rekey_data (DataHolder/Rekey) likewise: the privacy service's data key rotation calls
    # it between creating the household's new key version and destroying the old one.
    P.REKEY_DATA: frozenset({"svc:privacy"}),
    # A household's data key decrypts everything stored of it, and only the stores that
    # encrypt fields fetch one (services/common/field_crypto.py). Until session 19 it was
    # the whole service role's: with a key per component the gateway still vouches for
    # API-key clients in the service role (ingestion pipelines), so a compromised gateway
    # signing "anyone" as service fetched any household's key; only svc:<name> needs its
    # own component's key, which the gateway does not hold.
    P.USE_DATA_KEY: frozenset({"svc:clustering", "svc:attribution"}),
}

# Permissions the service role holds only as the named principals — the mesh's own
# services, which sign as svc:<name> with their own keys — while the people's roles that
# hold them in ROLE_PERMISSIONS keep them (ONLY_PRINCIPALS, above, binds every role).
#
# read_consent (privacy's GetConsent / GetConsents, GET /v1/consent/{account_id}): the data
# holders check an account's consent before they store or use anything of it. An API key
# (or a JWT) is bound to one principal and one role and to nothing narrower — no account,
# no household — so in the service role it is an ingest pipeline's, and held read_consent
# for every account: until session 34 any such key read any account's flags and how often
# they changed over HTTP (session 33's route), an account it never wrote included. A
# pipeline has no use for that: a write of a withdrawn account is refused (412 naming it)
# by the service that enforces consent. Such a caller gets the route's 403 before privacy
# is asked, the same for every account id (docs/security.md, "Who reads an account's consent").
SERVICE_ROLE_ONLY: dict[Permission, frozenset[str]] = {
    P.READ_CONSENT: frozenset({"svc:clustering", "svc:attribution", "svc:feedback"}),
}

_PARAM = re.compile(r"\{[^{}/]*\}")


@functools.lru_cache(maxsize=4096)   # the gateway asks for the same few routes on every request
def normalize_route(route: str) -> str:
    """``"get  /v1/x/{id}/"`` -> ``"GET /v1/x/{}"``: upper-case method, one space,
    parameters unnamed, no trailing slash."""
    method, _, path = route.strip().partition(" ")
    path = _PARAM.sub("{}", path.strip())
    if len(path) > 1:
        path = path.rstrip("/")
    return f"{method.upper()} {path}"


_ROUTE_INDEX: dict[str, Permission] = {normalize_route(r): p for r, p in ROUTES.items()}
_RPC_INDEX: dict[str, Permission] = {f"/{svc}/{m}": p for svc, methods in RPCS.items()
                                     for m, p in methods.items()}


def allowed(role: Role, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS.get(role, frozenset())


def principal_allowed(principal: Principal, permission: Permission) -> bool:
    """``allowed`` for the principal's role, and the principal itself where the
    permission is held by named principals only (``ONLY_PRINCIPALS``; in the service
    role, ``SERVICE_ROLE_ONLY``)."""
    only = ONLY_PRINCIPALS.get(permission)
    if principal.role is Role.SERVICE and only is None:
        only = SERVICE_ROLE_ONLY.get(permission)
    return allowed(principal.role, permission) and (only is None or principal.id in only)


def _named_principals_are_the_mesh_services(*tables: dict[Permission, frozenset[str]]) -> None:
    """Every principal a permission is limited to is one of the mesh's own ``svc:`` names,
    which no API key or JWT subject may take (gateway/auth.py). So ``principal_allowed``
    answers the same for every caller the gateway authenticates in a role, and
    ``client_principal`` stands for all of them (the route table below)."""
    for table in tables:
        for permission, ids in table.items():
            for principal_id in sorted(ids):
                if not reserved_principal_id(principal_id):
                    raise ValueError(f"{permission.value}: {principal_id!r} is not a svc: name: a permission "
                                     "limited to named principals names the mesh's own services only")


_named_principals_are_the_mesh_services(ONLY_PRINCIPALS, SERVICE_ROLE_ONLY)


def client_principal(role: Role) -> Principal:
    """A caller the gateway authenticates (an API key or a JWT) in ``role``, as the route
    table shows it: never a ``svc:`` name, so what ``principal_allowed`` answers for this
    one it answers for every such caller. (Until session 35 ``client_allowed`` restated
    ``principal_allowed``'s rule for such callers.)"""
    return Principal("client", role)


def client_may(role: Role, permission: Permission) -> bool:
    """``principal_allowed`` for ``client_principal(role)``: what any API key or JWT in
    ``role`` gets (the route table's cell). The composition, not a second rule (review35 R2:
    it was spelled out in six places)."""
    return principal_allowed(client_principal(role), permission)


def route_permission(route: str) -> Permission | None:
    return _ROUTE_INDEX.get(normalize_route(route))


def rpc_permission(full_method: str) -> Permission | None:
    return _RPC_INDEX.get(full_method)


def roles_for(permission: Permission) -> list[Role]:
    return [role for role in Role if allowed(role, permission)]


def _deny(principal: Principal, target: str, component: str, known: bool) -> PermissionDenied:
    report_security_event(SecurityEvent("permission_denied", component,
                                        "not_in_matrix" if known else "unmapped_target",
                                        principal.id, principal.role.value, target))
    return PermissionDenied(f"role {principal.role.value} may not call {target}", field="")


def authorize_rpc(principal: Principal, full_method: str) -> None:
    """Raise PermissionDenied unless ``principal`` may call ``/pkg.Service/Method``.
    An RPC missing from the matrix is refused for every role."""
    permission = rpc_permission(full_method)
    if permission is None or not principal_allowed(principal, permission):
        service = full_method.split(".")[1] if full_method.count(".") >= 2 else "unknown"
        raise _deny(principal, full_method, service, permission is not None)


def authorize_route(principal: Principal, route: str) -> None:
    """Raise PermissionDenied unless ``principal`` may call ``"METHOD /path/template"``.
    A route missing from the matrix is refused for every role."""
    permission = route_permission(route)
    if permission is None or not principal_allowed(principal, permission):
        raise _deny(principal, route, "gateway", permission is not None)


# ---------------------------------------------------------------------------------------
# the documentation table, generated from the matrix above
# ---------------------------------------------------------------------------------------

DOC_BEGIN = "<!-- permission-matrix:begin (generated by python -m services.common.permissions --write docs/security.md) -->"
DOC_END = "<!-- permission-matrix:end -->"


def matrix_markdown() -> str:
    """Markdown tables: one row per route and per RPC, one column per role."""
    roles = list(Role)
    header = "| {} | permission | " + " | ".join(r.value for r in roles) + " |"
    rule = "|---|---|" + "|".join(":-:" for _ in roles) + "|"

    def row(target: str, permission: Permission, holds=allowed) -> str:
        marks = " | ".join("yes" if holds(r, permission) else "—" for r in roles)
        return f"| `{target}` | {permission.value} | {marks} |"

    # A route's caller is an API key or a JWT, never a svc: principal: its cells say what
    # such a caller gets (client_may), the RPCs' what each role
    # holds at all.
    lines = ["#### Gateway routes", "", header.format("route"), rule]
    lines += [row(route, perm, client_may) for route, perm in ROUTES.items()]
    lines += ["", "#### gRPC methods (enforced again inside each service)", "",
              header.format("RPC"), rule]
    for service, methods in RPCS.items():
        short = service.split(".")[-1]
        lines += [row(f"{short}/{method}", perm) for method, perm in methods.items()]
    lines += ["", "#### Permissions per role", "", "| role | permissions |", "|---|---|"]
    for role in roles:
        granted = ", ".join(p.value for p in Permission if allowed(role, p))
        lines.append(f"| {role.value} | {granted} |")
    if ONLY_PRINCIPALS:
        lines += ["", "Held by the named service principals only (not by every service): "
                  + "; ".join(f"{p.value}: " + ", ".join(f"`{n}`" for n in sorted(names))
                              for p, names in ONLY_PRINCIPALS.items()) + "."]
    if SERVICE_ROLE_ONLY:
        lines += ["", "In the service role, held by the mesh's own services only (API keys and JWTs "
                  "in that role do not hold them; the people's roles marked above do): "
                  + "; ".join(f"{p.value}: " + ", ".join(f"`{n}`" for n in sorted(names))
                              for p, names in SERVICE_ROLE_ONLY.items()) + "."]
    return "\n".join(lines)


def render_doc(text: str) -> str:
    """``text`` with the block between the markers replaced by the current matrix."""
    begin, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if begin < 0 or end < begin:
        raise ValueError("document: permission-matrix markers not found")
    return text[:begin] + DOC_BEGIN + "\n\n" + matrix_markdown() + "\n\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print or write the permission matrix")
    parser.add_argument("--write", type=Path, help="rewrite the generated block of this markdown file")
    args = parser.parse_args(argv)
    if args.write is None:
        print(matrix_markdown())
        return 0
    args.write.write_text(render_doc(args.write.read_text()))
    print(f"updated {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
