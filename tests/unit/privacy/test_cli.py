from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.privacy import cli
from services.privacy.audit import domain as audit
from services.privacy.keys import signing as keys
from services.common.erasure import ErasureScope
from services.privacy.deletion.domain import receipt_from_results
from services.privacy.deletion.receipts import ids_digest, sign_receipt
from tests.unit.privacy.factories import T0, make_entries

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def files(tmp_path, signing_key, other_key):
    receipt = receipt_from_results(
        receipt_id="r-7", job_id="job-7", scope=ErasureScope("acct-7", "household"),
        principal="olivia", role="privacy_officer", requested_at=T0, completed_at=T0,
        results={"clustering": (2, ids_digest(["a", "b"]))}, key_id=keys.key_id(signing_key),
    )
    (tmp_path / "receipt.json").write_text(sign_receipt(receipt, signing_key).to_json())
    (tmp_path / "pub.pem").write_text(keys.public_key_to_pem(signing_key.public_key()))
    (tmp_path / "pub.b64").write_text(keys.public_key_raw_b64(signing_key.public_key()) + "\n")
    (tmp_path / "other.pem").write_text(keys.public_key_to_pem(other_key.public_key()))
    entries = make_entries(12)
    state, _, chains = audit.append_batch(audit.AuditState(), entries)
    sth = audit.sign_tree_head(state, signing_key, T0)
    lines = list(audit.export_lines(entries, [bytes(h) for h in chains], sth))
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path, lines


def test_verify_receipt_ok_with_pem_and_raw_key(files, capsys):
    d, _ = files
    for key_file in ("pub.pem", "pub.b64"):
        assert cli.main(["verify-receipt", str(d / "receipt.json"), "--public-key", str(d / key_file)]) == 0
        out = capsys.readouterr().out
        assert "OK receipt r-7" in out and "2 records deleted" in out


def test_verify_receipt_without_key_warns(files, capsys):
    d, _ = files
    assert cli.main(["verify-receipt", str(d / "receipt.json")]) == 0
    assert "integrity only" in capsys.readouterr().err


