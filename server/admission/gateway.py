"""Admission, all or nothing, before any engine work.

Order (the first limit that fails decides the error), cheapest first so that a refused request costs next to
nothing: before any work on the prompt, the role's model allowlist (403), RPM (429 ``requests``, tested by
:meth:`Gateway.precheck`; on Redis answered from what this replica learnt, see there) and the role's caps on max
tokens and ``n`` (400); then, once the prompt is tokenized, :meth:`Gateway.admit`: RPM and TPM (429 ``requests`` /
``tokens``), the key's sequences in flight (429
``requests``, see :mod:`server.admission.sequences`), per-key concurrency (429 ``requests``), monthly token and
request quotas (429 ``insufficient_quota``). Short windows are only *tested* first; the sequences, the
concurrency slot and the quota reservation (in memory for SQLite; in PostgreSQL a conditional UPDATE, a few
requests ahead for a busy key: :mod:`server.admission.leases`) are taken next, and only then
are the RPM and TPM windows hit — so a request refused at any step consumes nothing at the steps before it. On a
single Redis server the tests, the slot and the hits are one script (one round trip, all or nothing) before the
quota; a request the quota then refuses has its hits and its slot taken back (one more round trip, on that refusal
only), so it consumes nothing there either.

Tokens: the quota reserves prompt + max tokens and is reconciled to the actual count when the request ends
(success, error, disconnect or cache hit). TPM counts prompt + max tokens at admission, as OpenAI's limiter
counts ``max_tokens``; when the client sets no max tokens, TPM counts prompt + ``min(remaining context,
TPM_ESTIMATE)`` and tokens generated beyond that are added when the request ends, all of them, even past the limit
(the window then shows 0 remaining and refuses until they slide out). A request admitted while the rate-limit
storage was unreachable (fail-open) has all its tokens added when it ends, if the storage answers by then.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from server.admission.ratelimit import (
    ADMITTED,
    NO_REQUESTS,
    NO_SLOT,
    NO_TOKENS,
    RateLimiter,
    StorageUnavailable,
    Window,
    duration,
)
from server.admission.sequences import SequenceBudget
from server.auth.principal import Principal
from server.errors import OpenAIError, invalid_request
from server.metrics import Metrics

log = logging.getLogger("server.admission")

TPM_ESTIMATE = 256
OPEN_LOG_INTERVAL_S = 60.0
"""Fail-open admissions are logged as one warning with a count at most this often."""
REMEMBERED_FULL_KEYS = 100_000
"""At most this many keys with a full requests window are remembered for :meth:`Gateway.precheck`."""

ReserveFn = Callable[[str, str, int, int | None, int | None], Awaitable[bool]]


def current_month(now: float | None = None) -> str:
    """``YYYY-MM`` in UTC (remembered until the month ends: every admission asks)."""
    global _month_seen
    at = time.time() if now is None else now
    start, end, month = _month_seen
    if start <= at < end:
        return month
    day = datetime.fromtimestamp(at, UTC)
    first = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (
        first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
    )
    month = first.strftime("%Y-%m")
    _month_seen = (first.timestamp(), following.timestamp(), month)
    return month


_month_seen: tuple[float, float, str] = (0.0, 0.0, "")
"""The month :func:`current_month` answered last: its first and following month's first second, and its name."""


@dataclass(slots=True)
class Ticket:
    """What admission granted; :meth:`Gateway.finish` gives back what was not used."""

    principal: Principal
    month: str
    reserved_tokens: int
    tpm_counted: int
    quota_reserved: bool
    slot: bool
    sequences: int = 0
    """Sequences taken from the key's budget (given back by :meth:`Gateway.finish`)."""
    headers: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    tpm_hit: bool = False
    """``tpm_counted`` was added to the TPM window at admission."""


