"""The interactive API pages, /docs (Swagger UI) and /redoc, with every script and
stylesheet they load from the CDN pinned to an exact version and a Subresource Integrity
hash.

Why not FastAPI's own pages: they load ``swagger-ui-dist@5`` and ``redoc@2`` — whatever
release the CDN resolves those to that day — with no integrity hash, plus a favicon from
fastapi.tiangolo.com and Google's fonts, and Swagger UI asks validator.swagger.io about the
spec. Operators type an admin API key into /docs ("Authorize"), so any other bytes served
under those names would run beside it (attack25). With ``integrity`` a browser refuses a
file whose SHA-384 differs, so the page runs the files reviewed here or nothing.

Updating a version: ``npm pack swagger-ui-dist@<v> redoc@<v>``, then for each file below
``openssl dgst -sha384 -binary <file> | base64`` (docs/security.md, attack25 item 5)."""

from __future__ import annotations

import html
import json

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

CDN = "https://cdn.jsdelivr.net/npm"
SWAGGER_UI = "swagger-ui-dist@5.36.0"
REDOC = "redoc@2.5.4"
# (url, SHA-384 of the file in the npm package, base64): the files of the packages above.
SWAGGER_JS = (f"{CDN}/{SWAGGER_UI}/swagger-ui-bundle.js",
              "sha384-fUpRgC19yPykTqzdrUbdAg8NTiu16NEKf9U12J+IJWCg8/1mEI8f2+PEIz60Wyd+")
SWAGGER_CSS = (f"{CDN}/{SWAGGER_UI}/swagger-ui.css",
               "sha384-z/AtSaOHGn5MJ5auAHXUypohywlIWLBZo1jeGmhdpVIbCnFhxAH92cwdV41oyINc")
REDOC_JS = (f"{CDN}/{REDOC}/bundles/redoc.standalone.js",
            "sha384-w447zOpYfw/1Tv/5AK9NfHTlQIqE3RVR6KY62jCyy9zNDgO64cMwGGP1Fj0zJVf5")


def _pinned(tag: str, asset: tuple[str, str]) -> str:
    url, integrity = asset
    if tag == "script":
        return f'<script src="{url}" integrity="{integrity}" crossorigin="anonymous"></script>'
    return f'<link rel="stylesheet" href="{url}" integrity="{integrity}" crossorigin="anonymous">'


def swagger_ui_page(title: str, openapi_url: str) -> str:
    options = json.dumps({"url": openapi_url, "dom_id": "#swagger-ui", "layout": "BaseLayout",
                          "deepLinking": True, "validatorUrl": None})
    # json.dumps leaves "</" as is; inside <script> it must not close the element.
    options = options.replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html>
<head>
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link rel="icon" href="data:,">
{_pinned("link", SWAGGER_CSS)}
<title>{html.escape(title)} - Swagger UI</title>
</head>
<body>
<div id="swagger-ui"></div>
{_pinned("script", SWAGGER_JS)}
<script>
const options = {options};
options.presets = [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset];
const ui = SwaggerUIBundle(options);
</script>
</body>
</html>
"""


def redoc_page(title: str, openapi_url: str) -> str:
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)} - ReDoc</title>
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<redoc spec-url="{html.escape(openapi_url)}"></redoc>
{_pinned("script", REDOC_JS)}
</body>
</html>
"""


# Operators type an admin API key into /docs: shown only as the top page, never in
# another site's frame (attack29; CSP for today's browsers, X-Frame-Options for older).
NOT_FRAMED = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}


def install_docs_pages(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """/docs and /redoc on ``app`` (created with ``docs_url=None, redoc_url=None``), open
    like FastAPI's own: they carry no data, only the viewer of /openapi.json."""
    swagger = swagger_ui_page(app.title, app.openapi_url)
    redoc = redoc_page(app.title, app.openapi_url)

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(swagger, headers=NOT_FRAMED)

    @app.get(redoc_url, include_in_schema=False)
    async def redoc_ui() -> HTMLResponse:
        return HTMLResponse(redoc, headers=NOT_FRAMED)
