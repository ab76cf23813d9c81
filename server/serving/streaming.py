"""Stream helpers shared by the endpoint families."""

from __future__ import annotations

from schemas.openai.errors import ErrorBody, ErrorResponse
from server.errors import OpenAIError


def error_event(err: OpenAIError) -> ErrorResponse:
    """The ``{"error": {...}}`` object sent as the last frame when a stream fails after its first byte."""
    return ErrorResponse(error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
