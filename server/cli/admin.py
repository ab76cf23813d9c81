"""``llm-server keys|roles|usage|db``: the admin operations against the database, without a running server."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from persistence import migrate, store
from schemas.admin import RoleCreate, RoleIn
from server.admission.gateway import current_month
from server.auth import manage
from server.auth.keys import generate_key, is_well_formed
from server.auth.pepper import load_pepper
from server.records.database import Database, DatabaseUnavailable
from server.settings import Settings

LIMIT_FLAGS = ("rpm", "tpm", "max_concurrency", "monthly_tokens", "monthly_requests", "max_tokens", "max_n")
_LIMIT_HELP = {"max_n": "most choices per request (n x prompts), 1 to 128; 0 = the server's own bound of 128"}


class CommandError(Exception):
    """An expected failure, printed as one line."""


def add_admin_commands(sub: Any) -> None:
    """Register ``keys``, ``roles``, ``usage`` and ``db`` on the top-level subparsers."""
    keys = sub.add_parser("keys", help="create, list, revoke and rotate API keys").add_subparsers(
        dest="action", required=True
    )
    k = keys.add_parser(
        "create",
        help="create a key and print its secret once",
        description="Create a key and print its secret once, or store a key you already hold (--key-env).",
    )
    k.add_argument("--name", required=True)
    k.add_argument("--role", default="default")
    k.add_argument("--expires-in-days", type=int)
    k.add_argument(
        "--key-env",
        metavar="VAR",
        help="store the key held in environment variable VAR (e.g. from `keys generate`) instead of generating "
        "one; the secret is never printed (--json omits the `key` field)",
    )
    k.add_argument(
        "--if-missing",
        action="store_true",
        help="with --key-env: exit 0 without changes when that key already exists (idempotent provisioning)",
    )
    k.add_argument("--json", action="store_true")
    keys.add_parser(
        "generate",
        help="print one fresh key and store nothing",
        description="Print one fresh, well-formed key and store nothing: put it in a secret store or .env, then "
        "register it where it must work with `keys create --name NAME --key-env VAR`.",
    )
    k = keys.add_parser("list", help="list keys (never their secrets)")
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("revoke", help="revoke a key now")
    k.add_argument("id")
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("rotate", help="issue a replacement; the old key works until the grace deadline")
    k.add_argument("id")
    k.add_argument("--grace-hours", type=float, default=24.0)
    k.add_argument("--json", action="store_true")

    roles = sub.add_parser("roles", help="list, create and update roles").add_subparsers(dest="action", required=True)
    r = roles.add_parser("list")
    r.add_argument("--json", action="store_true")
    for action in ("create", "update"):
        r = roles.add_parser(action, help=f"{action} a role; a limit of 0 means unlimited")
        r.add_argument("name")
        for flag in LIMIT_FLAGS:
            r.add_argument(f"--{flag.replace('_', '-')}", type=int, metavar="N", help=_LIMIT_HELP.get(flag))
        r.add_argument("--models", help="comma-separated allowlist; empty for all models")
        r.add_argument("--json", action="store_true")

    u = sub.add_parser("usage", help="tokens and requests per key for a month")
    u.add_argument("--key")
    u.add_argument("--month", help="YYYY-MM (default: this month, UTC)")
    u.add_argument("--json", action="store_true")

    db = sub.add_parser("db", help="database migrations").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply every pending migration")
    d = db.add_parser("downgrade", help="downgrade to a revision (base = empty)")
    d.add_argument("revision")
    db.add_parser("current", help="the applied revision")
    db.add_parser("history", help="all revisions")


def _role_spec(args: argparse.Namespace, create: bool) -> RoleIn:
    fields: dict[str, Any] = {}
    for flag in LIMIT_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            if value < 0:
                raise CommandError(f"--{flag.replace('_', '-')} must be >= 0 (0 = unlimited)")
            fields[flag] = value or None
    if args.models is not None:
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()] or None
    try:
        if create:
            return msgspec.convert({"name": args.name, **fields}, RoleCreate)
        return msgspec.convert(fields, RoleIn)
    except msgspec.ValidationError as exc:  # name the flag, not the JSON path: "--max-n: Expected `int` <= 128"
        text = str(exc)
        detail, _, path = text.partition(" - at `$.")
        field = path.rstrip("`").split("[")[0]
        where = "the role name" if field == "name" else f"--{field.replace('_', '-')}"
        raise CommandError(f"{where}: {detail}" if field else text) from None


def _print(obj: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    if as_json:
        print(msgspec.json.encode(obj).decode())
    else:
        print(human(obj))


def _key_line(k: Any) -> str:
    state = "revoked" if k.revoked_at else ("rotated" if k.replaced_by_id else "active")
    return f"{k.id}  {k.prefix}...{k.last4}  {k.name}  role={k.role}  {state}  expires={k.expires_at or 'never'}"


def _role_line(r: Any) -> str:
    def fmt(v: Any) -> str:
        return "unlimited" if v is None else str(v)

    models = ",".join(r.models) if r.models else "all"
    return (
        f"{r.name}: rpm={fmt(r.rpm)} tpm={fmt(r.tpm)} concurrency={fmt(r.max_concurrency)} "
        f"monthly_tokens={fmt(r.monthly_tokens)} monthly_requests={fmt(r.monthly_requests)} "
        f"max_tokens={fmt(r.max_tokens)} max_n={fmt(r.max_n)} models={models}{' admin' if r.is_admin else ''}"
    )


async def _admin(args: argparse.Namespace, settings: Settings) -> None:
    db = Database(settings.database, timeout_s=max(settings.database_timeout_s, 10.0))
    try:
        if args.command == "db":
            await _db_command(args, settings)
            return
        # A bad --key-env value and a missing pepper fail before any I/O.
        secret = _secret_from_env(args) if args.command == "keys" and args.action == "create" else None
        pepper = load_pepper(settings) if args.command == "keys" else b""
        if settings.auto_migrate:
            await migrate.upgrade(settings.database, default_role=_default_role(settings))
        await _dispatch(args, settings, db, pepper, secret)
    finally:
        await db.close()


def _secret_from_env(args: argparse.Namespace) -> str | None:
    """The well-formed key in ``--key-env``'s variable (``None`` without the flag); never echoes the value."""
    if args.key_env is None:
        if args.if_missing:
            raise CommandError("--if-missing needs --key-env (a generated key never exists yet)")
        return None
    value = os.environ.get(args.key_env, "")
    if not value:
        raise CommandError(f"the environment variable {args.key_env} named by --key-env is not set or empty")
    if not is_well_formed(value):
        hint = (
            "it has leading or trailing whitespace"
            if is_well_formed(value.strip())
            else "expected sk-llm- and 30 base62 characters with a valid checksum, as `llm-server keys generate` prints"
        )
        raise CommandError(
            f"the environment variable {args.key_env} does not hold a well-formed llm-server key: {hint}"
        )
    return value


