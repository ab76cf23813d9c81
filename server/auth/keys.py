"""API key format: recognisable, checksummed, at least 128 random bits, stored only as an HMAC digest.

A key looks like ``sk-llm-<24 base62 chars: 142 random bits><6 base62 chars: CRC-32 of the body>``. The
checksum lets the server reject a mistyped or made-up key without a database round trip; the digest
(HMAC-SHA-256 under ``KEY_PEPPER``) is all that is ever stored.
"""

from __future__ import annotations

import hmac
import re
import secrets
import string
import zlib

KEY_PREFIX = "sk-llm-"
_ALPHABET = string.digits + string.ascii_letters
_BODY_LEN = 24
_CHECK_LEN = 6
_KEY_RE = re.compile(rf"^{re.escape(KEY_PREFIX)}[0-9A-Za-z]{{{_BODY_LEN + _CHECK_LEN}}}$")
DISPLAY_PREFIX_LEN = len(KEY_PREFIX) + 4


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECK_LEN)


def generate_key() -> str:
    """A new random key (142 bits of entropy from :mod:`secrets`)."""
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_LEN))
    return f"{KEY_PREFIX}{body}{_checksum(body)}"


def is_well_formed(key: str) -> bool:
    """Prefix, length, alphabet and checksum are right (no database needed)."""
    if not _KEY_RE.match(key):
        return False
    body = key[len(KEY_PREFIX) : len(KEY_PREFIX) + _BODY_LEN]
    return hmac.compare_digest(_checksum(body), key[-_CHECK_LEN:])


def digest(key: str, pepper: bytes) -> str:
    """Hex HMAC-SHA-256 of ``key`` under ``pepper``: the only form a key is stored in."""
    return hmac.digest(pepper, key.encode("utf-8"), "sha256").hex()


def display_parts(key: str) -> tuple[str, str]:
    """``(prefix, last4)`` shown in listings and error messages."""
    return key[:DISPLAY_PREFIX_LEN], key[-4:]


def redact(key: str) -> str:
    """What an error message may show of a presented key: at most its prefix and last 4 characters."""
    if is_well_formed(key):
        prefix, last4 = display_parts(key)
        return f"{prefix}...{last4}"
    if len(key) >= 12:
        return f"{key[:3]}...{key[-4:]}"
    return "***"
