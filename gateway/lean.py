"""A leaner request handler for the gateway's JSON-body routes, behind FastAPI's own.

FastAPI's generic handler does, per request: an endpoint-context extraction, a
``Content-Type`` parse through ``email.message``, dependency solving (query, header and
cookie parsing for routes that have none, a cache, exit stacks), and for the answer a
dump of the returned model to a dict, a second full validation of that dict against the
response model, a serialisation to JSON-able data and a ``json.dumps``. Profiled under
assign load (docs/benchmarks.md, "bench-gateway") that machinery was about a third of
the gateway's CPU per request, more than the route's own work.

``LeanRoute`` keeps the route exactly as declared (the same decorator, models,
dependencies, responses: the OpenAPI document does not change) and only replaces the
handler, for routes of one shape: one JSON body model, dependencies that take nothing
but the request (``access(...)``: authentication, permission, rate limit), no path,
query, header or cookie parameters. Such a request with a ``application/json`` body that
parses and validates takes the short path:

    validate the body (the same pydantic model, the same strict rules)
    -> the dependencies, in declaration order -> the endpoint
    -> the returned model serialised once, straight to JSON bytes.

A body the short path cannot accept is answered there too, from that one parse and
validation, with the answer FastAPI's handler gives (the same error list, raised as the
same ``RequestValidationError`` to the application's handler, in the same order):

* JSON that does not parse (``json_invalid`` at its character offset), a key given twice
  or bytes that are not UTF-8 (the duplicate-key check's 422): refused before the
  dependencies run, as FastAPI parses a body before it solves them;
* a body the model refuses (422 naming the field), or one with an array longer than its
  model allows (``events``, ``touchpoints``, an event's ``genres``...: refused before
  any item is validated, gateway/body_bounds.py): the dependencies first, in declaration
  order (a caller they refuse gets their answer), then the 422.

Until session 23 a body the model refused went on to FastAPI's handler, which parsed and
validated it again (four parses and three validations on the fast lane; docs/security.md,
"A body is parsed before it is judged"). What still goes to FastAPI's handler, for that
request: no body, another content type, bytes ``json.loads`` cannot decode or JSON nested
too deeply (400), a dependency override, an answer that is not the declared model. Routes
of any other shape keep FastAPI's handler entirely (behind the duplicate-key and bounds
checks of the generic path).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn
from urllib.parse import unquote_to_bytes

from fastapi import Request
from fastapi.dependencies.utils import field_annotation_is_sequence, get_flat_params
from fastapi.exceptions import RequestValidationError
from fastapi.datastructures import DefaultPlaceholder
from fastapi.params import ParamTypes
from fastapi.responses import JSONResponse
from fastapi import routing as fastapi_routing
from fastapi.routing import APIRoute, serialize_response
from pydantic import BaseModel
from starlette.responses import Response

from gateway.body_bounds import BodyBounds, bounds_of_route
from gateway.transport import replaying_receive
from services.common.strict_json import DuplicateKeyError, NotUtf8Error, loads_unique_keys

# FastAPI (0.165, pinned) hands get_route_handler the included route's merged settings
# through this context variable; read the same way its own get_route_handler does.
_EFFECTIVE_ROUTE = getattr(fastapi_routing, "_effective_route_context_var", None)

JSON_MEDIA_TYPE = "application/json"


def _json_content_type(value: str | None) -> bool:
    """``application/json`` or ``application/*+json``, parameters ignored, as FastAPI
    decides whether a body is JSON (anything else goes to its handler). FastAPI reads the
    media type with ``email.message``, to which one with more or fewer than one slash is
    ``text/plain`` (RFC 2045 5.2): ``application/a/b+json`` is not JSON (review23)."""
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    if media.count("/") != 1:
        return False
    return media == JSON_MEDIA_TYPE or (media.startswith("application/") and media.endswith("+json"))


class BodyRefused(Exception):
    """A body the short path answers with FastAPI's 422: ``error`` is the
    RequestValidationError FastAPI's handler would raise, ``after_dependencies`` whether it
    would run the route's dependencies first (a body it parsed, then judged) or not (a
    body it could not parse)."""

    def __init__(self, error: RequestValidationError, after_dependencies: bool) -> None:
        super().__init__(error)
        self.error = error
        self.after_dependencies = after_dependencies


def ambiguous_json_error(exc: ValueError) -> RequestValidationError | None:
    """The 422 of a body ``loads_unique_keys`` refused as ambiguous (a key given twice,
    bytes not UTF-8), else None. ``json.loads`` keeps the last of two equal keys, other
    parsers (a proxy, a WAF, an audit tap) the first: ``{"processing": true,
    "processing": false}`` would be read one way in front of the gateway and the other
    way inside it; and it reads UTF-16/32 bytes that readers in front of the gateway see
    as other text (session 21). Refused as invalid JSON (field ``body``), through the
    validation-error handler, so the credentials-first rule holds."""
    if isinstance(exc, DuplicateKeyError):
        reason = f"{exc} (ambiguous: each key may be given once)"
    elif isinstance(exc, NotUtf8Error):
        reason = str(exc)
    else:
        return None
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                    "input": {}, "ctx": {"error": reason}}])


class LeanEndpoint:
    """The short path of one lean route: ``parse`` a raw body (None: not for the short
    path), then ``respond``."""

    def __init__(self, route, plan) -> None:
        self.route = route
        self.body_field, self.dependencies, self.response_type = plan
        self.endpoint = route.dependant.call
        self.response_field = route.response_field
        self.status_code = route.status_code or 200
        self.bounds = BodyBounds.of(self.body_field.field_info.annotation)

    def parse(self, content_type: str | None, raw: bytes):
        """The validated body model, or None when FastAPI's handler must answer (not
        JSON, empty, bytes json.loads cannot decode, nested too deeply). Raises
        BodyRefused with the 422 FastAPI's handler would give for a body it refuses:
        malformed or ambiguous JSON, an array over its bound (before its items are
        validated, gateway/body_bounds.py), a body the model refuses."""
        if not raw or not _json_content_type(content_type):
            return None
        try:
            decoded = loads_unique_keys(raw)
        except json.JSONDecodeError as exc:
            # FastAPI's own answer to a body json.loads refuses (the same parser: the
            # duplicate-key hook runs only on objects that parsed).
            raise BodyRefused(RequestValidationError([{
                "type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {},
                "ctx": {"error": exc.msg}}], body=exc.doc), after_dependencies=False) from None
        except (ValueError, RecursionError) as exc:   # a key twice, not UTF-8; else FastAPI's 400
            error = ambiguous_json_error(exc) if isinstance(exc, ValueError) else None
            if error is None:
                return None
            raise BodyRefused(error, after_dependencies=False) from None
        if self.bounds is not None:
            try:
                self.bounds.check(decoded)
            except RequestValidationError as refusal:
                raise BodyRefused(refusal, after_dependencies=True) from None
        body, errors = self.body_field.validate(decoded, {}, loc=("body",))
        if errors:
            raise BodyRefused(RequestValidationError(errors, body=decoded), after_dependencies=True)
        return body

    async def refuse(self, request: Request, refusal: BodyRefused) -> NoReturn:
        """Answer a body ``parse`` refused as FastAPI's handler would: for a body it
        parsed, the dependencies first (FastAPI runs them before it reports the body's
        errors: a caller they refuse gets their answer), then the 422."""
        if refusal.after_dependencies:
            for _name, call, request_param in self.dependencies:
                await call(**{request_param: request})
        raise refusal.error

    async def respond(self, request: Request, body) -> Response:
        kwargs = {self.body_field.name: body}
        for name, call, request_param in self.dependencies:
            kwargs[name] = await call(**{request_param: request})
        result = await self.endpoint(**kwargs)
        if isinstance(result, Response):
            return result
        if type(result) is not self.response_type:
            # Not the declared model: FastAPI's own validation and serialisation.
            content = await serialize_response(field=self.response_field, response_content=result)
            return JSONResponse(content, status_code=self.status_code)
        # The declared model, built by the endpoint: serialised once, by the same
        # pydantic serializer FastAPI uses, without dumping and re-validating it first.
        return Response(self.response_field.serialize_json(result, by_alias=True),
                        status_code=self.status_code, media_type=JSON_MEDIA_TYPE)


def lean_endpoint(route) -> LeanEndpoint | None:
    """The short path of ``route`` (an APIRoute, or FastAPI's per-inclusion view of one)
    when it has the lean shape, else None."""
    plan = _lean_plan(route)
    return LeanEndpoint(route, plan) if plan is not None else None


class LeanRoute(APIRoute):
    """An APIRoute whose handler takes the short path when the route's shape allows."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # The route as included (FastAPI builds one handler per inclusion, with the
        # include_router() settings merged in), as FastAPI's own get_route_handler reads it.
        effective = _EFFECTIVE_ROUTE.get() if _EFFECTIVE_ROUTE is not None else None
        route = effective if effective is not None and effective.original_route is self else self
        generic = _refusing_ambiguous_json(_refusing_repeated_query(route, super().get_route_handler()),
                                           bounds_of_route(route))
        lean = lean_endpoint(route)
        if lean is None:
            return generic
        overrides = route.dependency_overrides_provider

        async def handler(request: Request) -> Response:
            if overrides is not None and getattr(overrides, "dependency_overrides", None):
                return await generic(request)
            # The body is cached on the request: the generic handler reuses it.
            try:
                body = lean.parse(request.headers.get("content-type"), await request.body())
            except BodyRefused as refusal:   # FastAPI's 422, from this one parse
                await lean.refuse(request, refusal)
            if body is None:
                return await generic(request)
            return await lean.respond(request, body)

        return handler


def _refusing_ambiguous_json(handler: Callable[[Request], Coroutine[Any, Any, Response]],
                             bounds: BodyBounds | None = None) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """``handler`` behind a check that a JSON body is UTF-8 and gives no key twice. ``json.loads`` keeps
    the last of two equal keys, other parsers (a proxy, a WAF, an audit tap) the first:
    ``{"processing": true, "processing": false}`` would be read one way in front of the
    gateway and the other way inside it. Refused as invalid JSON (422, field ``body``),
    through the validation-error handler, so the credentials-first rule holds. With
    ``bounds`` (the route's body model's), an array over its bound is refused here too,
    with the 422 pydantic would give, before the handler parses and validates the body."""

    async def checked(request: Request) -> Response:
        raw = await request.body()   # cached on the request: the handler reuses it
        if raw and _json_content_type(request.headers.get("content-type")):
            try:
                decoded = loads_unique_keys(raw)
            except ValueError as exc:
                error = ambiguous_json_error(exc)
                if error is not None:
                    raise error from None
                # malformed: the handler's own answer
            except RecursionError:
                pass
            else:
                if bounds is not None:
                    bounds.check(decoded)
                del decoded
        return await handler(request)

    return checked


def _refuse_query_not_utf8(raw: bytes, declared: frozenset[str]) -> None:
    """A declared query parameter whose %-escapes are not UTF-8 is refused, naming it
    (the one text rule, services/common/text.py). Starlette decodes them with U+FFFD in
    place of each bad byte, so ``?resource_prefix=x%FF`` was read as ``x\ufffd``: another
    value than the one sent, answered 200."""
    if b"%" not in raw:
        return
    for pair in raw.split(b"&"):
        name, _, value = pair.partition(b"=")
        try:
            unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            key = unquote_to_bytes(name).decode("utf-8", "replace")
            if key in declared:
                raise RequestValidationError([{
                    "type": "value_error", "loc": ("query", key), "input": None,
                    "msg": "must be valid UTF-8 text"}]) from None


def _refusing_repeated_query(route, handler: Callable[[Request], Coroutine[Any, Any, Response]]
                             ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """``handler`` behind a check that no single-valued query parameter of ``route`` is
    given twice. Starlette keeps every value and FastAPI reads the last
    (``?limit=5&limit=500`` is ``limit=500``), other readers (a proxy's rate rule, a WAF,
    a log filter) often the first: ambiguous, like a JSON key given twice. Refused with a
    422 naming the parameter, through the validation-error handler (credentials first).
    A parameter declared as a list (meant to repeat) stays allowed.

    On a route that takes query parameters, one it does not take is refused the same way,
    as a body's unknown field is: until session 36 it was ignored, so a misspelt filter
    (``GET /v1/audit?principal=alice`` for ``principal_id``) was answered with the whole
    unfiltered log (review36)."""
    query_params = [f for f in get_flat_params(route.dependant) if getattr(f.field_info, "in_", None) == ParamTypes.query]
    single = tuple(f.alias for f in query_params if not field_annotation_is_sequence(f.field_info.annotation))
    declared = frozenset(f.alias for f in query_params)
    if not declared:
        return handler

    async def checked(request: Request) -> Response:
        _refuse_query_not_utf8(request.scope.get("query_string", b""), declared)
        query = request.query_params
        for name in query.keys():
            if name not in declared:
                raise RequestValidationError([{
                    "type": "value_error", "loc": ("query", name), "input": None,
                    "msg": f"is not a parameter of this route (it takes {', '.join(sorted(declared))})"}])
        if len(query.multi_items()) > len(query):   # some name given more than once
            for name in single:
                given = len(query.getlist(name))
                if given > 1:
                    raise RequestValidationError([{
                        "type": "value_error", "loc": ("query", name), "input": query.getlist(name),
                        "msg": f"given {given} times (ambiguous: each query parameter may be given once)"}])
        return await handler(request)

    return checked


def _lean_plan(route):
    """(body ModelField, [(dependency name, async call, its request parameter)],
    response model class) when ``route`` (an APIRoute or FastAPI's per-inclusion view of
    one) has the lean shape, else None."""
    d = route.dependant
    if (d.path_params or d.query_params or d.header_params or d.cookie_params or len(d.body_params) != 1
            or route._embed_body_fields or d.request_param_name or d.response_param_name
            or d.background_tasks_param_name or d.websocket_param_name or d.http_connection_param_name
            or d.security_scopes_param_name or not inspect.iscoroutinefunction(d.call)
            or getattr(route, "stream_item_field", None) is not None):
        return None
    if (route.response_model_include or route.response_model_exclude or route.response_model_exclude_unset
            or route.response_model_exclude_defaults or route.response_model_exclude_none
            or not route.response_model_by_alias):
        return None
    response_class = route.response_class
    if isinstance(response_class, DefaultPlaceholder):
        response_class = response_class.value
    if response_class is not JSONResponse:
        return None
    field = d.body_params[0]
    model = field.field_info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    dependencies = []
    if len({id(sub.call) for sub in d.dependencies}) != len(d.dependencies):
        return None   # FastAPI would call a repeated dependency once (its cache)
    for sub in d.dependencies:
        if (not inspect.iscoroutinefunction(sub.call) or sub.dependencies or sub.path_params or sub.query_params or sub.header_params
                or sub.cookie_params or sub.body_params or not sub.request_param_name or sub.name is None
                or sub.response_param_name or sub.background_tasks_param_name
                or sub.security_scopes_param_name or sub.call is None):
            return None
        dependencies.append((sub.name, sub.call, sub.request_param_name))
    response_model = route.response_model
    lean_response = (isinstance(response_model, type) and issubclass(response_model, BaseModel)
                     and route.response_field is not None)
    return field, dependencies, (response_model if lean_response else _NO_MODEL)


class _NoModel:
    """Stands for "no declared response model": no answer's type is this."""


_NO_MODEL = _NoModel


class FastLane:
    """ASGI middleware: a request for a lean route with a complete JSON body goes straight
    to that route's short path, past FastAPI's own middleware stack, router and request
    wrapper (about half of what was left of the gateway's framework CPU per request after
    ``LeanRoute``; docs/benchmarks.md, "bench-gateway").

    It sits inside the admission and observe middlewares (admission slot, span, metrics,
    access log and the Content-Length limit apply unchanged) and takes only requests
    with a ``Content-Length`` within ``max_body_bytes`` and a JSON body: one the route's
    model accepts takes the short path, one it refuses (malformed, ambiguous, over a bound,
    invalid) is answered from the same parse and validation with FastAPI's 422
    (``LeanEndpoint.parse``). Everything else — chunked bodies, other content types, no
    body, bytes json.loads cannot decode, dependency overrides, any other route — goes on
    to the application with the body replayed, so FastAPI's handler answers it as before.
    Exceptions from the short
    path go to the application's own exception handlers (the one error table), and
    anything they do not handle propagates to the observe middleware's JSON 500, as it
    would from FastAPI's stack.

    ``routes`` maps (method, path) to the route's LeanEndpoint; only routes without path
    parameters are lean, so the path is matched exactly, as the router would."""

    def __init__(self, app, routes: dict[tuple[str, str], LeanEndpoint], exception_handlers: dict,
                 max_body_bytes: int, overrides_provider=None) -> None:
        self.app = app
        self.routes = routes
        self.exception_handlers = exception_handlers
        self.max_body_bytes = max_body_bytes
        self.overrides_provider = overrides_provider

    def _handler_for(self, exc: Exception):
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None

    async def __call__(self, scope, receive, send) -> None:
        lean = self.routes.get((scope.get("method"), scope.get("path"))) if scope["type"] == "http" else None
        if lean is None or (self.overrides_provider is not None
                            and getattr(self.overrides_provider, "dependency_overrides", None)):
            await self.app(scope, receive, send)
            return
        content_type = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                # The first, as Starlette's request.headers.get (FastAPI's handler) reads
                # it: the last made a body sent as text/plain, then application/json,
                # JSON here and not there (review23).
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        if length is None or not length.isdigit() or int(length) > self.max_body_bytes:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return   # the client went away mid-body: nothing to answer, nothing done
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        replay = replaying_receive(raw, False, receive)
        try:
            body = lean.parse(content_type, raw) if len(raw) <= self.max_body_bytes else None
        except BodyRefused as refusal:   # the route's 422, from this one parse and validation
            body = refusal
        if body is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = lean.route   # as the router would: the observe middleware labels by it
        request = Request(scope, replay, send)
        try:
            if isinstance(body, BodyRefused):
                await lean.refuse(request, body)
            response = await lean.respond(request, body)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, replay, send)


def fast_lane_routes(routes) -> dict[tuple[str, str], LeanEndpoint]:
    """(method, path) -> short path, for the LeanRoutes among ``routes`` that have the
    lean shape (as declared: include them without prefix or router-level settings)."""
    table = {}
    for route in routes:
        if isinstance(route, LeanRoute) and "{" not in route.path:
            lean = lean_endpoint(route)
            if lean is not None:
                for method in route.methods:
                    table[(method, route.path)] = lean
    return table
