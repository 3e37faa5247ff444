"""The chart's deletion-ledger CronJob (backup.ledgerSchedule): `hearth ledger export`
into the backup claim, often, with the same database credentials as the snapshots."""

from __future__ import annotations

import kubernetes_validate

from services.cli import build_parser
from tests.deploy.conftest import MIN_KUBE_VERSION, PRODUCTION_VALUES, TARGET_KUBE_VERSION, by_kind


def test_ledger_export_runs_next_to_the_snapshots_into_the_same_claim(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    crons = by_kind(objects, "CronJob")
    ledger, backup = crons["hearth-ledger"], crons["hearth-backup"]
    for version in (TARGET_KUBE_VERSION, MIN_KUBE_VERSION):
        kubernetes_validate.validate(ledger, version, strict=True)
    assert ledger["spec"]["schedule"] == "*/5 * * * *" and ledger["spec"]["concurrencyPolicy"] == "Forbid"
    pod = ledger["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["command"][1:])
    assert (args.command, args.ledger_command) == ("ledger", "export")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    out_dir = args.out.rsplit("/", 1)[0]
    backup_pod = backup["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert volumes[mounts[out_dir]]["persistentVolumeClaim"] == backup_pod["volumes"][0]["persistentVolumeClaim"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HEARTH_POSTGRES_DSN"] == {e["name"]: e for e in backup_pod["containers"][0]["env"]}[
        "HEARTH_POSTGRES_DSN"]
    assert pod["serviceAccountName"] == backup_pod["serviceAccountName"]
    # audit32: the export signs every entry with privacy's receipt signing key (without it
    # `hearth ledger export` refuses): the same Secret key the privacy pods read.
    privacy = by_kind(objects, "Deployment")["hearth-privacy"]["spec"]["template"]["spec"]["containers"][0]
    assert env["HEARTH_RECEIPT_SIGNING_KEY"] == {e["name"]: e for e in privacy["env"]}["HEARTH_RECEIPT_SIGNING_KEY"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not by_kind(render(), "CronJob")  # both only with backup.enabled
