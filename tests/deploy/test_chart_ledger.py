"""The chart's deletion-ledger CronJob (backup.ledgerSchedule): `hearth ledger export`
into the backup claim, often, with the same database credentials as the snapshots."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from services.cli import build_parser
from tests.deploy.conftest import MIN_KUBE_VERSION, PRODUCTION_VALUES, TARGET_KUBE_VERSION, HelmError, by_kind


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
    # ledger33: the export signs every entry with the ledger's own key (without it `hearth
    # ledger export` refuses on PostgreSQL), from a Secret of its own. Until then it got
    # privacy's receipt signing key, so this pod could have signed deletion receipts; no
    # other pod gets the ledger key, and this one nothing of privacy's key Secret.
    assert env["HEARTH_LEDGER_SIGNING_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "hearth-ledger-signing", "key": "ledger-signing-key"}
    assert "HEARTH_RECEIPT_SIGNING_KEY" not in env
    assert "hearth-privacy-keys" not in str(pod)
    holders = [o["metadata"]["name"] for o in objects if "hearth-ledger-signing" in str(o)]
    assert holders == ["hearth-ledger"], holders
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not by_kind(render(), "CronJob")  # both only with backup.enabled


def test_the_ledger_cronjob_needs_the_ledger_key_secret_named(render, tmp_path):
    """review33 R6a: with a default Secret name, an upgrade of a release with backups whose
    values do not name the ledger key rendered, and unless that Secret had been created
    the CronJob's pods could not start (exports stopped, unseen). No default now: the
    upgrade fails naming the value."""
    values = yaml.safe_load(PRODUCTION_VALUES.read_text())
    del values["backup"]["ledgerSigningKey"]
    upgraded = tmp_path / "values-before-33.yaml"
    upgraded.write_text(yaml.safe_dump(values))
    with pytest.raises(HelmError, match=r"backup\.ledgerSigningKey\.secretName and \.secretKey"):
        render(values_files=(upgraded,))
    assert not by_kind(render(), "CronJob")   # backups off: nothing asked
