"""Roles and API keys. The caller owns the transaction: these functions flush, never commit."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from persistence.models import ApiKey, Role
from persistence.records import KeyRecord, RoleRecord

__all__ = (
    "LIMIT_FIELDS",
    "UNSET",
    "AlreadyRotated",
    "create_role",
    "get_key",
    "get_key_by_digest",
    "get_role",
    "insert_key",
    "list_keys",
    "list_roles",
    "mark_rotated",
    "revoke_key",
    "update_role",
)


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""Default of :func:`update_role` arguments: leave the field as it is (``None`` sets it to unlimited)."""

LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "monthly_tokens", "monthly_requests", "max_tokens", "max_n")
"""The integer limits of a role, in display order."""

_Limit = int | None | Literal[_Unset.UNSET]
_Models = Sequence[str] | None | Literal[_Unset.UNSET]


def _check_limit(field: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{field} must be a non-negative integer or None (unlimited), got {value!r}")
    return value


def _check_models(value: Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(m, str) and m for m in value):
        raise ValueError(f"allowed_models must be a list of model names or None (all models), got {value!r}")
    return list(dict.fromkeys(value))


async def list_roles(session: AsyncSession) -> list[RoleRecord]:
    """Every role, by name."""
    roles = await session.scalars(select(Role).order_by(Role.name))
    return [RoleRecord.from_orm(r) for r in roles]


async def get_role(session: AsyncSession, name: str) -> RoleRecord | None:
    """The role called ``name``, or ``None``."""
    role = await session.get(Role, name)
    return None if role is None else RoleRecord.from_orm(role)


async def create_role(
    session: AsyncSession,
    name: str,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
    monthly_tokens: int | None = None,
    monthly_requests: int | None = None,
    max_tokens: int | None = None,
    max_n: int | None = None,
    allowed_models: Sequence[str] | None = None,
    is_admin: bool = False,
) -> RoleRecord:
    """Create a role; omitted limits are unlimited (``max_n``: the server's own bound of choices per request).

    Raises:
        ValueError: the role exists already, or a limit is invalid. (If a concurrent insert wins the race, the
            session must be rolled back.)
    """
    if not name or len(name) > 64:
        raise ValueError(f"role name must be 1 to 64 characters, got {name!r}")
    if await session.get(Role, name) is not None:
        raise ValueError(f"role {name!r} already exists")
    role = Role(
        name=name,
        rpm=_check_limit("rpm", rpm),
        tpm=_check_limit("tpm", tpm),
        max_concurrency=_check_limit("max_concurrency", max_concurrency),
        monthly_tokens=_check_limit("monthly_tokens", monthly_tokens),
        monthly_requests=_check_limit("monthly_requests", monthly_requests),
        max_tokens=_check_limit("max_tokens", max_tokens),
        max_n=_check_limit("max_n", max_n),
        allowed_models=_check_models(allowed_models),
        is_admin=bool(is_admin),
    )
    session.add(role)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise ValueError(f"role {name!r} already exists") from exc
    return RoleRecord.from_orm(role)


async def update_role(
    session: AsyncSession,
    name: str,
    *,
    rpm: _Limit = UNSET,
    tpm: _Limit = UNSET,
    max_concurrency: _Limit = UNSET,
    monthly_tokens: _Limit = UNSET,
    monthly_requests: _Limit = UNSET,
    max_tokens: _Limit = UNSET,
    max_n: _Limit = UNSET,
    allowed_models: _Models = UNSET,
    is_admin: bool | Literal[_Unset.UNSET] = UNSET,
) -> RoleRecord:
    """Change only the given fields of a role; ``None`` makes a limit unlimited (``allowed_models``: all models).

    Raises:
        LookupError: no such role.
        ValueError: a limit is invalid.
    """
    role = await session.get(Role, name)
    if role is None:
        raise LookupError(f"unknown role {name!r}")
    limits = {
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrency": max_concurrency,
        "monthly_tokens": monthly_tokens,
        "monthly_requests": monthly_requests,
        "max_tokens": max_tokens,
        "max_n": max_n,
    }
    for field, value in limits.items():
        if value is not UNSET:
            setattr(role, field, _check_limit(field, value))
    if allowed_models is not UNSET:
        role.allowed_models = _check_models(allowed_models)
    if is_admin is not UNSET:
        role.is_admin = bool(is_admin)
    await session.flush()
    return RoleRecord.from_orm(role)


async def insert_key(
    session: AsyncSession,
    *,
    id: str,
    name: str,
    prefix: str,
    last4: str,
    digest: str,
    role_name: str,
    expires_at: datetime | None,
    created_at: datetime | None = None,
) -> KeyRecord:
    """Store a new key's metadata and digest (the caller generated the key and computed the HMAC).

    Raises:
        LookupError: ``role_name`` is not a role.
        ValueError: the id or digest is taken (the session must then be rolled back).
    """
    if await session.get(Role, role_name) is None:
        raise LookupError(f"unknown role {role_name!r}")
    key = ApiKey(
        id=id,
        name=name,
        prefix=prefix,
        last4=last4,
        digest=digest,
        role_name=role_name,
        expires_at=expires_at,
    )
    if created_at is not None:
        key.created_at = created_at
    session.add(key)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise ValueError(f"an API key with id {id!r} or the same digest already exists") from exc
    return KeyRecord.from_orm(key)


async def get_key_by_digest(session: AsyncSession, digest: str) -> tuple[KeyRecord, RoleRecord] | None:
    """The key with this digest and its role, in one query; ``None`` if unknown (validity is the caller's call)."""
    row = (
        await session.execute(
            select(ApiKey, Role).join(Role, ApiKey.role_name == Role.name).where(ApiKey.digest == digest)
        )
    ).first()
    if row is None:
        return None
    key, role = row
    return KeyRecord.from_orm(key), RoleRecord.from_orm(role)


async def get_key(session: AsyncSession, id: str) -> KeyRecord | None:
    """The key with this public id, or ``None``."""
    key = await session.get(ApiKey, id)
    return None if key is None else KeyRecord.from_orm(key)


async def list_keys(session: AsyncSession, *, role_name: str | None = None) -> list[KeyRecord]:
    """Every key (optionally of one role), oldest first; records carry no secret material."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if role_name is not None:
        query = query.where(ApiKey.role_name == role_name)
    return [KeyRecord.from_orm(k) for k in await session.scalars(query)]


async def _load_key(session: AsyncSession, id: str) -> ApiKey:
    key = await session.get(ApiKey, id)
    if key is None:
        raise LookupError(f"unknown API key {id!r}")
    return key


async def revoke_key(session: AsyncSession, id: str, at: datetime) -> KeyRecord:
    """Revoke a key from ``at`` on; revoking again keeps the first revocation time.

    Raises:
        LookupError: no such key.
    """
    key = await _load_key(session, id)
    if key.revoked_at is None or at < key.revoked_at:
        key.revoked_at = at
    await session.flush()
    return KeyRecord.from_orm(key)


class AlreadyRotated(ValueError):
    """The key already has a replacement: rotating it again could only reopen or extend its grace period."""

    def __init__(self, key_id: str, replaced_by_id: str) -> None:
        super().__init__(
            f"key {key_id} was already rotated (replaced by {replaced_by_id}); rotate {replaced_by_id} instead, "
            f"or revoke {key_id} to end its grace period now"
        )
        self.key_id = key_id
        self.replaced_by_id = replaced_by_id


async def mark_rotated(session: AsyncSession, old_id: str, new_id: str, grace_until: datetime) -> KeyRecord:
    """Record that ``new_id`` replaces ``old_id``, which keeps working until ``grace_until``.

    A key is rotated once: a second rotation would move ``grace_until`` and bring back a key whose grace had
    ended. The update is conditional on the key having no replacement yet, so of two concurrent rotations
    exactly one wins (the other's transaction, with its new key, must be rolled back).

    Raises:
        LookupError: either key is unknown.
        AlreadyRotated: ``old_id`` already has a replacement.
    """
    old = await _load_key(session, old_id)
    await _load_key(session, new_id)
    if old.replaced_by_id is not None:
        raise AlreadyRotated(old_id, old.replaced_by_id)
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == old_id, ApiKey.replaced_by_id.is_(None))
        .values(replaced_by_id=new_id, grace_until=grace_until)
        .execution_options(synchronize_session=False)
    )
    if cast("CursorResult[Any]", result).rowcount != 1:  # another transaction rotated it since we read it
        await session.refresh(old)
        raise AlreadyRotated(old_id, old.replaced_by_id or "another key")
    await session.refresh(old)
    return KeyRecord.from_orm(old)