def rate_headers(requests: Window | None, tokens: Window | None) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers for the windows that apply."""
    headers: dict[str, str] = {}
    for kind, w in (("requests", requests), ("tokens", tokens)):
        if w is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(w.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(w.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(w.reset_s)
    return headers


class Gateway:
    """Admits requests and settles them afterwards.

    Args:
        limiter: RPM / TPM / concurrency storage.
        reserve: ``(key_id, month, tokens, max_tokens_per_month, max_requests_per_month) -> admitted`` — the
            database's atomic conditional update.
        settle: Called with ``(key_id, month, token_delta, request_delta)`` to record usage off the hot path.
        metrics: Where rate-limit and quota refusals are counted.
        fail_open: Admit when the rate-limit storage is unreachable (quotas still fail closed).
        sequences: Per-key bound on sequences in flight on this replica (``None``: unbounded).
    """

    def __init__(
        self,
        limiter: RateLimiter,
        reserve: ReserveFn,
        settle: Callable[[str, str, int, int], None],
        metrics: Metrics,
        *,
        fail_open: bool,
        sequences: SequenceBudget | None = None,
    ) -> None:
        self.limiter = limiter
        self.sequences = sequences
        self._reserve = reserve
        self._settle = settle
        self._metrics = metrics
        self._fail_open = fail_open
        self._open_admits = 0  # admitted without limits since the last warning
        self._open_logged_at = -OPEN_LOG_INTERVAL_S
        # Keys whose requests window was found full, and when (monotonic) it frees a place: on a shared storage
        # :meth:`precheck` answers from here instead of a round trip per request.
        self._requests_full: dict[tuple[str, int], float] = {}  # by key id and limit (a changed limit: new window)

    # -- checks that need no storage ----------------------------------------------------------------------
    @staticmethod
    def check_model(principal: Principal, model: str) -> None:
        """403 ``model_not_allowed`` when the role's allowlist excludes ``model``."""
        allowed = principal.role.allowed_models
        if allowed is not None and model not in allowed:
            raise OpenAIError(
                403,
                "permission_error",
                f"Your key's role '{principal.role.name}' may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )

    @staticmethod
    def max_tokens_cap(principal: Principal, requested: int | None, param: str) -> int | None:
        """The role's cap; 400 when the request asks for more."""
        cap = principal.role.max_tokens
        if cap is not None and requested is not None and requested > cap:
            raise invalid_request(
                f"'{param}' is {requested}, above your role's limit of {cap} tokens per request.", param
            )
        return cap

    @staticmethod
    def check_n(principal: Principal, choices: int, param: str = "n") -> None:
        """400 naming ``param`` when a request's choices (``n`` times its prompts) exceed the role's ``max_n``.

        A role without ``max_n`` is bounded only by the server's own limit on choices per request.
        """
        limit = principal.role.max_n
        if limit is not None and choices > limit:
            raise invalid_request(
                f"This request asks for {choices} choices ('{param}' times the number of prompts), above your "
                f"role's limit of {limit} per request.",
                param,
            )

    def check_sequences(self, choices: int, param: str = "n") -> None:
        """400 when one request asks for more sequences than a key may ever have in flight (it could never run)."""
        budget = self.sequences
        if budget is not None and choices > budget.limit:
            raise invalid_request(
                f"This request asks for {choices} sequences (prompts x n), above this server's limit of "
                f"{budget.limit} sequences in flight per key.",
                param,
            )

    # -- admission ----------------------------------------------------------------------------------------
    async def precheck(self, principal: Principal) -> None:
        """429 when the key's requests-per-minute window is full: before any work on the prompt.

        Consumes nothing; :meth:`admit` tests and hits the window once the request is known to be valid. In this
        process (memory storage) the window itself is tested. On a shared storage (Redis) a round trip per request
        would cost more than the check saves, so this answers from what this replica last learnt: a key found over
        its window (here, by :meth:`admit` or by a hit) is refused until the window's oldest entry leaves it, which
        is exact (no place frees earlier); a key over its window that this replica has not refused yet is refused
        by :meth:`admit`, after its prompt was prepared.
        """
        rpm = principal.role.rpm
        if rpm is None:
            return
        if self.limiter.remote:
            full_until = self._requests_full.get((principal.key_id, rpm))
            if full_until is not None:
                wait_s = full_until - time.monotonic()
                if wait_s > 0:
                    raise self._requests_refused(principal, rpm, wait_s)
                del self._requests_full[principal.key_id, rpm]
            return
        try:
            if not await self.limiter.test("requests", principal.key_id, rpm, 1):
                raise await self._rate_limited(principal, "requests", rpm, 1)
        except StorageUnavailable as exc:
            self._storage_down(exc)

    def _requests_refused(self, principal: Principal, rpm: int, wait_s: float) -> OpenAIError:
        """429 for a key whose requests window is known to be full for ``wait_s`` more seconds (no storage call)."""
        self._metrics.rate_limited_total.labels(principal.role.name, "requests").inc()
        reset = duration(wait_s)
        headers = {
            "retry-after": str(max(1, math.ceil(wait_s))),
            "retry-after-ms": str(math.ceil(wait_s * 1000)),
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": reset,
        }
        msg = f"Rate limit reached for requests per minute: limit {rpm}, used {rpm}, requested 1."
        return OpenAIError(
            429, "requests", f"{msg} Please try again in {reset}.", code="rate_limit_exceeded", headers=headers
        )

    async def count_request(self, principal: Principal) -> None:
        """Count one request in the key's requests-per-minute window (429 when it is full) for a route that runs no
        model and reads no tokens (a stored response's retrieval, deletion, input items or cancellation): every
        call of a key costs it a request, as on OpenAI, so reading stored state is bounded like the rest."""
        rpm = principal.role.rpm
        if rpm is None:
            return
        try:
            refused, _, _ = await self.limiter.hit_windows(principal.key_id, rpm, None, 0)
        except StorageUnavailable as exc:
            self._storage_down(exc)
            return
        if refused is not None:
            raise await self._rate_limited(principal, "requests", rpm, 1)

    async def admit(
        self,
        principal: Principal,
        *,
        prompt_tokens: int,
        max_new_tokens: int,
        explicit_max: bool,
        tpm_prompt_tokens: int | None = None,
        sequences: int = 1,
        rpm_tested: bool = False,
    ) -> Ticket:
        """Run the stateful checks in order; raise the first refusal, consuming nothing.

        ``prompt_tokens`` is reserved against the monthly quota; TPM counts ``tpm_prompt_tokens`` instead when given
        (a remote model's prompt is reserved at an upper bound but counted at its estimate). ``sequences`` is what
        the request asks the engine to generate (``n`` per prompt), counted against the key's in-flight bound.
        ``rpm_tested``: :meth:`precheck` ran a moment ago (in this process it tested the requests window, which is
        then not tested again here; it is hit at the end either way).
        """
        role, key_id = principal.role, principal.key_id
        reserved = prompt_tokens + max_new_tokens
        counted = prompt_tokens if tpm_prompt_tokens is None else tpm_prompt_tokens
        tpm_cost = counted + max_new_tokens if explicit_max else counted + min(max_new_tokens, TPM_ESTIMATE)
        ticket = Ticket(principal, current_month(), reserved, tpm_cost, quota_reserved=False, slot=False)
        limiter_ok = True
        slots = role.max_concurrency
        status = ADMITTED
        hit_at: float | None = None  # when the windows were hit with the tests (one step on Redis; see below)
        try:
            # On a shared storage the precheck did not test the window: it is tested with the rest, at no cost.
            rpm = None if rpm_tested and not self.limiter.remote else role.rpm
            if rpm is not None or role.tpm is not None or slots is not None:
                # The slot only if the sequences fit too (taken below), so a request refused for its sequences
                # takes no slot; tested and taken in one step (one round trip on Redis).
                fits = self.sequences is None or self.sequences.held(key_id) + sequences <= self.sequences.limit
                if fits and self.limiter.admits_in_one_step:
                    # On one Redis server the windows are hit in the same round trip as the tests and the slot;
                    # should the quota refuse below, the hits are taken back (_undo_hits).
                    status, requests, tokens, stamp = await self.limiter.admit_windows(
                        key_id, rpm, role.tpm, tpm_cost, slots
                    )
                    if status == ADMITTED:
                        hit_at = stamp
                        self._hit(ticket, requests, tokens)
                else:
                    status = await self.limiter.test_tokens_take_slot(
                        key_id, role.tpm, tpm_cost, slots if fits else None, rpm=rpm
                    )
                ticket.slot = status == ADMITTED and fits and slots is not None
        except StorageUnavailable as exc:
            limiter_ok = False
            self._storage_down(exc)
        if status == NO_REQUESTS:
            assert role.rpm is not None
            raise await self._rate_limited(principal, "requests", role.rpm, 1)
        if status == NO_TOKENS:
            assert role.tpm is not None
            raise await self._rate_limited(principal, "tokens", role.tpm, tpm_cost)
        try:
            self._take_sequences(ticket, sequences)
            if status == NO_SLOT:
                self._no_slot(role.name, slots)
            await self._reserve_quota(ticket)
            if limiter_ok and hit_at is None:
                await self._hit_windows(ticket)
        except BaseException:
            if hit_at is not None:
                await self._undo_hits(ticket, hit_at)
            await self.finish(ticket, used_tokens=0, count_request=False)
            raise
        return ticket

    def _hit(self, ticket: Ticket, requests: Window | None, tokens: Window | None) -> None:
        """Note the windows hit for ``ticket`` (its headers; a full requests window remembered, see precheck)."""
        role, principal = ticket.principal.role, ticket.principal
        ticket.tpm_hit = role.tpm is not None
        ticket.headers = rate_headers(requests, tokens)
        if requests is not None and requests.remaining == 0 and self.limiter.remote:
            self._remember_full(principal.key_id, requests.limit, requests.reset_s)  # it took the last place

    async def _undo_hits(self, ticket: Ticket, stamp: float) -> None:
        """Take back the window hits (and the slot) of a request that a step after them refused."""
        role, key_id = ticket.principal.role, ticket.principal.key_id
        try:
            await self.limiter.undo_admit(key_id, role.rpm, role.tpm, ticket.tpm_counted, ticket.slot, stamp)
            ticket.slot = False
        except StorageUnavailable as exc:  # the hits stand (they slide out); the slot is tried again by finish
            log.warning("could not take back a refused request's rate-limit hits: %s", exc)
        self._requests_full.pop((key_id, role.rpm or 0), None)

    def _no_slot(self, role_name: str, limit: int | None) -> None:
        """429: every concurrency slot of the key is taken."""
        self._metrics.rate_limited_total.labels(role_name, "concurrency").inc()
        raise OpenAIError(
            429,
            "requests",
            f"Too many concurrent requests for this key (limit {limit}); retry when one finishes.",
            code="rate_limit_exceeded",
            headers={"retry-after": "1", "retry-after-ms": "1000"},
        )

    def _take_sequences(self, ticket: Ticket, sequences: int) -> None:
        budget = self.sequences
        if budget is None:
            return
        principal = ticket.principal
        if not budget.take(principal.key_id, sequences):
            self._metrics.rate_limited_total.labels(principal.role.name, "sequences").inc()
            raise OpenAIError(
                429,
                "requests",
                f"Too many sequences in flight for this key: {budget.held(principal.key_id)} running or queued, "
                f"this request asks for {sequences} (n counts each), limit {budget.limit}; retry when some finish.",
                code="rate_limit_exceeded",
                headers={"retry-after": "1", "retry-after-ms": "1000"},
            )
        ticket.sequences = sequences

    async def _reserve_quota(self, ticket: Ticket) -> None:
        role = ticket.principal.role
        if role.monthly_tokens is None and role.monthly_requests is None:
            return
        ok = await self._reserve(
            ticket.principal.key_id, ticket.month, ticket.reserved_tokens, role.monthly_tokens, role.monthly_requests
        )
        if not ok:
            self._metrics.quota_exceeded_total.labels(role.name).inc()
            raise OpenAIError(
                429,
                "insufficient_quota",
                "You exceeded your monthly quota for this key; it resets at the start of next month (UTC).",
                code="insufficient_quota",
                headers={"x-should-retry": "false"},
            )
        ticket.quota_reserved = True

    async def _hit_windows(self, ticket: Ticket) -> None:
        role, principal = ticket.principal.role, ticket.principal
        try:
            # Tested a moment ago; a hit fails only if a concurrent request won the race for the last room. The
            # windows read after the hits give the headers (all of it one round trip on Redis).
            refused, requests, tokens = await self.limiter.hit_windows(
                principal.key_id, role.rpm, role.tpm, ticket.tpm_counted
            )
            if refused == "requests" and role.rpm is not None:
                raise await self._rate_limited(principal, "requests", role.rpm, 1)
            if refused == "tokens" and role.tpm is not None:
                raise await self._rate_limited(principal, "tokens", role.tpm, ticket.tpm_counted)
            self._hit(ticket, requests, tokens)
        except StorageUnavailable as exc:
            self._storage_down(exc)

    def _storage_down(self, exc: StorageUnavailable) -> None:
        """The rate-limit storage failed: 503 when failing closed, else admit without short-window limits."""
        if not self._fail_open:
            raise OpenAIError(
                503,
                "server_error",
                "Rate limiting is unavailable; retry shortly.",
                code="service_unavailable",
                headers={"retry-after": "5"},
            ) from exc
        self._admitted_open(exc)

    def _admitted_open(self, exc: StorageUnavailable) -> None:
        """Count a request admitted without short-window limits; log the count at most once a minute."""
        self._open_admits += 1
        now = time.monotonic()
        if now - self._open_logged_at >= OPEN_LOG_INTERVAL_S:
            log.warning(
                "rate-limit storage unreachable: admitted %d request(s) without RPM/TPM/concurrency limits "
                "(RATELIMIT_FAIL_OPEN): %s",
                self._open_admits,
                exc,
            )
            self._open_logged_at, self._open_admits = now, 0

    async def _rate_limited(self, principal: Principal, kind: str, limit: int, cost: int) -> OpenAIError:
        self._metrics.rate_limited_total.labels(principal.role.name, kind).inc()
        window = await self.limiter.window(kind, principal.key_id, limit)
        wait_s = max(window.reset_s, 0.001)
        if kind == "requests" and self.limiter.remote and window.remaining == 0:
            self._remember_full(principal.key_id, limit, wait_s)
        if cost > limit:
            msg = f"This request needs {cost} tokens, above your limit of {limit} tokens per minute."
        else:
            used = limit - window.remaining
            msg = f"Rate limit reached for {kind} per minute: limit {limit}, used {used}, requested {cost}."
        headers = {"retry-after": str(max(1, math.ceil(wait_s))), "retry-after-ms": str(math.ceil(wait_s * 1000))}
        headers |= await self.headers(principal)
        return OpenAIError(
            429, kind, f"{msg} Please try again in {duration(wait_s)}.", code="rate_limit_exceeded", headers=headers
        )

    def _remember_full(self, key_id: str, limit: int, wait_s: float) -> None:
        """Note that ``key_id``'s requests window (of ``limit``) frees no place for ``wait_s`` seconds."""
        now = time.monotonic()
        if len(self._requests_full) >= REMEMBERED_FULL_KEYS:  # keep only the windows still full
            self._requests_full = {k: t for k, t in self._requests_full.items() if t > now}
        if len(self._requests_full) < REMEMBERED_FULL_KEYS:
            self._requests_full[key_id, limit] = now + wait_s

    async def headers(self, principal: Principal) -> dict[str, str]:
        """Current ``x-ratelimit-*`` headers for ``principal`` (empty for unlimited windows or no storage)."""
        role = principal.role
        try:
            req = await self.limiter.window("requests", principal.key_id, role.rpm) if role.rpm else None
            tok = await self.limiter.window("tokens", principal.key_id, role.tpm) if role.tpm else None
        except StorageUnavailable:
            return {}
        return rate_headers(req, tok)

    async def finish(self, ticket: Ticket, *, used_tokens: int, count_request: bool = True) -> None:
        """Settle once: release the slot, reconcile the quota reservation, add TPM overrun, record usage."""
        if ticket.finished:
            return
        ticket.finished = True
        key_id, role = ticket.principal.key_id, ticket.principal.role
        if ticket.sequences and self.sequences is not None:
            self.sequences.give(key_id, ticket.sequences)
        if ticket.slot:
            try:
                await self.limiter.release_slot(key_id)
            except StorageUnavailable as exc:
                log.warning("could not release a concurrency slot: %s", exc)
        if count_request and role.tpm is not None:
            # All tokens beyond what admission counted, even past the limit: the window then stays full until they
            # slide out. Without the storage now it is not counted (the outage is logged once by the limiter).
            overrun = used_tokens - (ticket.tpm_counted if ticket.tpm_hit else 0)
            with contextlib.suppress(StorageUnavailable):
                await self.limiter.add("tokens", key_id, role.tpm, overrun)
        if ticket.quota_reserved:
            # The reservation already counted one request and reserved_tokens; give back the difference.
            self._settle(key_id, ticket.month, used_tokens - ticket.reserved_tokens, 0 if count_request else -1)
        elif count_request:
            self._settle(key_id, ticket.month, used_tokens, 1)
