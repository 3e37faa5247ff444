"""The array bounds of a body model, checked on the parsed JSON before the model validates it.

pydantic validates a bounded list item by item and refuses it once it has validated one
item more than its ``max_length`` allows, so an over-bound array costs up to ``max_length
+ 1`` item validations, and the route's generic path parsed the body two more times
before that (docs/security.md, "Attacker's review (session 21)", item 10). ``BodyBounds``
reads a model's bounded arrays (lists and mappings with ``max_length``, at any depth:
``events``, an event's ``genres``, ``touchpoints``, ``account_ids``, ...) once, and
``check`` walks the parsed JSON along them: the first array longer than its bound is
refused with the error pydantic gives for it (type ``too_long``, the same loc, message
and context), as a ``RequestValidationError`` — so the gateway's 422 names the same field
with the same message — before a single item is validated.

One difference from pydantic's own answer: a body with an over-bound array *and* another
invalid field declared before it is refused for the array (pydantic reports the other
field first). Both are 422 ``invalid_argument``; only which of the two is named differs.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic.fields import FieldInfo

# pydantic's field_type in a too_long error, by container (JSON gives lists and dicts;
# the models declare no tuples or sets).
_LABELS = {list: "List", dict: "Dictionary"}


class _Model:
    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: tuple[tuple[str, Any], ...] = ()


class _Array:
    __slots__ = ("label", "max_length", "item")

    def __init__(self, label: str, max_length: int | None, item) -> None:
        self.label, self.max_length, self.item = label, max_length, item


def _max_length(metadata) -> int | None:
    for m in metadata:
        if isinstance(m, FieldInfo):
            found = _max_length(m.metadata)
        else:
            found = getattr(m, "max_length", None)
        if isinstance(found, int):
            return found
    return None


def _shape(annotation, metadata, seen: dict):
    """What to check of a value of ``annotation`` (None: nothing bounded inside it)."""
    if get_origin(annotation) is Annotated:
        args = get_args(annotation)
        return _shape(args[0], [*metadata, *args[1:]], seen)
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        shapes = [_shape(a, metadata, seen) for a in get_args(annotation) if a is not type(None)]
        shapes = [s for s in shapes if s is not None]
        return shapes[0] if len(shapes) == 1 else None   # several: which applies is pydantic's choice
    container = origin if origin in _LABELS else (annotation if annotation in _LABELS else None)
    if container is not None:
        args = get_args(annotation)
        item_type = (args[1] if container is dict else args[0]) if args else None
        item = _shape(item_type, [], seen) if item_type is not None else None
        bound = _max_length(metadata)
        return _Array(_LABELS[container], bound, item) if bound is not None or item is not None else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model(annotation, seen)
    return None


def _model(model: type[BaseModel], seen: dict):
    if model in seen:
        return seen[model]          # read before (None: nothing bounded), or a model that contains itself
    node = seen[model] = _Model()
    fields = []
    for name, field in model.model_fields.items():
        key = field.validation_alias if isinstance(field.validation_alias, str) else (field.alias or name)
        shape = _shape(field.annotation, field.metadata, seen)
        if shape is not None:
            fields.append((key, shape))
    node.fields = tuple(fields)
    if not fields:
        seen[model] = None
    return seen[model]


def _too_long(shape: _Array, value, loc: tuple) -> dict:
    # pydantic counts a list up front, a mapping as it goes: "not 17" / "not more".
    bound, n = shape.max_length, (len(value) if shape.label == "List" else None)
    return {"type": "too_long", "loc": loc,
            "msg": f"{shape.label} should have at most {bound} item{'' if bound == 1 else 's'} "
                   f"after validation, not {'more' if n is None else n}",
            "input": value, "ctx": {"field_type": shape.label, "max_length": bound, "actual_length": n}}


def _first_over(shape, value, loc: tuple, depth: int = 0) -> dict | None:
    if depth > 64:
        return None   # deeper than any model here: left to pydantic
    if isinstance(shape, _Model):
        if isinstance(value, dict):
            for key, sub in shape.fields:
                if key in value and (found := _first_over(sub, value[key], (*loc, key), depth + 1)):
                    return found
        return None
    if shape.label == "Dictionary":
        if not isinstance(value, dict):
            return None
        if shape.max_length is not None and len(value) > shape.max_length:
            return _too_long(shape, value, loc)
        if shape.item is not None:
            for key, item in value.items():
                if (found := _first_over(shape.item, item, (*loc, key), depth + 1)):
                    return found
        return None
    if not isinstance(value, list):
        return None
    if shape.max_length is not None and len(value) > shape.max_length:
        return _too_long(shape, value, loc)
    if shape.item is not None:
        for i, item in enumerate(value):
            if (found := _first_over(shape.item, item, (*loc, i), depth + 1)):
                return found
    return None


class BodyBounds:
    """The bounded arrays of one body model (``None`` from ``of`` when it has none)."""

    def __init__(self, shape) -> None:
        self._shape = shape

    @classmethod
    def of(cls, annotation) -> "BodyBounds | None":
        shape = _shape(annotation, [], {})
        return cls(shape) if shape is not None else None

    def first_over(self, decoded) -> dict | None:
        """pydantic's ``too_long`` error (loc under ``body``) for the first array of
        ``decoded`` (parsed JSON) longer than its bound, else None."""
        return _first_over(self._shape, decoded, ("body",))

    def check(self, decoded) -> None:
        """Raise the 422's RequestValidationError when an array of ``decoded`` is over
        its bound; its items are never validated."""
        error = self.first_over(decoded)
        if error is not None:
            raise RequestValidationError([error])


def bounds_of_route(route) -> BodyBounds | None:
    """The body bounds of a route (APIRoute) whose body is one model, not embedded."""
    d = route.dependant
    if len(d.body_params) != 1 or getattr(route, "_embed_body_fields", False):
        return None
    return BodyBounds.of(d.body_params[0].field_info.annotation)

