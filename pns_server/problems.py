"""Render every error, ours and the framework's, as RFC 9457 problem+json."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from pns_server.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PnsError,
    ServiceUnavailable,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)


def log_unexpected(logger: logging.Logger, exc: Exception) -> None:
    """One error line for a bug, without the values a statement was given."""
    if isinstance(exc, sa_exc.StatementError):
        # The statement (placeholders only) and the driver's error class, not its text:
        # drivers quote the offending parameter value in their messages.
        logger.error(
            "database error %s in: %s",
            type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__,
            " ".join(str(exc.statement).split()),
        )
    else:
        logger.exception("unhandled error: %s", type(exc).__name__)


PROBLEM_JSON = "application/problem+json"
# Pool exhausted, connection refused or dropped: the database, not the request, is at fault.
DATABASE_UNAVAILABLE = (sa_exc.TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError)

# Declared on every API router so the OpenAPI schema tells the truth: any 4xx is a problem.
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
    },
    "additionalProperties": True,
}
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "description": "RFC 9457 problem; `code` is the stable machine-readable reason",
        "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}},
    },
    503: {
        "description": "The database is busy or unreachable (`code: unavailable`); retry after "
        "`Retry-After` seconds",
        "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}},
    },
}


def internal_error() -> InternalError:
    """A bug, not an outage: 500, so monitoring and clients do not mistake it for the 503
    that means "the database is busy, retry"."""
    return InternalError(
        "The server hit an unexpected error; retry, and report it to the operator with the "
        "X-Request-Id of this response if it persists."
    )


def unavailable(exc: Exception) -> ServiceUnavailable:
    """Overload (pool exhausted) or an outage: expected under stress, so one line and no
    traceback (statement parameters may hold secrets)."""
    log.warning("database unavailable: %s", type(exc).__name__)
    return ServiceUnavailable(
        "The database is busy or unreachable; retry in a moment.",
        headers={"Retry-After": "1"},
    )


def problem_for(exc: Exception) -> PnsError:
    """The problem the app's error handlers answer an exception raised by our own code
    with; also used where they cannot be reached any more (a parked long-poll)."""
    if isinstance(exc, PnsError):
        return exc
    # A connection that died under a statement (the server restarted or went away) is an
    # outage, not a bug: 503, so the caller retries. Any other database error is a bug.
    if isinstance(exc, DATABASE_UNAVAILABLE) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    ):
        return unavailable(exc)
    log_unexpected(log, exc)
    return internal_error()


def problem_response(error: PnsError) -> JSONResponse:
    return JSONResponse(
        error.to_problem(), status_code=error.status, media_type=PROBLEM_JSON, headers=error.headers
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, rest = parts[0], parts[1:]
        return ".".join(rest) if rest and where == "body" else ".".join(parts)
    return ".".join(parts)


def validation_problem(exc: RequestValidationError) -> PnsError:
    errors = []
    for err in exc.errors():
        # Never echo the submitted value: it may be a secret (a code, a token).
        errors.append(
            {
                "field": _field_name(tuple(err.get("loc", ()))) or "body",
                "message": str(err.get("msg", "invalid")),
                "type": str(err.get("type", "value_error")),
            }
        )
    names = ", ".join(sorted({e["field"] for e in errors})) or "the body"
    return InvalidRequest(f"Fix these fields and retry: {names}.", errors=errors)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PnsError)
    async def _pns(_request: Request, exc: PnsError) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: PnsError
        if exc.status_code == 400:
            # The framework's "error parsing the body" (e.g. invalid UTF-8) is a bad body.
            error = InvalidRequest(
                "The body must be JSON encoded as UTF-8.",
                errors=[{"field": "body", "message": str(exc.detail), "type": "json_invalid"}],
            )
        elif exc.status_code == 404:
            error = NotFound("No such resource; check the path against the API reference.")
        elif exc.status_code == 405:
            error = MethodNotAllowed("This path does not accept that method.")
        elif exc.status_code == 413:
            error = PayloadTooLarge("The request body is too large.")
        elif exc.status_code == 415:
            error = UnsupportedMediaType("Send the body as application/json.")
        else:
            error = PnsError(str(exc.detail))
            error.status = exc.status_code  # type: ignore[misc]
        error.headers.update(exc.headers or {})
        return problem_response(error)

    async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        return problem_response(unavailable(exc))

    # Registered per class, not under Exception: those handlers run in the outermost
    # middleware, which re-raises to the server after answering.
    for exc_class in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_class, _database_unavailable)

    async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
        return problem_response(problem_for(exc))

    app.add_exception_handler(sa_exc.DBAPIError, _database_error)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The last resort, for the framework's own outer layers: `AnswerUnexpected` answers
        # what our code raises first, so the exception does not go on to the server.
        return problem_response(problem_for(exc))