def test_verify_receipt_rejects_forgery_and_other_key(files, capsys):
    d, _ = files
    assert cli.main(["verify-receipt", str(d / "receipt.json"), "--public-key", str(d / "other.pem")]) == 1
    data = json.loads((d / "receipt.json").read_text())
    data["receipt"]["services"]["clustering"]["count"] = 1
    data["receipt"]["total_count"] = 1
    (d / "forged.json").write_text(json.dumps(data))
    assert cli.main(["verify-receipt", str(d / "forged.json"), "--public-key", str(d / "pub.pem")]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_a_receipt_with_only_total_count_changed_exits_1(files, capsys):
    d, _ = files
    data = json.loads((d / "receipt.json").read_text())
    data["receipt"]["total_count"] = 1  # the services still say 2
    (d / "count.json").write_text(json.dumps(data))
    for key in ([], ["--public-key", str(d / "pub.pem")]):
        assert cli.main(["verify-receipt", str(d / "count.json"), *key]) == 1
        assert "INVALID receipt" in capsys.readouterr().err


def test_a_json_key_given_twice_is_refused_as_tampering(files, capsys):
    d, lines = files
    # Receipt: another "account_id" before the genuine one; json.loads keeps the last
    # (genuine) value, so the signature verifies, while a reader sees acct-8 first.
    text = (d / "receipt.json").read_text()
    (d / "dup.json").write_text(text.replace('"account_id":"acct-7"', '"account_id":"acct-8","account_id":"acct-7"', 1))
    assert cli.main(["verify-receipt", str(d / "dup.json"), "--public-key", str(d / "pub.pem")]) == 1
    assert "duplicate key 'account_id'" in capsys.readouterr().err
    # Export: the verifier would re-serialise the last "principal" and pass; a reader of
    # the file sees the first one.
    row = lines[5]
    assert row.count('"principal":') == 1
    start = row.index('"principal":')
    end = row.index(",", start)
    forged = row[:start] + '"principal":"mallory",' + row[start:end] + row[end:]
    (d / "log.jsonl").write_text("\n".join(lines[:5] + [forged] + lines[6:]))
    assert cli.main(["audit", "verify", str(d / "log.jsonl"), "--public-key", str(d / "pub.pem")]) == 1
    err = capsys.readouterr().err
    assert "INVALID audit log" in err and "line 6" in err and "duplicate key 'principal'" in err


@pytest.mark.parametrize("respell", [
    lambda e: e.__setitem__("ts", e["ts"].replace("Z", "+00:00")),   # the same instant
    lambda e: e.__setitem__("v", 1.0),                                # 1.0 == 1
])
def test_an_export_line_respelled_from_its_signed_form_is_tampering(files, capsys, respell):
    # Leaf and chain hashes are recomputed from the parsed fields, so a line whose text
    # is not what was signed passed (exit 0) while its value only read the same.
    d, lines = files
    row = json.loads(lines[5])
    respell(row["entry"])
    (d / "log.jsonl").write_text("\n".join(lines[:5] + [json.dumps(row)] + lines[6:]))
    assert cli.main(["audit", "verify", str(d / "log.jsonl"), "--public-key", str(d / "pub.pem")]) == 1
    err = capsys.readouterr().err
    assert "INVALID audit log" in err and "line 6.entry" in err and "canonical" in err
    sth = json.loads(lines[-1])
    sth["sth"]["timestamp"] = sth["sth"]["timestamp"].replace("Z", "+00:00")
    (d / "log.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(sth)]))
    assert cli.main(["audit", "verify", str(d / "log.jsonl"), "--public-key", str(d / "pub.pem")]) == 1
    # pretty-printed (whitespace only) is still the same export
    (d / "log.jsonl").write_text("\n".join(json.dumps(json.loads(x), sort_keys=False) for x in lines))
    assert cli.main(["audit", "verify", str(d / "log.jsonl"), "--public-key", str(d / "pub.pem")]) == 0


def test_a_respelled_receipt_exits_1(files, capsys):
    d, _ = files
    text = (d / "receipt.json").read_text()
    (d / "respelled.json").write_text(text.replace('"v":1}', '"v":1.0}'))
    assert cli.main(["verify-receipt", str(d / "respelled.json"), "--public-key", str(d / "pub.pem")]) == 1
    assert "canonical" in capsys.readouterr().err


def test_bad_input_exits_2(files, capsys):
    d, _ = files
    (d / "junk.json").write_text("{not json")
    assert cli.main(["verify-receipt", str(d / "junk.json")]) == 2
    assert cli.main(["verify-receipt", str(d / "missing.json")]) == 2
    assert cli.main(["audit", "verify", str(d / "log.jsonl"), "--public-key", str(d / "junk.json")]) == 2
    assert "error:" in capsys.readouterr().err


def test_audit_verify_ok_and_tampered(files, capsys):
    d, lines = files
    args = ["audit", "verify", str(d / "log.jsonl"), "--public-key", str(d / "pub.pem")]
    assert cli.main(args) == 0
    assert "OK audit log: 12 entries" in capsys.readouterr().out
    row = json.loads(lines[5])
    row["entry"]["principal"] = "mallory"
    tampered = lines[:5] + [json.dumps(row)] + lines[6:]
    (d / "log.jsonl").write_text("\n".join(tampered))
    assert cli.main(args) == 1
    assert "modified at seq 5" in capsys.readouterr().err
    (d / "log.jsonl").write_text("\n".join(lines[:3] + lines[4:]))
    assert cli.main(args) == 1
    assert "removed at seq 3" in capsys.readouterr().err


def test_register_adds_commands_to_another_parser(files):
    import argparse
    parser = argparse.ArgumentParser()
    register_target = parser.add_subparsers(dest="cmd")
    cli.register(register_target)
    d, _ = files
    ns = parser.parse_args(["audit", "verify", str(d / "log.jsonl"), "--public-key", "k"])
    assert ns.func is not None and ns.export.endswith("log.jsonl")


def test_runs_as_a_module(files):
    d, _ = files
    proc = subprocess.run(
        [sys.executable, "-m", "services.privacy.cli", "audit", "verify", str(d / "log.jsonl"),
         "--public-key", str(d / "pub.b64")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK audit log")