async def _create_key(args: argparse.Namespace, db: Database, pepper: bytes, secret: str | None) -> None:
    """``keys create``: a fresh key (printed once) or the one from ``--key-env`` (never printed)."""
    if await db.run(lambda s: store.get_role(s, args.role)) is None:
        raise CommandError(f"no role named '{args.role}' (see: llm-server roles list)")
    if secret is None:
        key, fresh = await db.run(
            lambda s: manage.create_key(s, pepper, name=args.name, role=args.role, expires_in_days=args.expires_in_days)
        )
        out = manage.key_out(key, fresh)
        _print(out, args.json, lambda o: f"{o.key}\n(id {o.id}, role {o.role}; shown once, store it now)")
        return
    existing = await db.run(lambda s: manage.find_key(s, pepper, secret))
    if existing is None:
        try:
            key, _ = await db.run(
                lambda s: manage.create_key(
                    s, pepper, name=args.name, role=args.role, expires_in_days=args.expires_in_days, secret=secret
                )
            )
        except ValueError:  # the digest was taken between the lookup and the insert
            existing = await db.run(lambda s: manage.find_key(s, pepper, secret))
            if existing is None:
                raise
        else:
            _print(
                manage.key_out(key),
                args.json,
                lambda o: f"created {_key_line(o)} (the secret from ${args.key_env} is not printed)",
            )
            return
    if not args.if_missing:
        raise CommandError(
            f"the key in ${args.key_env} already exists as {existing.id} (name '{existing.name}'); "
            "--if-missing accepts that"
        )
    _print(manage.key_out(existing), args.json, lambda o: f"exists {_key_line(o)}; nothing changed")


