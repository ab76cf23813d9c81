"""``/v1/models`` objects."""

from __future__ import annotations

from typing import Literal

import msgspec


class Model(msgspec.Struct, kw_only=True):
    """One served model; ``max_model_len`` (vLLM's extension) is its context window, omitted when unknown.

    A gateway forwarding to this server reads the window from here to size the max tokens it sends.
    """

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | msgspec.UnsetType = msgspec.UNSET


class ModelList(msgspec.Struct, kw_only=True):
    """All served models."""

    object: Literal["list"] = "list"
    data: list[Model]
