"""Static API keys on their own: parsing ``API_KEYS``, matching a presented key, the public id, the length floor."""

from __future__ import annotations

import hashlib

import pytest

from server.auth.static import ADMIN_ROLE, MIN_LENGTH, StaticKeys, is_static_key_id, static_key_id
from server.settings import Settings, SettingsError

A = "a-static-key-0123456789"
B = "b-static-key-0123456789"


def test_keys_are_split_trimmed_and_deduplicated() -> None:
    keys = StaticKeys.from_settings(Settings(api_keys=f" {A} ,,{B},{A}"))
    assert keys.ids == [static_key_id(A), static_key_id(B)]
    assert len(StaticKeys.from_settings(Settings())) == 0


def test_a_presented_key_matches_exactly() -> None:
    keys = StaticKeys([A, B])
    principal = keys.match(B)
    assert principal is not None and principal.key_id == static_key_id(B) and principal.role is ADMIN_ROLE
    for other in (None, "", A[:-1], A + " ", A.upper(), "\udcff" * 20):
        assert keys.match(other) is None
    assert StaticKeys([]).match(A) is None


def test_the_id_is_stable_public_and_not_a_database_id() -> None:
    key_id = static_key_id(A)
    assert key_id == "static-" + hashlib.sha256(A.encode()).hexdigest()[:12]
    assert A not in key_id and len(key_id) <= 32  # request_logs.key_id is VARCHAR(32)
    assert is_static_key_id(key_id) and not is_static_key_id("key_0123456789abcdef")


def test_the_admin_role_has_no_limits() -> None:
    role = ADMIN_ROLE
    assert role.is_admin and role.allowed_models is None
    limits = (role.rpm, role.tpm, role.max_concurrency, role.monthly_tokens, role.monthly_requests, role.max_tokens)
    assert limits == (None,) * 6 and role.max_n is None


@pytest.mark.parametrize("length", [1, MIN_LENGTH - 1])
def test_a_short_key_is_refused_without_showing_it(length: int) -> None:
    key = "s" * (length - 1) + "!"
    with pytest.raises(SettingsError, match=f"at least {MIN_LENGTH}") as exc:
        StaticKeys.from_settings(Settings(api_keys=f"{A},{key}"))
    assert key not in str(exc.value) and "static key 2 of 2" in str(exc.value)
    assert len(StaticKeys.from_settings(Settings(api_keys="s" * MIN_LENGTH))) == 1
