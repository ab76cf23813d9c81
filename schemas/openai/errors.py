"""The OpenAI error envelope used by every non-2xx response."""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, kw_only=True):
    """What went wrong, in OpenAI's words."""

    message: str
    type: str
    param: str | None  # always sent, ``null`` when no single parameter is to blame
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """``{"error": {...}}``."""

    error: ErrorBody
