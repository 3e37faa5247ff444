"""docs/privacy.md holds to the code: the audit entry's vocabularies (event types, roles,
outcomes) and the verifier's tamper reasons are the code's enums; the RPCs it says are not
audited, and those audited as `audit_export`, are what the audit table says; the codes that
fail a deletion job at once are the worker's; every `python -m services.privacy.cli` line
parses with the verifier's own parser; and the purge steps a receipt quotes are the steps
the stores report. Session 19 (docs19) found the not-audited list three RPCs short and the
fatal codes one short, by reading the doc against the running mesh."""

from __future__ import annotations

import argparse
import re
import shlex

import grpc
import pytest

from services.common import audit
from services.common.audit_events import EventType
from services.common.ids import Outcome, Role
from services.common.storage.sql import SqliteDatabase, migrate
from services.privacy import cli as privacy_cli
from services.privacy.audit.domain import TamperReason
from services.privacy.deletion import app as deletion_app
from services.privacy.deletion import domain as deletion_domain
from services.privacy.keys.app import KeyService
from services.privacy.keys.domain import generate_kek
from services.privacy.keys.store import DataKeyStore
from services.privacy.migrations import MIGRATIONS
from tests.helpers.operator_docs import doc_text

DOC = "docs/privacy.md"


def _text() -> str:
    return doc_text(DOC)


def _flat() -> str:
    return doc_text(DOC, flat=True)


def _row(name: str) -> str:
    (cell,) = re.findall(rf"^\| `{name}` \| (.*) \|$", _text(), re.MULTILINE)
    return cell


def _words(cell: str) -> set[str]:
    return set(re.findall(r"[a-z_]+", cell.removeprefix("one of:")))


def test_the_entry_vocabularies_are_the_codes_enums():
    assert _words(_row("event_type")) == {e.value for e in EventType}
    assert _words(_row("role")) == {r.value for r in Role}
    assert _words(_row("outcome")) == {o.value for o in Outcome}


def test_the_tamper_reasons_are_the_verifiers():
    section = _text().split("### Export format", 1)[1].split("### Suspicious", 1)[0]
    reasons = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    assert reasons == {r.value for r in TamperReason}


def _short(method: str) -> str:
    return method.rsplit("/", 1)[1]


def test_the_rpcs_not_audited_and_the_audit_reads_are_the_audit_table():
    flat = _flat()
    not_audited = flat.split("Deliberately not audited:", 1)[1].split("Reads of the audit log", 1)[0]
    documented = set(re.findall(r"`([A-Za-z]+)`", not_audited))
    assert documented == {_short(m) for m, event in audit.RPC_EVENTS.items() if event is None}
    reads = re.search(r"Reads of the audit log \(([^)]*)\) are audited as `audit_export`", flat).group(1)
    assert set(re.findall(r"`([A-Za-z]+)`", reads)) == {
        _short(m) for m, event in audit.RPC_EVENTS.items() if event == EventType.AUDIT_EXPORT}


def test_the_codes_that_fail_a_deletion_job_at_once_are_the_workers():
    stated = re.search(r"until it confirms; (.*?) fail the job at once", _flat()).group(1)
    assert {getattr(grpc.StatusCode, c) for c in re.findall(r"`([A-Z_]+)`", stated)} == deletion_app._FATAL_CODES


def test_the_erase_order_is_the_one_described():
    # "Attribution erases first, then clustering, then feedback ... a household deletion
    # does [the privacy part] first" (§6, Order).
    assert deletion_app.STAGES == (("attribution",), ("clustering",), ("feedback",), ("privacy",))
    assert deletion_app.HOUSEHOLD_STAGES == (("privacy",), ("attribution",), ("clustering",), ("feedback",))


def _cli_lines() -> list[str]:
    return [m.strip() for m in re.findall(r"^(?:\$ )?(python -m services\.privacy\.cli [^\n`]*)$", _text(), re.MULTILINE)]


@pytest.mark.parametrize("line", _cli_lines())
def test_every_verifier_command_line_parses(line):
    parser = argparse.ArgumentParser(prog="python -m services.privacy.cli")
    privacy_cli.register(parser.add_subparsers(dest="command", required=True))
    try:
        parser.parse_args(shlex.split(line)[3:])
    except SystemExit as exc:
        raise AssertionError(f"docs/privacy.md: `{line}` does not parse") from exc


def test_there_are_verifier_commands_to_check():
    assert {" ".join(shlex.split(line)[3:5]) for line in _cli_lines()} >= {"audit verify", "verify-receipt receipt.json"}


def test_the_purge_steps_the_receipt_quotes_are_what_the_stores_report(tmp_path):
    text = _text()
    database = SqliteDatabase(tmp_path / "privacy.db")
    try:
        sqlite_step = database.purge_erased()
        assert f'"action":"{sqlite_step["action"]}"' in text          # the receipt example (§2)
        assert f"{sqlite_step['action'].split('; ')[1]}`" in text       # §11: `PRAGMA wal_checkpoint(TRUNCATE)`
        migrate(database, MIGRATIONS)
        keys = KeyService(DataKeyStore(database), [generate_kek("k1")], "k1")
        keys.data_key("acct-1")
        purges: list[dict] = []
        assert keys.shred("acct-1", purges) == ["data_key:acct-1:v1", "digest_key:acct-1"]
        (step,) = purges
        tombstone = step["action"].split("; ")[0]
        assert f"`{tombstone}` + the purge of `data_keys`" in _flat()   # §2, the privacy part
    finally:
        database.close()



def test_the_receipt_examples_name_the_receipt_the_job_gets():
    # §2's receipt example said "receipt_id":"r-7" for job-7 beside the verifier's
    # "OK receipt r-job-7: job job-7" (session 34: a receipt read off the running mesh).
    text = _flat()
    pairs = re.findall(r'"job_id":"([^"]+)","key_id":"[0-9a-f]+","receipt_id":"([^"]+)"', text)
    pairs += [(job, receipt) for receipt, job in re.findall(r"OK receipt (\S+): job (\S+),", text)]
    assert len(pairs) >= 2
    assert [(j, deletion_domain.receipt_id_of(j)) for j, _ in pairs] == pairs


def test_get_v1_audit_filters_by_any_principal_the_log_holds():
    # §1: GET /v1/audit takes "the same filters" as QueryAudit; the doc's example principal
    # is an e-mail, which the gateway refused (422) until session 19.
    from gateway.app import create_app
    from gateway.config import GatewaySettings
    from services.common.ids import valid_principal_id

    example = re.search(r'"principal":"([^"]+)"', _text()).group(1)
    assert valid_principal_id(example) and "@" in example
    operation = create_app(GatewaySettings()).openapi()["paths"]["/v1/audit"]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "principal_id"]
    schema = next(s for s in parameter["schema"].get("anyOf", [parameter["schema"]]) if "pattern" in s)
    assert re.fullmatch(schema["pattern"].strip("^$"), example)
