"""Static API keys (``--api-key`` / ``API_KEYS``): admin keys for a single-user setup, with no database row.

A static key is compared with what a client presents in constant time and stands for an admin-role principal
whose id is derived from the key (``static-`` + 12 hex digits of its SHA-256), so the request log and the
completion cache can name it without ever holding the secret. It has no row in ``api_keys``: usage, whose rows
reference that table, is not recorded for it (see :func:`is_static_key_id`).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

from persistence.store import RoleRecord
from server.auth.principal import Principal
from server.settings import Settings, SettingsError

MIN_LENGTH = 16
"""Shortest static key accepted at start-up, so nobody serves behind ``abc``."""
ID_PREFIX = "static-"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ADMIN_ROLE = RoleRecord(
    name="admin",
    rpm=None,
    tpm=None,
    max_concurrency=None,
    monthly_tokens=None,
    monthly_requests=None,
    max_tokens=None,
    max_n=None,
    allowed_models=None,
    is_admin=True,
    created_at=_EPOCH,
    updated_at=_EPOCH,
)
"""The rights of the ``admin`` role as the migrations seed it: no limits, every model, the ``/admin`` routes."""


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def static_key_id(key: str) -> str:
    """The key's public id: stable across restarts, never the key itself."""
    return ID_PREFIX + _sha256(key).hex()[:12]


def is_static_key_id(key_id: str) -> bool:
    """Whether ``key_id`` names a static key (database key ids start with ``key_``)."""
    return key_id.startswith(ID_PREFIX)


class StaticKeys:
    """The configured static keys; :meth:`match` finds the principal of a presented key.

    Args:
        keys: The keys themselves (each at least :data:`MIN_LENGTH` characters).
    """

    def __init__(self, keys: list[str]) -> None:
        # Only digests are kept: comparing fixed-length digests keeps the comparison's time independent of the
        # keys' lengths and contents.
        self._keys = [(_sha256(k), Principal(static_key_id(k), "static", ADMIN_ROLE)) for k in dict.fromkeys(keys)]

    @classmethod
    def from_settings(cls, settings: Settings) -> StaticKeys:
        """The keys of ``settings.api_keys`` (comma-separated).

        Raises:
            SettingsError: a key is shorter than :data:`MIN_LENGTH` characters (the message never shows it).
        """
        keys = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
        for number, key in enumerate(keys, 1):
            if len(key) < MIN_LENGTH:
                raise SettingsError(
                    f"invalid LLM_SERVER_API_KEYS / --api-key: static key {number} of {len(keys)} has {len(key)} "
                    f"characters; use at least {MIN_LENGTH} (e.g. from `llm-server keys generate`)"
                )
        return cls(keys)

    @property
    def ids(self) -> list[str]:
        """The keys' public ids, in the order given."""
        return [principal.key_id for _, principal in self._keys]

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, presented: str | None) -> Principal | None:
        """The principal of ``presented`` if it is one of the keys, else ``None`` (no I/O, constant time)."""
        if not presented or not self._keys:
            return None
        candidate = _sha256(presented)
        found = None
        for digest, principal in self._keys:  # every key is compared: the time says nothing about which matched
            if hmac.compare_digest(candidate, digest):
                found = principal
        return found
