"""The gateway's interactive API pages (/docs, /redoc) run only the scripts they were
built with (attack25). Operators type an admin API key into /docs ("Authorize"); until
then the page loaded ``swagger-ui-dist@5`` — whatever 5.x the CDN served that day — with
no Subresource Integrity, /redoc ``redoc@2`` the same way, and /docs a favicon from a third
party's site: a bad release of either package or a CDN that served other bytes ran in the
page holding the key. Now every external script and stylesheet names an exact version and
carries an ``integrity`` hash (a browser refuses bytes that differ), and nothing else is
fetched from outside. The hashes are those of the npm packages' files (docs/security.md,
attack25 item 5, gives the command); the test cannot fetch the CDN (the suite reads
nothing outside the repository), so it checks the pages, through the real gateway."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.helpers.waiting import SLOW_MACHINE_S

TAG = re.compile(r"<(script|link)\b([^>]*)>", re.IGNORECASE)
ATTR = re.compile(r'([a-zA-Z-]+)="([^"]*)"')


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_pages_load_only_pinned_scripts_with_integrity_hashes(mesh, page):
    r = httpx.get(mesh.url + page, timeout=SLOW_MACHINE_S)
    assert r.status_code == 200, r.text
    external = []
    for _, attrs in TAG.findall(r.text):
        fields = dict(ATTR.findall(attrs))
        url = fields.get("src") or fields.get("href") or ""
        if url.startswith(("http:", "https:", "//")):
            external.append(url)
            assert re.search(r"@\d+\.\d+\.\d+/", url), f"{page}: not an exact version: {url}"
            assert re.fullmatch(r"sha384-[A-Za-z0-9+/]{64}", fields.get("integrity", "")), f"{page}: {url} has no integrity hash"
            assert fields.get("crossorigin") == "anonymous", f"{page}: {url}"
    assert external, f"{page}: the page loads its viewer from a CDN (else this test sees nothing)"
    assert "fonts.googleapis.com" not in r.text and "tiangolo.com" not in r.text, page
    if page == "/docs":   # no spec validation badge from validator.swagger.io
        assert '"validatorUrl": null' in r.text, r.text


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_pages_refuse_to_be_framed_by_another_site(mesh, page):
    """Operators type an admin API key into /docs: another site putting the page in a
    frame (a transparent one over its own buttons) had it drive the page under the
    operator's clicks. The pages had no ``frame-ancestors`` and no ``X-Frame-Options``
    (attack29); a browser now shows them only as the top page."""
    r = httpx.get(mesh.url + page, timeout=SLOW_MACHINE_S)
    assert r.status_code == 200, r.text
    assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), dict(r.headers)
    assert r.headers.get("x-frame-options") == "DENY", dict(r.headers)
