"""``/admin``: keys, roles and usage over HTTP for keys whose role is ``admin`` (the CLI's operations)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Router, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody

from persistence import store
from persistence.keys import AlreadyRotated
from schemas.admin import KeyCreate, KeyList, KeyOut, KeyRotate, RoleCreate, RoleIn, RoleList, RoleOut, UsageList
from server.admission.gateway import current_month
from server.api.apidoc import KEY_SECURITY, KEYED, WITH_BODY, ApiOperation, errors
from server.api.common import BODY_TYPE
from server.api.guards import Hook, guarded, require_admin
from server.auth import manage
from server.errors import OpenAIError, invalid_request
from server.wiring.services import Services


def not_found(what: str, param: str) -> OpenAIError:
    return OpenAIError(404, "invalid_request_error", f"No such {what}.", param=param, code="not_found")


async def _run(services: Services, fn: Any, *, missing: tuple[str, str] | None = None) -> Any:
    try:
        return await services.db.run(fn)
    except LookupError as exc:
        if missing is None:
            raise
        raise not_found(*missing) from exc
    except AlreadyRotated as exc:  # a state conflict, reported like the other refused changes (400, not 409)
        raise invalid_request(f"{exc}.", "key_id", "key_already_rotated") from exc
    except ValueError as exc:
        raise invalid_request(str(exc), None) from exc


@get("/keys", responses=errors(*KEYED), operation_class=ApiOperation)
async def list_keys(services: NamedDependency[Services]) -> KeyList:
    """Every key (never a secret)."""
    keys = await _run(services, store.list_keys)
    return KeyList(data=[manage.key_out(k) for k in keys])


@post("/keys", status_code=201, opt={BODY_TYPE: KeyCreate}, responses=errors(*WITH_BODY), operation_class=ApiOperation)
async def create_key(data: JSONBody[KeyCreate], services: NamedDependency[Services]) -> KeyOut:
    """Create a key; the response is the only place its secret appears."""

    async def go(session: Any) -> Any:
        if await store.get_role(session, data.role) is None:
            raise invalid_request(f"No role named '{data.role}'.", "role")
        return await manage.create_key(
            session, services.pepper, name=data.name, role=data.role, expires_in_days=data.expires_in_days
        )

    key, secret = await _run(services, go)
    return manage.key_out(key, secret)


@post("/keys/{key_id:str}/revoke", status_code=200, responses=errors(*KEYED, 400, 404), operation_class=ApiOperation)
async def revoke_key(key_id: FromPath[str], services: NamedDependency[Services]) -> KeyOut:
    """Revoke now (this replica at once; others within KEY_CACHE_TTL_S)."""

    async def go(session: Any) -> Any:
        return await store.revoke_key(session, key_id, datetime.now(UTC))

    key = await _run(services, go, missing=("key", "key_id"))
    services.auth.forget(key_id)
    return manage.key_out(key)


@post(
    "/keys/{key_id:str}/rotate",
    status_code=201,
    opt={BODY_TYPE: KeyRotate},
    responses=errors(*WITH_BODY, 404),
    operation_class=ApiOperation,
)
async def rotate_key(key_id: FromPath[str], data: JSONBody[KeyRotate], services: NamedDependency[Services]) -> KeyOut:
    """A new key; the old one keeps working until its grace deadline (a key is rotated once: 400 again)."""
    new, secret = await _run(
        services, lambda s: manage.rotate_key(s, services.pepper, key_id, data.grace_hours), missing=("key", "key_id")
    )
    services.auth.forget(key_id)
    return manage.key_out(new, secret)


@get("/roles", responses=errors(*KEYED), operation_class=ApiOperation)
async def list_roles(services: NamedDependency[Services]) -> RoleList:
    """Every role and its limits."""
    roles = await _run(services, store.list_roles)
    return RoleList(data=[manage.role_out(r) for r in roles])


@post(
    "/roles", status_code=201, opt={BODY_TYPE: RoleCreate}, responses=errors(*WITH_BODY), operation_class=ApiOperation
)
async def create_role(data: JSONBody[RoleCreate], services: NamedDependency[Services]) -> RoleOut:
    """Create a role (omitted limits are unlimited)."""
    role = await _run(services, lambda s: store.create_role(s, data.name, **manage.role_limits(data)))
    return manage.role_out(role)


@patch("/roles/{name:str}", opt={BODY_TYPE: RoleIn}, responses=errors(*WITH_BODY, 404), operation_class=ApiOperation)
async def update_role(name: FromPath[str], data: JSONBody[RoleIn], services: NamedDependency[Services]) -> RoleOut:
    """Change the given limits (``null`` = unlimited); applies to cached keys at once on this replica."""
    role = await _run(
        services, lambda s: store.update_role(s, name, **manage.role_limits(data)), missing=("role", "name")
    )
    services.auth.forget()
    return manage.role_out(role)


@get("/usage", responses=errors(*KEYED, 400), operation_class=ApiOperation)
async def usage(
    services: NamedDependency[Services], key: FromQuery[str | None] = None, month: FromQuery[str | None] = None
) -> UsageList:
    """Usage per key for a month (``YYYY-MM``, default the current one)."""
    month = month or current_month()
    if len(month) != 7 or month[4] != "-" or not (month[:4] + month[5:]).isdigit():
        raise invalid_request("'month' must look like YYYY-MM.", "month")
    await services.writer.flush(everything=True)  # this replica's quota leases back: its usage counted exactly
    rows = await _run(services, lambda s: store.get_usage(s, key, month))
    return UsageList(data=[manage.usage_out(r) for r in rows])


def admin_handlers(before_request: Hook) -> list[Router]:
    """The ``/admin`` router (admin role required, then the app's ``before_request``)."""
    return [
        Router(
            path="/admin",
            before_request=guarded(require_admin, before_request),
            route_handlers=[list_keys, create_key, revoke_key, rotate_key, list_roles, create_role, update_role, usage],
            tags=["admin"],
            security=KEY_SECURITY,
        )
    ]
