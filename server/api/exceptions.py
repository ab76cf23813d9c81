"""The one exception handler: every error, on every route, becomes OpenAI's ``{"error": {...}}``."""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.exceptions.http_exceptions import (
    MethodNotAllowedException,
    NotFoundException,
    RequestEntityTooLarge,
)

from schemas.openai.errors import ErrorBody, ErrorResponse
from server.api.context import context_of
from server.auth.principal import database_unavailable
from server.errors import OpenAIError, invalid_request
from server.records.database import DatabaseUnavailable, describe_error, error_location, is_data_exception
from server.wiring.state import find_app_state

log = logging.getLogger("server.api")
_encoder = msgspec.json.Encoder()
_PATH = re.compile(r" - at `(?:key` in `)?\$(.*)`$")


def param_from_path(path: str) -> str | None:
    """``.messages[0].content`` -> ``messages[0].content``; a value of a map (msgspec writes ``[...]`` for its key)
    is named by the map: ``.metadata[...]`` -> ``metadata``."""
    path = path.split("[...]", 1)[0].lstrip(".")
    return path or None


def from_msgspec(exc: msgspec.ValidationError | msgspec.DecodeError) -> OpenAIError:
    """A 400 naming the parameter msgspec complained about."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        match = _PATH.search(text)
        param = param_from_path(match.group(1)) if match else None
        detail = _PATH.sub("", text)
        missing = re.match(r"Object missing required field `(\w+)`", detail)
        if missing:
            param = f"{param}.{missing.group(1)}" if param else missing.group(1)
            return invalid_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
        where = f" for '{param}'" if param else ""
        return invalid_request(f"Invalid value{where}: {detail}.", param)
    return invalid_request(f"We could not parse the JSON body of your request ({text}).", None, "invalid_json")


def to_openai_error(exc: Exception) -> OpenAIError:
    """Map any exception to an :class:`OpenAIError` (client mistakes are never 5xx)."""
    if isinstance(exc, OpenAIError):
        return exc
    if is_data_exception(exc):
        log.warning("the database rejected a value from the request: %s", describe_error(exc))
        return invalid_request(
            "A value in the request cannot be stored: it is out of range, too long or contains a character that "
            "is not allowed (such as NUL).",
            None,
        )
    if isinstance(exc, DatabaseUnavailable):
        log.warning("database unavailable: %s", exc)
        return database_unavailable()
    if isinstance(exc, msgspec.ValidationError | msgspec.DecodeError):
        return from_msgspec(exc)
    if isinstance(exc, RecursionError):
        # Request bodies are bounded in depth when decoded; this catches nesting hidden in a string the request
        # carries (JSON text in a field, parsed later). Logged with its traceback: it could also be a server bug.
        log.warning("a request nested too deeply to process", exc_info=exc)
        return invalid_request("The request is nested too deeply to be processed.", None, "invalid_json")
    if isinstance(exc, RequestEntityTooLarge):
        return OpenAIError(413, "invalid_request_error", "The request body is too large.", code="request_too_large")
    if isinstance(exc, NotFoundException):
        return OpenAIError(404, "invalid_request_error", "Unknown route.", code="not_found")
    if isinstance(exc, MethodNotAllowedException):
        return OpenAIError(
            405, "invalid_request_error", "Method not allowed.", code="method_not_allowed", headers=exc.headers
        )
    if isinstance(exc, ValidationException):
        extra: Any = exc.extra
        key = extra[0].get("key") if isinstance(extra, list) and extra and isinstance(extra[0], dict) else None
        detail = extra[0].get("message") if key else exc.detail
        return invalid_request(f"Invalid request: {detail}", key)
    if isinstance(exc, HTTPException) and 400 <= exc.status_code < 500:
        return OpenAIError(exc.status_code, "invalid_request_error", exc.detail, headers=exc.headers)
    if _from_database(exc):
        # No traceback text: a database error's message carries the statement and its parameters (request data).
        log.error("unhandled database error: %s%s", describe_error(exc), error_location(exc))
    else:
        log.exception("unhandled error", exc_info=exc)
    return OpenAIError(500, "server_error", "The server had an error while processing your request.")


def _from_database(exc: BaseException) -> bool:
    """Whether ``exc`` is a database driver's or SQLAlchemy's error (whose text may quote request data)."""
    seen: BaseException | None = exc
    for _ in range(16):  # causes and contexts: a short chain, bounded in case one loops
        if seen is None:
            break
        if type(seen).__module__.split(".")[0] in ("sqlalchemy", "asyncpg", "sqlite3", "aiosqlite"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_response(err: OpenAIError) -> Response[bytes]:
    """Render ``err`` as the OpenAI envelope."""
    body = ErrorResponse(error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    return Response(
        content=_encoder.encode(body), status_code=err.status, media_type="application/json", headers=err.headers
    )


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Litestar exception handler for ``Exception`` (a plain def: an async one renders an empty 500)."""
    err = to_openai_error(exc)
    state = find_app_state(request.app) if "app" in request.scope else None
    if state is not None:
        state.metrics.errors_total.labels(err.type).inc()
    record = context_of(request.scope).record
    if record is not None:
        record.error_type = err.code or err.type
    return error_response(err)
