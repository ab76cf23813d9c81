"""``/admin`` wire formats (the CLI's ``--json`` output uses the same shapes)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

# Bounded by the columns they are stored in (INTEGER / BIGINT): a bigger value was a 500 from the database.
Limit = Annotated[int, Meta(ge=1, le=2**31 - 1)] | None
BigLimit = Annotated[int, Meta(ge=1, le=2**63 - 1)] | None
# The server answers at most 128 choices (n x prompts) per request whatever the role says: a bigger bound is a mistake.
MaxN = Annotated[int, Meta(ge=1, le=128)] | None
Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class KeyCreate(msgspec.Struct, kw_only=True):
    """Create a key."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    role: str = "default"
    expires_in_days: Annotated[int, Meta(ge=1, le=36_500)] | None = None  # 100 years; more overflowed datetime


class KeyRotate(msgspec.Struct, kw_only=True):
    """Rotate a key: the old one stays valid for ``grace_hours``."""

    grace_hours: Annotated[float, Meta(ge=0, le=87_600)] = 24.0  # 10 years; more overflowed datetime


class KeyOut(msgspec.Struct, kw_only=True):
    """A key as listed; ``key`` (the secret) only in the response that created it."""

    id: str
    name: str
    role: str
    prefix: str
    last4: str
    created_at: str
    expires_at: str | None = None
    revoked_at: str | None = None
    replaced_by_id: str | None = None
    grace_until: str | None = None
    key: str | msgspec.UnsetType = msgspec.UNSET


class RoleIn(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A role's limits; a field left out is unchanged (update) or unlimited (create); ``null`` is unlimited.

    ``max_n`` bounds the choices of one request (``n`` times the prompts); unlimited means the server's own 128.
    """

    rpm: Limit | msgspec.UnsetType = msgspec.UNSET
    tpm: Limit | msgspec.UnsetType = msgspec.UNSET
    max_concurrency: Limit | msgspec.UnsetType = msgspec.UNSET
    monthly_tokens: BigLimit | msgspec.UnsetType = msgspec.UNSET
    monthly_requests: Limit | msgspec.UnsetType = msgspec.UNSET
    max_tokens: Limit | msgspec.UnsetType = msgspec.UNSET
    max_n: MaxN | msgspec.UnsetType = msgspec.UNSET
    models: list[Annotated[str, Meta(min_length=1)]] | msgspec.UnsetType | None = msgspec.UNSET


class RoleCreate(RoleIn, kw_only=True):
    """Create a role."""

    name: Name


class RoleOut(msgspec.Struct, kw_only=True):
    """A role and its limits (``null`` = unlimited / all models)."""

    name: str
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    monthly_tokens: int | None
    monthly_requests: int | None
    max_tokens: int | None
    max_n: int | None
    models: list[str] | None
    is_admin: bool


class UsageOut(msgspec.Struct, kw_only=True):
    """One key's usage in one month."""

    key_id: str
    month: str
    tokens: int
    requests: int


class KeyList(msgspec.Struct, kw_only=True):
    """``{"object": "list", "data": [keys]}``."""

    object: str = "list"
    data: list[KeyOut]


class RoleList(msgspec.Struct, kw_only=True):
    """``{"object": "list", "data": [roles]}``."""

    object: str = "list"
    data: list[RoleOut]


class UsageList(msgspec.Struct, kw_only=True):
    """``{"object": "list", "data": [usage rows]}``."""

    object: str = "list"
    data: list[UsageOut]
