"""Request ids: the client's ``x-request-id`` when it is a sane token, else a new one (cached in the scope)."""

from __future__ import annotations

import re
import secrets
from typing import Any

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(scope: Any) -> str:
    """The request's id, decided once per request."""
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        supplied = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        rid = supplied if _SANE_REQUEST_ID.match(supplied) else f"req_{secrets.token_hex(12)}"
        state["request_id"] = rid
    return str(rid)
