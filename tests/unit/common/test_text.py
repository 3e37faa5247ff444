"""The one text rule (services/common/text.py): which characters, how long, and the
field each refusal names — nested, repeated, map and column-checked fields."""

from __future__ import annotations

import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.privacy.v1 import privacy_pb2 as ppb
from services.common import text
from services.common.errors import InvalidArgument


@pytest.mark.parametrize("value", ["ok\x00", "ok\t", "ok\n", "ok\x1b", "ok\x7f", "ok\x9f", "ok\u2028",
                                   "ok\u2029", "ok\u202a", "ok\u202e", "ok\u2066", "ok\u2069", "ok\ud800"])
def test_control_and_reordering_characters_are_refused_naming_the_field(value):
    with pytest.raises(InvalidArgument) as err:
        text.check_text(value, "reason")
    assert err.value.field == "reason"
    assert f"U+{ord(value[2]):04X} at character 2" in err.value.message


@pytest.mark.parametrize("value", ["", "plain", "caf\u00e9 \u20ac \U0001f600", "a\u00a0b", "family \U0001f468\u200d\U0001f469"])
def test_text_of_any_script_emoji_and_joiners_is_accepted(value):
    assert text.check_text(value, "reason") == value


def test_multiline_text_allows_tab_newline_and_return_only():
    assert text.check_text("why:\n\tbecause\r\n", "reason", multiline=True)
    with pytest.raises(InvalidArgument):
        text.check_text("why\x00", "reason", multiline=True)
    with pytest.raises(InvalidArgument):
        text.check_text("why\u2028", "reason", multiline=True)


def test_length_and_required():
    assert text.check_text("a" * 10, "f", max_chars=10)
    with pytest.raises(InvalidArgument, match="at most 10 characters, got 11"):
        text.check_text("a" * 11, "f", max_chars=10)
    with pytest.raises(InvalidArgument, match="must not be empty"):
        text.check_text("", "f", required=True)
    with pytest.raises(InvalidArgument, match="must be a string"):
        text.check_text(None, "f")


def _refused(message) -> str:
    with pytest.raises(InvalidArgument) as err:
        text.check_text_fields(message)
    return err.value.field


def test_each_refusal_names_the_path_in_the_request():
    events = [cpb.ViewingEvent(event_id=f"e{i}", genres=["drama", "kids"]) for i in range(5)]
    events[3].genres[1] = "kids\x00"
    assert _refused(cpb.IngestEventsRequest(events=events)) == "events[3].genres[1]"
    events[3].genres[1] = "kids"
    events[4].device_id = "d" * 257
    assert _refused(cpb.IngestEventsRequest(events=events)) == "events[4].device_id"
    assert _refused(ppb.AppendAuditRequest(records=[ppb.AuditRecord(), ppb.AuditRecord(
        details={"k": "v\x1b"})])) == "records[1].details[k]"
    assert _refused(ppb.AppendAuditRequest(records=[ppb.AuditRecord(
        principal={"id": "p\x00"})])) == "records[0].principal.id"
    assert _refused(fpb.RecordPredictionRequest(predictions=[fpb.Prediction(
        probabilities={"p1\x00": 1.0})])) == "predictions[0].probabilities"
    assert _refused(cpb.GetEventStatusRequest(event_ids=["a", "b", "c\u202e"])) == "event_ids[2]"


def test_a_clean_request_and_the_ceilings_of_its_own_fields_pass():
    text.check_text_fields(cpb.IngestEventsRequest(events=[cpb.ViewingEvent(event_id="e1", genres=["drama"])]))
    text.check_text_fields(ppb.QueryAuditRequest(resource_prefix="r" * 1024))
    assert _refused(ppb.QueryAuditRequest(resource_prefix="r" * 1025)) == "resource_prefix"
    text.check_text_fields(ppb.VerifyReceiptRequest(receipt_json='{\n  "a": 1\n}'))


def test_bytes_that_are_not_utf8_are_named_by_field():
    marked = ppb.AppendAuditRequest(records=[ppb.AuditRecord(resource="ok"), ppb.AuditRecord(
        details={"k": "v\u20ac"})]).SerializeToString()
    bad = marked.replace("\u20ac".encode(), b"\xed\xa0\x80")
    assert text.invalid_utf8_field(ppb.AppendAuditRequest.DESCRIPTOR, bad) == "records[1].details[k]"
    marked = cpb.IngestEventsRequest(events=[cpb.ViewingEvent(), cpb.ViewingEvent(
        genres=["a", "b\u20ac"])]).SerializeToString()
    bad = marked.replace("\u20ac".encode(), b"\xff\xfe\xfd")
    assert text.invalid_utf8_field(cpb.IngestEventsRequest.DESCRIPTOR, bad) == "events[1].genres[1]"
    assert text.invalid_utf8_field(cpb.IngestEventsRequest.DESCRIPTOR, marked) is None
