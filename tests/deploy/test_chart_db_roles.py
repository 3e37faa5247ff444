"""A PostgreSQL login per service in the chart (storage.postgres.services.<service>.existingSecret,
storage.postgres.provisionRoles; docs/deploy.md "Secrets", docs/operations.md "Database
roles"): each pod gets its own service's DSN and no other, the backup job each schema's
owner, the hook Job the admin DSN that no Hearth pod gets."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from services.cli import build_parser
from tests.deploy.conftest import (
    COMPONENTS,
    GRPC_SERVICES,
    MIN_KUBE_VERSION,
    PRODUCTION_VALUES,
    TARGET_KUBE_VERSION,
    HelmError,
    by_kind,
)
from tests.deploy.test_chart import deployment_of, effective_env

PROVISION = ("storage.postgres.provisionRoles.enabled=true",
             "storage.postgres.provisionRoles.adminSecretName=hearth-postgres-admin")


def pod_env(pod: dict) -> dict[str, tuple[str, str]]:
    (container,) = pod["containers"]
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "valueFrom" in e}


def secret_refs(node) -> set[str]:
    """Every Secret name a secretKeyRef anywhere under ``node`` references."""
    if isinstance(node, dict):
        found = {node["secretKeyRef"]["name"]} if "secretKeyRef" in node else set()
        return found.union(*(secret_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(secret_refs(v) for v in node))
    return set()


def cron_pod(objects: list[dict], name: str) -> dict:
    return by_kind(objects, "CronJob")[name]["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_each_service_pod_gets_only_its_own_database_login(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    seen = set()
    for component in COMPONENTS:
        env = effective_env(deployment_of(objects, component), objects)
        logins = {name: value for name, value in env.items() if name.startswith("HEARTH_POSTGRES_")
                  and name != "HEARTH_POSTGRES_POOL_MAX"}
        if component == "gateway":
            assert logins == {}
        else:
            assert logins == {"HEARTH_POSTGRES_DSN": ("secret", f"hearth-postgres-{component}", "dsn")}, component
            seen.add(logins["HEARTH_POSTGRES_DSN"])
    assert len(seen) == len(GRPC_SERVICES)
    # Nothing references the shared login's Secret any more.
    assert "hearth-postgres" not in secret_refs(objects)
    # The snapshots: each schema dumped by its owner; the ledger (privacy's tables): privacy's.
    backup = pod_env(cron_pod(objects, "hearth-backup"))
    assert backup["HEARTH_POSTGRES_DSN"] == ("hearth-postgres-privacy", "dsn")
    assert {n: v for n, v in backup.items() if n.startswith("HEARTH_POSTGRES_DSN_")} == {
        f"HEARTH_POSTGRES_DSN_{s.upper()}": (f"hearth-postgres-{s}", "dsn") for s in GRPC_SERVICES}
    ledger = pod_env(cron_pod(objects, "hearth-ledger"))
    assert {n: v for n, v in ledger.items() if n.startswith("HEARTH_POSTGRES")} == {
        "HEARTH_POSTGRES_DSN": ("hearth-postgres-privacy", "dsn")}


def test_without_per_service_secrets_every_service_keeps_the_shared_login(render):
    """The single-login layout still renders as before (an upgrade of the chart alone
    changes no credential; docs/operations.md "Database roles" says how to move)."""
    objects = render()
    for component in GRPC_SERVICES:
        env = effective_env(deployment_of(objects, component), objects)
        assert env["HEARTH_POSTGRES_DSN"] == ("secret", "hearth-postgres", "dsn")
    assert not by_kind(objects, "Job")


def test_the_provisioning_hook_runs_provision_roles_with_the_admin_login_no_pod_gets(render):
    objects = render(values_files=(PRODUCTION_VALUES,),
                     set_values=(*PROVISION, "storage.postgres.provisionRoles.keepAccessFor=hearth"))
    (job,) = by_kind(objects, "Job").values()
    for version in (TARGET_KUBE_VERSION, MIN_KUBE_VERSION):
        kubernetes_validate.validate(job, version, strict=True)
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"   # before the Deployments roll
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["command"][1:])
    assert (args.command, args.db_command, args.keep_access_for) == ("db", "provision-roles", "hearth")
    # The roles' CONNECTION LIMIT: derived from the pods' pool size unless set.
    assert args.connection_limit is None
    assert {e["name"]: e.get("value") for e in container["env"]}["HEARTH_POSTGRES_POOL_MAX"] == "6"
    (limited,) = by_kind(render(values_files=(PRODUCTION_VALUES,), set_values=(
        *PROVISION, "storage.postgres.provisionRoles.connectionLimit=40")), "Job").values()
    assert build_parser().parse_args(limited["spec"]["template"]["spec"]["containers"][0]["command"][1:]) \
        .connection_limit == 40
    # Its lock wait (docs/operations.md "Database roles"): the command's default unless set.
    assert args.lock_timeout == 10.0
    (patient,) = by_kind(render(values_files=(PRODUCTION_VALUES,), set_values=(
        *PROVISION, "storage.postgres.provisionRoles.lockTimeoutSeconds=30")), "Job").values()
    assert build_parser().parse_args(patient["spec"]["template"]["spec"]["containers"][0]["command"][1:]) \
        .lock_timeout == 30.0
    # All four unless told: a service on another server is left to a run of its own.
    assert args.service is None
    (split,) = by_kind(render(values_files=(PRODUCTION_VALUES,), set_values=(
        *PROVISION, "storage.postgres.provisionRoles.services={clustering,attribution,feedback}")), "Job").values()
    assert build_parser().parse_args(split["spec"]["template"]["spec"]["containers"][0]["command"][1:]) \
        .service == ["clustering", "attribution", "feedback"]
    assert pod_env(pod) == {"HEARTH_POSTGRES_ADMIN_DSN": ("hearth-postgres-admin", "dsn"),
                            **{f"HEARTH_POSTGRES_DSN_{s.upper()}": (f"hearth-postgres-{s}", "dsn")
                               for s in GRPC_SERVICES}}
    assert pod["automountServiceAccountToken"] is False and "envFrom" not in container
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The admin Secret is the Job's alone.
    assert "hearth-postgres-admin" not in secret_refs([o for o in objects if o is not job])
    assert "hearth-postgres-admin" in secret_refs(job)


@pytest.mark.parametrize("values, message", [
    (("storage.postgres.services.clustering.existingSecret=hearth-postgres-clustering",),
     "storage.postgres.services: set existingSecret for all four services"),
    (PROVISION, "storage.postgres.provisionRoles: needs storage.postgres.services.<service>.existingSecret"),
    (("storage.postgres.provisionRoles.enabled=true",),
     "storage.postgres.provisionRoles: needs storage.postgres.services.<service>.existingSecret"),
    ((*PROVISION, "storage.postgres.provisionRoles.services={privcy}"),
     "at '/storage/postgres/provisionRoles/services/0': value must be one of"),
    (("storage.postgres.services.privacy.existingScret=x",),
     "at '/storage/postgres/services/privacy': additional properties 'existingScret' not allowed"),
])
def test_a_half_configured_login_per_service_is_refused_by_name(render, values, message):
    with pytest.raises(HelmError, match=re.escape(message)):
        render(set_values=values)


def test_provisioning_without_the_admin_secret_is_refused(render):
    with pytest.raises(HelmError, match=re.escape("adminSecretName/adminSecretKey")):
        render(values_files=(PRODUCTION_VALUES,), set_values=("storage.postgres.provisionRoles.enabled=true",))
