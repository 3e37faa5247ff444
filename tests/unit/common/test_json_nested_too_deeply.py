"""Text nested too deeply for Python's JSON parser is malformed JSON, never a RecursionError
(attack30): every reader of JSON from outside catches ValueError, and a RecursionError (a
RuntimeError) went through — INTERNAL for a page token or a receipt over gRPC, a
dropped connection at the rollback webhook, a traceback from `hearth audit verify`."""

from __future__ import annotations

import base64
import json

import pytest

from services.clustering.app import decode_page_token
from services.common import strict_json
from services.common.calibration import Calibrator
from services.common.errors import InvalidArgument
from services.feedback.domain.variants import ExperimentFlags
from services.privacy.audit.domain import parse_export
from services.privacy.deletion.receipts import SignedReceipt

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("text", [DEEP, DEEP.encode(), '{"a": ' * 50_000 + "1" + "}" * 50_000])
def test_strict_json_reads_deep_nesting_as_malformed(text):
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        strict_json.loads(text)
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        strict_json.loads_unambiguous(text)


def test_a_deeply_nested_page_token_is_invalid_argument_naming_it():
    token = base64.urlsafe_b64encode(DEEP.encode()).decode().rstrip("=")
    with pytest.raises(InvalidArgument) as refused:
        decode_page_token(token)
    assert refused.value.field == "page_token"


def test_a_deeply_nested_calibrator_or_flags_document_is_invalid_argument():
    with pytest.raises(InvalidArgument):
        Calibrator.from_json(DEEP)
    with pytest.raises(InvalidArgument):
        ExperimentFlags.from_json(DEEP)


def test_a_deeply_nested_receipt_or_audit_export_line_is_malformed():
    with pytest.raises(ValueError, match="nested too deeply"):
        SignedReceipt.from_json(DEEP)
    with pytest.raises(ValueError, match="line 1: invalid JSON .nested too deeply"):
        parse_export([DEEP])


def test_an_audit_records_details_nested_too_deeply_are_refused_not_a_recursion_error():
    """AppendAudit parses each record's ``details_json`` before its depth check (32 levels):
    5,000 levels raised RecursionError there — INTERNAL for the whole call, its honest
    records refused with it."""
    from services.privacy.audit.rows import _decode_details

    with pytest.raises(ValueError, match="details_json"):
        _decode_details('{"a": ' + DEEP + "}")


def test_operator_files_nested_too_deeply_are_named_not_a_traceback(tmp_path):
    """review30 of the fix above: the feedback report's input lines, an off-site ledger and
    the service keyset file are read with the same reader (operator input: a traceback before)."""
    from services.common.service_keys import KeyError_, load_keyset
    from services.feedback.cli import _parse_line
    from services.feedback.domain.errors import InvalidArgument as FeedbackInvalidArgument
    from services.privacy.backup import read_ledger_file

    with pytest.raises(FeedbackInvalidArgument):
        _parse_line(1, DEEP)
    deep_file = tmp_path / "deep.json"
    deep_file.write_text(DEEP)
    with pytest.raises(ValueError, match="--ledger"):
        read_ledger_file(deep_file)
    with pytest.raises(KeyError_):
        load_keyset(deep_file)
