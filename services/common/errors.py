"""Domain exceptions and the ONE table that maps them to gRPC status codes.

Domain and store code raise these; the error interceptor (server.py) turns them into a
status with the offending field in trailing metadata; the gateway maps the status to an
HTTP status through ``gateway/errors.py``'s single table. Nothing else decides codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc


class HearthError(Exception):
    """Base of every expected failure. ``field`` names the offending input, if any."""

    code = "internal"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:  # "field: message" reads well in logs and HTTP bodies
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(HearthError, ValueError):
    code = "invalid_argument"


class NotFound(HearthError):
    code = "not_found"


class AlreadyExists(HearthError):
    code = "already_exists"


class Conflict(HearthError):
    """A compare-and-swap lost the race; the caller may re-read and retry."""

    code = "conflict"


class FailedPrecondition(HearthError):
    """The request is well-formed but the system is not in a state to serve it
    (e.g. no consent for the account)."""

    code = "failed_precondition"


class Unauthenticated(HearthError):
    code = "unauthenticated"


class PermissionDenied(HearthError):
    code = "permission_denied"


class ResourceExhausted(HearthError):
    code = "resource_exhausted"


class DeadlineExceeded(HearthError):
    """The caller's deadline passed while the work was under way: it was stopped, since
    nobody waits for its answer (``client.check_serving_deadline``)."""

    code = "deadline_exceeded"


class Unavailable(HearthError):
    """A dependency (peer service, database) is down; retrying may succeed."""

    code = "unavailable"


# The one table. Order matters only for subclasses (first match wins).
STATUS_BY_ERROR: tuple[tuple[type[HearthError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.ABORTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)

ERROR_FIELD_KEY = "x-hearth-error-field"
ERROR_CODE_KEY = "x-hearth-error-code"


def about_account(error: HearthError, account_id: str) -> HearthError:
    """``error`` (field ``account_id``) marked as being about ``account_id``, for a
    caller that holds a batch to name the item (``naming_the_item``)."""
    error.account_id = account_id
    return error


@contextlib.contextmanager
def naming_the_item(account_ids: list[str], items: str) -> Iterator[None]:
    """Around a batch's work: an error about one of its households (``about_account``,
    field ``account_id``) comes out with its field ``<items>[i].account_id``, ``i`` that
    household's first item; any other error as it is. Until attack29 a 412 for one erased
    household of a 10,000-event batch said only ``account_id``, and its message named no
    account: the sender had to bisect its batch to find what to drop."""
    try:
        yield
    except HearthError as exc:
        account = getattr(exc, "account_id", None)
        if exc.field != "account_id" or account is None or account not in account_ids:
            raise
        # The error itself, renamed: rebuilt as type(exc)(message, field) a subclass with
        # another constructor, or attributes of its own, would fail or lose them (review29).
        exc.field = f"{items}[{account_ids.index(account)}].account_id"
        raise


def refusal_of(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(status, field) of a peer's refusal: a ``grpc.RpcError`` with the field from its
    trailing metadata, or a HearthError (a servicer called in-process); None otherwise."""
    if isinstance(error, HearthError):
        return status_for(error), error.field
    code = getattr(error, "code", None)
    if isinstance(error, grpc.RpcError) and callable(code) and isinstance(code(), grpc.StatusCode):
        trailing = getattr(error, "trailing_metadata", None)
        pairs = (trailing() if callable(trailing) else None) or ()
        return code(), dict((item[0], item[1]) for item in pairs).get(ERROR_FIELD_KEY, "")
    return None


def status_for(error: BaseException) -> grpc.StatusCode:
    for error_type, status in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return status
    return grpc.StatusCode.INTERNAL
