"""The service's domain errors and the one table that maps every domain error to an HTTP status.

The service and the serving library raise what went wrong in their own terms; the wiring
(retriever/server.py) registers one handler that answers each with the status from `ERRORS`, and
the KServe adapter counts each under the reason from the same table.
"""

from __future__ import annotations

from http import HTTPStatus

from retriever.purchases import PurchaseStoreUnavailable
from serving.catalog import UnknownIds
from serving.filters import FilterError
from serving.towers import TritonUnavailable


class RequestError(ValueError):
    """The request is malformed or names something the index does not know; the message says where."""


class RequestTooLarge(RequestError):
    """The request asks for more work than one request may (instances, items across them)."""


class Unauthorized(PermissionError):
    """A protected endpoint was called without a bearer token."""


class Forbidden(PermissionError):
    """A protected endpoint was called with a wrong bearer token."""


class NotReady(RuntimeError):
    """No index is loaded yet."""


NOT_SERVING = "the index is not loaded or its towers do not answer"  # why a health check says no


# domain error -> (HTTP status, reason label of retriever_errors_total); the first match wins.
ERRORS: tuple[tuple[type[Exception], HTTPStatus, str], ...] = (
    (RequestTooLarge, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too_large"),
    (RequestError, HTTPStatus.BAD_REQUEST, "invalid_input"),
    (UnknownIds, HTTPStatus.BAD_REQUEST, "invalid_input"),
    (FilterError, HTTPStatus.BAD_REQUEST, "invalid_input"),
    (Unauthorized, HTTPStatus.UNAUTHORIZED, "unauthorized"),
    (Forbidden, HTTPStatus.FORBIDDEN, "forbidden"),
    (TritonUnavailable, HTTPStatus.SERVICE_UNAVAILABLE, "triton_unavailable"),
    (PurchaseStoreUnavailable, HTTPStatus.SERVICE_UNAVAILABLE, "purchase_store_unavailable"),
    (NotReady, HTTPStatus.SERVICE_UNAVAILABLE, "not_ready"),
)
DOMAIN_ERRORS = tuple(error for error, _, _ in ERRORS)


def classify(err: BaseException) -> tuple[HTTPStatus, str]:
    """(status, reason) of an error; anything not in the table is an internal error (500)."""
    for error, status, reason in ERRORS:
        if isinstance(err, error):
            return status, reason
    return HTTPStatus.INTERNAL_SERVER_ERROR, "internal"


def reason(err: BaseException, malformed: tuple[type[BaseException], ...] = ()) -> str:
    """The retriever_errors_total reason of an error; `malformed`: a web framework's own invalid-input errors
    (KServe's InvalidInput, FastAPI's RequestValidationError), which its transport layer names."""
    return "invalid_input" if isinstance(err, malformed) else classify(err)[1]


def message(err: BaseException) -> str:
    """What the client is told: the domain message (UnknownIds' without KeyError's quotes)."""
    return err.message if isinstance(err, UnknownIds) else str(err)