def _default_role(settings: Settings) -> dict[str, int | None]:
    return {
        "rpm": settings.default_role_rpm,
        "tpm": settings.default_role_tpm,
        "max_concurrency": settings.default_role_max_concurrency,
    }


async def _db_command(args: argparse.Namespace, settings: Settings) -> None:
    url = settings.database
    if args.action == "upgrade":
        await migrate.upgrade(url, default_role=_default_role(settings))
        print(f"database at revision {await migrate.current(url)}")
    elif args.action == "downgrade":
        await migrate.downgrade(url, args.revision)
        print(f"database at revision {await migrate.current(url) or 'base'}")
    elif args.action == "current":
        print(await migrate.current(url) or "base (no migrations applied)")
    else:
        for revision, message in await migrate.history(url):
            print(f"{revision}  {message}")


async def _dispatch(
    args: argparse.Namespace, settings: Settings, db: Database, pepper: bytes, secret: str | None
) -> None:
    run: Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]] = db.run
    if args.command == "keys":
        if args.action == "create":
            await _create_key(args, db, pepper, secret)
        elif args.action == "list":
            keys = [manage.key_out(k) for k in await run(store.list_keys)]
            _print(keys, args.json, lambda ks: "\n".join(_key_line(k) for k in ks) or "no keys")
        elif args.action == "revoke":
            from datetime import UTC, datetime

            async def revoke(s: Any) -> Any:
                return await store.revoke_key(s, args.id, datetime.now(UTC))

            _print(manage.key_out(await run(revoke)), args.json, _key_line)
        else:
            new, secret = await run(lambda s: manage.rotate_key(s, pepper, args.id, args.grace_hours))
            out = manage.key_out(new, secret)
            _print(out, args.json, lambda o: f"{o.key}\n(new id {o.id}; the old key works for {args.grace_hours} h)")
    elif args.command == "roles":
        if args.action == "list":
            roles = [manage.role_out(r) for r in await run(store.list_roles)]
            _print(roles, args.json, lambda rs: "\n".join(_role_line(r) for r in rs))
        else:
            spec = _role_spec(args, create=args.action == "create")
            limits = manage.role_limits(spec)
            if args.action == "create":
                role = await run(lambda s: store.create_role(s, args.name, **limits))
            else:
                role = await run(lambda s: store.update_role(s, args.name, **limits))
            _print(manage.role_out(role), args.json, _role_line)
    elif args.command == "usage":
        month = args.month or current_month()
        rows = [manage.usage_out(r) for r in await run(lambda s: store.get_usage(s, args.key, month))]
        _print(
            rows,
            args.json,
            lambda us: (
                "\n".join(f"{u.key_id}  {u.month}  tokens={u.tokens}  requests={u.requests}" for u in us)
                or f"no usage in {month}"
            ),
        )


def run_admin(args: argparse.Namespace, settings: Settings) -> None:
    """Run one admin command; expected failures become :class:`CommandError` (one line, exit 1)."""
    if args.command == "keys" and args.action == "generate":  # needs no database, pepper or settings
        print(generate_key())
        return
    try:
        asyncio.run(_admin(args, settings))
    except DatabaseUnavailable as exc:
        raise CommandError(f"the database at {_safe_url(settings.database)} is unreachable: {exc}") from None
    except (LookupError, ValueError, msgspec.ValidationError) as exc:
        raise CommandError(str(exc).strip("'\"")) from None
    except OSError as exc:
        raise CommandError(f"the database at {_safe_url(settings.database)} is unreachable: {exc}") from None


def _safe_url(url: str) -> str:
    """The URL without its password."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, creds = head.partition("://")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}" if ":" in creds else url
