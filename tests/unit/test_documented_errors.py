"""docs/operations.md's "Errors" table is the code's two tables: each domain error's gRPC
status (services/common/errors.py, STATUS_BY_ERROR) and each gRPC status's HTTP status
(gateway/errors.py, HTTP_BY_GRPC), every entry of both named. Session 28 (docs28) found
OUT_OF_RANGE (422) and the domain error DeadlineExceeded in neither row of the doc."""

from __future__ import annotations

import re

import grpc

from gateway.errors import HTTP_BY_GRPC
from services.common.errors import STATUS_BY_ERROR
from tests.helpers.operator_docs import doc_text

_ROW = re.compile(r"^\| (.+?) \| (.+?) \| (.+?) \|$")


def _rows() -> list[tuple[str, str, str]]:
    """(domain error, gRPC cell, HTTP cell) of each row below the header."""
    section = doc_text("docs/operations.md").split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        match = _ROW.match(line)
        if match and match.group(3) != "HTTP" and not set(match.group(2)) <= set("-| "):
            rows.append(match.groups())
    return rows


def _codes(cell: str) -> list[str]:
    return re.findall(r"\b[A-Z][A-Z_]{3,}\b", cell)


def test_every_domain_error_is_documented_with_its_grpc_status():
    named = {}
    for error, codes, _ in _rows():
        first = error.split()[0]
        if first[0].isupper():
            named[first] = _codes(codes)
    for cls, status in STATUS_BY_ERROR:
        assert named.get(cls.__name__, [])[:1] == [status.name], f"{cls.__name__}: docs say {named.get(cls.__name__)}"


def test_every_grpc_status_the_gateway_maps_is_documented_with_its_http_status():
    documented = {}
    for error, codes, http in _rows():
        if "from a service" in codes or error.startswith("anything else"):
            continue   # the service-token refusal (503) and the fallback (502) are rows of their own
        status = int(re.match(r"\s*`?(\d{3})", http).group(1))
        for code in _codes(codes):
            documented.setdefault(code, set()).add(status)
    for code, status in HTTP_BY_GRPC.items():
        if code is grpc.StatusCode.OK:
            continue
        assert documented.get(code.name) == {status}, f"{code.name}: docs say {documented.get(code.name)}, code {status}"
