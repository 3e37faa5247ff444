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

A body with an array longer than its model allows (``events``, ``touchpoints``, an event's
``genres``...) is refused on the short path with the 422 pydantic would give, after the
dependencies and before any item is validated (gateway/body_bounds.py; the generic path
checks the same before FastAPI parses the body again). Anything else (no body, another
content type, JSON that does not parse, a body that fails validation, a dependency
override, an answer that is not the declared model) goes to FastAPI's own handler for
that request, so every error answer (422 naming the field,
the credentials-first rule for malformed bodies, 400/413) is produced by the same code as
before. Routes of any other shape keep FastAPI's handler entirely.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

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
    decides whether a body is JSON (anything else goes to its handler)."""
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == JSON_MEDIA_TYPE or (media.startswith("application/") and media.endswith("+json"))


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
        JSON, empty, malformed, invalid: its error answers are the documented ones).
        Raises RequestValidationError (the 422 FastAPI's handler would give) for an
        array over its bound, before its items are validated (gateway/body_bounds.py)."""
        if not raw or not _json_content_type(content_type):
            return None
        try:
            decoded = loads_unique_keys(raw)
        except (ValueError, RecursionError):   # ValueError: JSONDecodeError, a key twice, bytes not UTF-8
            return None
        if self.bounds is not None:
            self.bounds.check(decoded)
        body, errors = self.body_field.validate(decoded, {}, loc=("body",))
        return None if errors else body

    async def refuse(self, request: Request, refusal: RequestValidationError) -> None:
        """An array over its bound (``parse`` raised ``refusal``): the dependencies first,
        as FastAPI runs them before it validates a body (a caller they refuse gets their
        answer), then the 422."""
        for _name, call, request_param in self.dependencies:
            await call(**{request_param: request})
        raise refusal

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
            except RequestValidationError as refusal:   # an array over its bound
                await lean.refuse(request, refusal)
                raise
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
            except DuplicateKeyError as exc:
                raise RequestValidationError([{
                    "type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {},
                    "ctx": {"error": f"{exc} (ambiguous: each key may be given once)"}}]) from None
            except NotUtf8Error as exc:
                # json.loads (FastAPI's too) reads UTF-16/32 bytes; readers in front of the
                # gateway see other text: ambiguous like a key given twice (session 21).
                raise RequestValidationError([{
                    "type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {},
                    "ctx": {"error": str(exc)}}]) from None
            except (ValueError, RecursionError):
                pass   # malformed: the handler's own answer
            else:
                if bounds is not None:
                    bounds.check(decoded)
                del decoded
        return await handler(request)

    return checked


def _refusing_repeated_query(route, handler: Callable[[Request], Coroutine[Any, Any, Response]]
                             ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """``handler`` behind a check that no single-valued query parameter of ``route`` is
    given twice. Starlette keeps every value and FastAPI reads the last
    (``?limit=5&limit=500`` is ``limit=500``), other readers (a proxy's rate rule, a WAF,
    a log filter) often the first: ambiguous, like a JSON key given twice. Refused with a
    422 naming the parameter, through the validation-error handler (credentials first).
    A parameter declared as a list (meant to repeat) stays allowed; parameters the route
    does not declare are ignored, as before."""
    single = tuple(f.alias for f in get_flat_params(route.dependant)
                   if getattr(f.field_info, "in_", None) == ParamTypes.query
                   and not field_annotation_is_sequence(f.field_info.annotation))
    if not single:
        return handler

    async def checked(request: Request) -> Response:
        query = request.query_params
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
    with a ``Content-Length`` within ``max_body_bytes`` whose body the route's model
    accepts. Everything else — chunked bodies, other content types, malformed or invalid
    bodies, dependency overrides, any other route — goes on to the application with the
    body replayed, so FastAPI's handler answers it as before. Exceptions from the short
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
        except RequestValidationError as refusal:   # an array over its bound: the route's 422
            body = refusal
        if body is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = lean.route   # as the router would: the observe middleware labels by it
        request = Request(scope, replay, send)
        try:
            if isinstance(body, RequestValidationError):
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
