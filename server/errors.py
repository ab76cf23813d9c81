"""The one exception type that becomes an OpenAI-style error response.

Pure Python (no Litestar import) so that serving code can raise it; ``server.api.exceptions`` renders it.
"""

from __future__ import annotations

from collections.abc import Mapping


class OpenAIError(Exception):
    """An error rendered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``.

    Args:
        status: HTTP status code.
        type: OpenAI error type, e.g. ``invalid_request_error``.
        message: Human-readable text; never contains secrets.
        param: The offending request parameter, if any.
        code: Machine-readable code, e.g. ``context_length_exceeded``.
        headers: Extra response headers (``retry-after`` …).
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def invalid_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    """A 400 ``invalid_request_error``."""
    return OpenAIError(400, "invalid_request_error", message, param=param, code=code)


def unsupported_param(param: str, what: str | None = None) -> OpenAIError:
    """A 400 for an OpenAI parameter this server does not implement yet (never silently accepted)."""
    detail = what or f"'{param}'"
    return OpenAIError(
        400,
        "invalid_request_error",
        f"{detail} is not supported by this server yet.",
        param=param,
        code="unsupported_parameter",
    )


def overloaded(message: str = "The server is overloaded; retry shortly.", retry_after_s: int = 1) -> OpenAIError:
    """A 503 ``overloaded`` with ``retry-after``."""
    return OpenAIError(503, "server_error", message, code="overloaded", headers={"retry-after": str(retry_after_s)})


def model_not_found(model: str) -> OpenAIError:
    """404 ``model_not_found`` with OpenAI's wording (also for a model the caller's role may not see)."""
    return OpenAIError(
        404,
        "invalid_request_error",
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )
