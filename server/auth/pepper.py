"""The key pepper: explicit (``KEY_PEPPER``) or generated once into ``DATA_DIR/key_pepper`` for SQLite."""

from __future__ import annotations

import os
import secrets

from persistence.private import private_dir, warn_if_shared
from server.settings import Settings, SettingsError


def load_pepper(settings: Settings) -> bytes:
    """Return the pepper bytes, generating the file on first use when that is allowed.

    Raises:
        SettingsError: PostgreSQL without an explicit ``KEY_PEPPER`` (replicas must share one), or a pepper
            that is too short.
    """
    if settings.key_pepper:
        if len(settings.key_pepper) < 16:
            raise SettingsError("invalid LLM_SERVER_KEY_PEPPER: use at least 16 characters (32 random bytes advised)")
        return settings.key_pepper.encode("utf-8")
    if not settings.database.startswith("sqlite"):
        raise SettingsError(
            "LLM_SERVER_KEY_PEPPER must be set explicitly with a non-SQLite DATABASE_URL "
            "(every replica must hash keys with the same secret)"
        )
    path = private_dir(settings.data_dir, "DATA_DIR") / "key_pepper"
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    else:
        warn_if_shared(path, "the key pepper file")
    pepper = path.read_text(encoding="utf-8").strip()
    if not pepper:
        raise SettingsError(f"the key pepper file {path} is empty; delete it only if no keys exist yet")
    return pepper.encode("utf-8")
