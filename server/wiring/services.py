"""The gateway's collaborators, built once per app from settings and handed to handlers by dependency."""

from __future__ import annotations

from dataclasses import dataclass

from persistence import store, usage
from persistence.store import KeyRecord, RoleRecord
from server.admission.gateway import Gateway
from server.admission.leases import QuotaLeases
from server.admission.ledger import LocalLedger
from server.admission.ratelimit import RateLimiter
from server.admission.sequences import SequenceBudget
from server.admission.throttle import AuthThrottle
from server.auth.pepper import load_pepper
from server.auth.principal import Authenticator
from server.auth.static import StaticKeys, is_static_key_id
from server.exchange.cache import CompletionCache
from server.metrics import Metrics
from server.records.database import Database, DatabaseUnavailable, connection_was_dead
from server.records.units import new_write_id
from server.records.writer import BatchWriter
from server.settings import Settings


@dataclass(slots=True)
class Services:
    """Everything a ``/v1`` or ``/admin`` handler needs besides the engine."""

    settings: Settings
    db: Database
    pepper: bytes
    auth: Authenticator
    limiter: RateLimiter
    gateway: Gateway
    cache: CompletionCache | None
    writer: BatchWriter
    metrics: Metrics
    throttle: AuthThrottle | None = None
    """Brute-force limit on failed key checks per client address (``None``: unlimited)."""


def build_services(settings: Settings, metrics: Metrics, *, ratelimit_key_prefix: str = "LIMITS") -> Services:
    """Wire the gateway from settings (nothing connects yet; the app's lifespan starts what runs).

    Raises:
        SettingsError: a static API key is too short.
    """
    static = StaticKeys.from_settings(settings)
    db = Database(settings.database, timeout_s=settings.database_timeout_s)
    pepper = load_pepper(settings)

    async def lookup(digest: str) -> tuple[KeyRecord, RoleRecord] | None:
        try:
            return await db.run(lambda s: store.get_key_by_digest(s, digest))
        except DatabaseUnavailable as exc:
            raise ConnectionError(str(exc)) from exc

    writer = BatchWriter(
        db,
        retention_days=settings.request_log_retention_days,
        responses_retention_days=settings.responses_retention_days,
    )

    async def reserve(
        key_id: str, month: str, tokens: int, requests: int, max_tokens: int | None, max_requests: int | None
    ) -> bool:
        """PostgreSQL (SQLite deployments reserve in the in-memory ledger), for one request or a lease of several
        (``server.admission.leases``): one autocommit statement, on asyncpg
        itself (SQLAlchemy's layers were most of its cost), that also records write_id when it reserves. If the
        answer is lost (a timeout, a dropped connection, the request cancelled meanwhile), it may still have
        committed: the writer then gives it back if, and only if, it did (the client was refused, so the
        reservation must not stand). The connection is not pinged first (a round trip per request): one found dead
        is retried once, on a new one, with a new write_id (the first one's undo settles whether it had landed)."""
        if usage.never_fits(tokens, max_tokens, max_requests, requests):
            return False
        statement = usage.pg_reservation(max_tokens, max_requests)

        async def once(write_id: str) -> bool:
            try:
                args = statement.args(key_id, month, tokens, write_id, max_tokens, max_requests, requests)
                return bool(await db.fetch_value(statement.sql, args) == 1)
            except BaseException:
                writer.add_undo(write_id, key_id, month, tokens, requests)
                raise

        try:
            return await once(new_write_id("r"))
        except DatabaseUnavailable as exc:
            if not connection_was_dead(exc):
                raise
        return await once(new_write_id("r"))

    limiter = RateLimiter(settings.ratelimit_storage_uri, key_prefix=ratelimit_key_prefix)
    sequences = SequenceBudget(settings.sequences_per_key)
    # One process owns a SQLite file: keep exact quota counters in memory, persisted in batches. Replicas on
    # PostgreSQL reserve in the database, a few requests ahead for busy keys.
    quota: LocalLedger | QuotaLeases
    if settings.database.startswith("sqlite"):
        quota = LocalLedger(writer)
    else:
        quota = QuotaLeases(reserve, writer.add_usage, ahead=settings.quota_lease_requests)
        writer.before_flush = quota.give_back
    record_usage = quota.settle

    def settle(key_id: str, month: str, tokens: int, requests: int) -> None:
        # A static key has no api_keys row, which usage rows reference: its usage is not recorded (its role has no
        # quota to reserve against either), so the writer never holds a usage unit the database must reject.
        if not is_static_key_id(key_id):
            record_usage(key_id, month, tokens, requests)

    gateway = Gateway(
        limiter,
        quota.reserve,
        settle,
        metrics,
        fail_open=settings.ratelimit_fail_open,
        sequences=sequences,
    )
    auth = Authenticator(
        lookup, pepper, ttl_s=settings.key_cache_ttl_s, timeout_s=settings.database_timeout_s, static=static
    )
    cache = CompletionCache(db, ttl_s=settings.cache_ttl_s, queued=writer.cached) if settings.cache_enabled else None
    per_minute = settings.auth_failures_per_minute
    throttle = AuthThrottle(limiter, per_minute, metrics) if per_minute is not None else None
    return Services(settings, db, pepper, auth, limiter, gateway, cache, writer, metrics, throttle)
