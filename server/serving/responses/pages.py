"""Pages of a stored response's input items, as OpenAI's list objects (``GET /v1/responses/{id}/input_items``)."""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.openai.responses import InputItem, InputItemList
from server.errors import invalid_request

MAX_PAGE = 100


def page(
    items: list[InputItem],
    *,
    limit: int = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    before: str | None = None,
) -> InputItemList:
    """Up to ``limit`` items in ``order`` (``desc``: newest first), strictly after / before the items with those
    ids; an id that is not in the list gets a 400 naming it.

    ``before`` alone pages backwards: the page is the ``limit`` items just before it (as ``after`` gives the
    ``limit`` items just after), and ``has_more`` says whether more come before those.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise invalid_request(f"'limit' must be between 1 and {MAX_PAGE}.", "limit")
    ordered = items if order == "asc" else items[::-1]
    ids = [getattr(item, "id", None) for item in ordered]
    start, end = 0, len(ordered)
    if after is not None:
        start = _position(ids, after, "after") + 1
    if before is not None:
        end = _position(ids, before, "before")
    window = ordered[start:end]
    chosen = window[-limit:] if before is not None and after is None else window[:limit]
    data = [msgspec.to_builtins(item) for item in chosen]
    return InputItemList(
        data=data,
        first_id=data[0].get("id") if data else None,
        last_id=data[-1].get("id") if data else None,
        has_more=len(window) > limit,
    )


def _position(ids: list[str | None], wanted: str, param: str) -> int:
    try:
        return ids.index(wanted)
    except ValueError:
        raise invalid_request(f"No input item with id '{wanted}' in this response.", param) from None
