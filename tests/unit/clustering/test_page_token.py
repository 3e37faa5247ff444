"""The household page token (services/clustering/app.py): only what the service issues is
read back; a crafted one is INVALID_ARGUMENT naming page_token."""

from __future__ import annotations

import base64

import pytest

from services.clustering.app import decode_page_token, encode_page_token
from services.common.errors import InvalidArgument


def _token(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_an_issued_token_reads_back():
    assert decode_page_token(encode_page_token((1795672800.5, "s-abc"))) == (1795672800.5, "s-abc")


@pytest.mark.parametrize("raw", ['[NaN, "s-x"]', '[Infinity, "s-x"]', '[-Infinity, "s-x"]', '[1e400, "s-x"]',
                                 '[true, "s-x"]', '["1", "s-x"]', '[1, "s x"]', '[1]'])
def test_a_crafted_token_is_refused(raw):
    with pytest.raises(InvalidArgument) as refused:
        decode_page_token(_token(raw))
    assert refused.value.field == "page_token"
