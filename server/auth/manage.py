"""Key, role and usage operations shared by the CLI and the ``/admin`` routes."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession

from persistence import store
from persistence.keys import AlreadyRotated
from persistence.store import KeyRecord, RoleRecord, UsageRecord
from schemas.admin import KeyOut, RoleIn, RoleOut, UsageOut
from server.auth.keys import digest, display_parts, generate_key, is_well_formed


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def key_out(key: KeyRecord, secret: str | None = None) -> KeyOut:
    """A key for listings; ``secret`` only when it was just created."""
    out = KeyOut(
        id=key.id,
        name=key.name,
        role=key.role_name,
        prefix=key.prefix,
        last4=key.last4,
        created_at=_iso(key.created_at) or "",
        expires_at=_iso(key.expires_at),
        revoked_at=_iso(key.revoked_at),
        replaced_by_id=key.replaced_by_id,
        grace_until=_iso(key.grace_until),
    )
    if secret is not None:
        out.key = secret
    return out


def role_out(role: RoleRecord) -> RoleOut:
    return RoleOut(
        name=role.name,
        rpm=role.rpm,
        tpm=role.tpm,
        max_concurrency=role.max_concurrency,
        monthly_tokens=role.monthly_tokens,
        monthly_requests=role.monthly_requests,
        max_tokens=role.max_tokens,
        max_n=role.max_n,
        models=None if role.allowed_models is None else list(role.allowed_models),
        is_admin=role.is_admin,
    )


def usage_out(row: UsageRecord) -> UsageOut:
    return UsageOut(key_id=row.key_id, month=row.month, tokens=row.tokens, requests=row.requests)


def role_limits(spec: RoleIn) -> dict[str, Any]:
    """The fields of ``spec`` that were given, with ``models`` renamed to the column ``allowed_models``."""
    given = {f: getattr(spec, f) for f in spec.__struct_fields__ if getattr(spec, f) is not msgspec.UNSET}
    if "models" in given:
        given["allowed_models"] = given.pop("models")
    given.pop("name", None)
    return given


async def create_key(
    session: AsyncSession,
    pepper: bytes,
    *,
    name: str,
    role: str,
    expires_in_days: int | None,
    secret: str | None = None,
) -> tuple[KeyRecord, str]:
    """Create a key; the secret is returned here and never again.

    Args:
        secret: A key the caller already holds (from ``keys generate``, provisioned out of band) to store
            instead of a fresh one; only its digest is kept, as for a generated key.

    Raises:
        ValueError: ``secret`` is not a well-formed key, or a key with the same digest exists.
    """
    if secret is None:
        secret = generate_key()
    elif not is_well_formed(secret):
        raise ValueError("the key is not a well-formed llm-server key")
    prefix, last4 = display_parts(secret)
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
    key = await store.insert_key(
        session,
        id=f"key_{secrets.token_hex(8)}",
        name=name,
        prefix=prefix,
        last4=last4,
        digest=digest(secret, pepper),
        role_name=role,
        expires_at=expires,
    )
    return key, secret


async def find_key(session: AsyncSession, pepper: bytes, secret: str) -> KeyRecord | None:
    """The stored key whose digest matches ``secret`` (whatever its state), or ``None``."""
    found = await store.get_key_by_digest(session, digest(secret, pepper))
    return None if found is None else found[0]


async def rotate_key(session: AsyncSession, pepper: bytes, key_id: str, grace_hours: float) -> tuple[KeyRecord, str]:
    """Issue a replacement with the same name and role; the old key works until the grace deadline.

    A key is rotated at most once, so its grace deadline is set once and never moves (rotate the replacement
    instead; revoke the old key to end its grace early).

    Raises:
        LookupError: no such key.
        AlreadyRotated: the key already has a replacement.
        ValueError: the key is revoked.
    """
    old = await store.get_key(session, key_id)
    if old is None:
        raise LookupError(f"unknown key {key_id!r}")
    if old.revoked_at is not None:
        raise ValueError(f"key {key_id} is revoked; create a new key instead")
    if old.replaced_by_id is not None:
        raise AlreadyRotated(key_id, old.replaced_by_id)
    remaining_days = None
    if old.expires_at is not None:
        remaining_days = max(1, (old.expires_at - datetime.now(UTC)).days)
    new, secret = await create_key(session, pepper, name=old.name, role=old.role_name, expires_in_days=remaining_days)
    await store.mark_rotated(session, old.id, new.id, datetime.now(UTC) + timedelta(hours=grace_hours))
    return new, secret
