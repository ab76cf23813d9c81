"""The persistence API the server uses: async functions over an ``AsyncSession``.

Reads return frozen records (:class:`RoleRecord`, :class:`KeyRecord`, :class:`UsageRecord`, :class:`ResponseRecord`)
that stay valid after the session closes, so callers may cache them. Unless a function says it commits, the caller
owns the transaction (in a Litestar handler the plugin commits when the response starts). Functions that commit
themselves: :func:`reserve_usage`, :func:`adjust_usage` (each its own short transaction),
:func:`delete_request_logs_before`, :func:`delete_responses_before`, :func:`cache_purge_expired` and
:func:`delete_applied_writes_before` (one transaction per chunk).

Unknown keys or roles raise :class:`LookupError` from mutations (``get_*`` return ``None``); invalid or duplicate
input raises :class:`ValueError`.
"""

from __future__ import annotations

from persistence.keys import (
    LIMIT_FIELDS,
    UNSET,
    create_role,
    get_key,
    get_key_by_digest,
    get_role,
    insert_key,
    list_keys,
    list_roles,
    mark_rotated,
    revoke_key,
    update_role,
)
from persistence.logs import (
    REQUEST_LOG_FIELDS,
    cache_get,
    cache_purge_expired,
    cache_put,
    clean_request_log_row,
    delete_request_logs_before,
    insert_request_logs,
)
from persistence.records import KeyRecord, KeyState, ResponseRecord, RoleRecord, UsageRecord
from persistence.responses import (
    delete_response,
    delete_responses_before,
    get_response,
    insert_response,
    is_cancel_requested,
    request_cancel,
    update_response,
)
from persistence.usage import (
    add_usage,
    adjust_usage,
    delete_applied_writes_before,
    get_usage,
    mark_applied,
    reserve_usage,
    undo_reservation,
)

__all__ = (
    "LIMIT_FIELDS",
    "REQUEST_LOG_FIELDS",
    "UNSET",
    "KeyRecord",
    "KeyState",
    "ResponseRecord",
    "RoleRecord",
    "UsageRecord",
    "add_usage",
    "adjust_usage",
    "cache_get",
    "cache_purge_expired",
    "cache_put",
    "clean_request_log_row",
    "create_role",
    "delete_applied_writes_before",
    "delete_request_logs_before",
    "delete_response",
    "delete_responses_before",
    "get_key",
    "get_key_by_digest",
    "get_response",
    "get_role",
    "get_usage",
    "insert_key",
    "insert_request_logs",
    "insert_response",
    "is_cancel_requested",
    "list_keys",
    "list_roles",
    "mark_applied",
    "mark_rotated",
    "request_cancel",
    "reserve_usage",
    "revoke_key",
    "undo_reservation",
    "update_response",
    "update_role",
)
