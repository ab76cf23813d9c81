"""Frozen snapshots of rows, safe to cache and pass around after their session has closed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from persistence.models import ApiKey, Role, StoredResponse, UsageMonthly

__all__ = ("KeyRecord", "KeyState", "ResponseRecord", "RoleRecord", "UsageRecord")

KeyState = Literal["active", "revoked", "expired", "rotated"]


@dataclass(frozen=True, slots=True)
class RoleRecord:
    """A role's limits; ``None`` means unlimited (``allowed_models`` ``None``: every model; ``max_n`` ``None``: the
    server's own bound on the choices of one request)."""

    name: str
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    monthly_tokens: int | None
    monthly_requests: int | None
    max_tokens: int | None
    max_n: int | None
    allowed_models: tuple[str, ...] | None
    is_admin: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_orm(cls, role: Role) -> RoleRecord:
        """Snapshot a loaded :class:`~persistence.models.Role`."""
        return cls(
            name=role.name,
            rpm=role.rpm,
            tpm=role.tpm,
            max_concurrency=role.max_concurrency,
            monthly_tokens=role.monthly_tokens,
            monthly_requests=role.monthly_requests,
            max_tokens=role.max_tokens,
            max_n=role.max_n,
            allowed_models=None if role.allowed_models is None else tuple(role.allowed_models),
            is_admin=role.is_admin,
            created_at=role.created_at,
            updated_at=role.updated_at,
        )

    def allows_model(self, model: str) -> bool:
        """Whether keys of this role may use ``model``."""
        return self.allowed_models is None or model in self.allowed_models


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key's public metadata: never the secret, never its digest."""

    id: str
    name: str
    prefix: str
    last4: str
    role_name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    replaced_by_id: str | None
    grace_until: datetime | None

    @classmethod
    def from_orm(cls, key: ApiKey) -> KeyRecord:
        """Snapshot a loaded :class:`~persistence.models.ApiKey` (the digest stays behind)."""
        return cls(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            last4=key.last4,
            role_name=key.role_name,
            created_at=key.created_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            replaced_by_id=key.replaced_by_id,
            grace_until=key.grace_until,
        )

    def state(self, now: datetime) -> KeyState:
        """``active``, or why the key no longer authenticates at ``now`` (timezone-aware).

        A rotated key keeps working until its ``grace_until``; revocation wins over everything else.
        """
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.replaced_by_id is not None and (self.grace_until is None or self.grace_until <= now):
            return "rotated"
        return "active"

    def is_valid(self, now: datetime) -> bool:
        """Whether the key authenticates at ``now``."""
        return self.state(now) == "active"

    @property
    def masked(self) -> str:
        """What may be shown of the key: its prefix and last four characters."""
        return f"{self.prefix}...{self.last4}"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Tokens and requests one key used in one month."""

    key_id: str
    month: str
    tokens: int
    requests: int

    @classmethod
    def from_orm(cls, row: UsageMonthly) -> UsageRecord:
        """Snapshot a loaded :class:`~persistence.models.UsageMonthly`."""
        return cls(key_id=row.key_id, month=row.month, tokens=row.tokens, requests=row.requests)


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """A stored ``/v1/responses`` object: the JSON bytes the server encoded, and the columns it is found by."""

    id: str
    key_id: str
    model: str
    status: str
    background: bool
    previous_response_id: str | None
    response: bytes
    input_items: bytes
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_orm(cls, row: StoredResponse) -> ResponseRecord:
        """Snapshot a loaded :class:`~persistence.models.StoredResponse`."""
        return cls(
            id=row.id,
            key_id=row.key_id,
            model=row.model,
            status=row.status,
            background=row.background,
            previous_response_id=row.previous_response_id,
            response=bytes(row.response),
            input_items=bytes(row.input_items),
            cancel_requested=row.cancel_requested,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
