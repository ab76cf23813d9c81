"""``server.admission.gateway.Gateway`` with the in-memory RateLimiter: admission in order, the 429 envelopes and
their headers, what a refusal leaves untouched, settlement once, and failing open or closed. No HTTP, no sleeps:
the limit windows are a minute long and the only clock the gateway reads for itself is replaced."""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest

from persistence.models import Role
from persistence.records import RoleRecord
from server.admission import gateway as gateway_module
from server.admission.gateway import TPM_ESTIMATE, Gateway, current_month
from server.admission.ratelimit import RateLimiter, StorageUnavailable
from server.auth.principal import Principal
from server.errors import OpenAIError
from server.metrics import Metrics


def principal(**limits: Any) -> Principal:
    role = RoleRecord.from_orm(Role(name="r", is_admin=False, **limits))
    return Principal(key_id="k1", key_name="k1", role=role)


class Quota:
    """The database's side: a reservation answer, and every reservation and settlement it was sent."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.reserved: list[tuple[Any, ...]] = []
        self.settled: list[tuple[str, str, int, int]] = []

    async def reserve(self, *args: Any) -> bool:
        self.reserved.append(args)
        return self.ok

    def settle(self, key_id: str, month: str, tokens: int, requests: int) -> None:
        self.settled.append((key_id, month, tokens, requests))


class DownLimiter(RateLimiter):
    """A rate-limit storage (Redis) that does not answer; nothing connects to the address."""

    def __init__(self) -> None:
        super().__init__("async+redis://127.0.0.1:1/0")

    async def _call(self, coro: Any) -> Any:
        coro.close()
        raise StorageUnavailable("connection refused")


def gateway(quota: Quota | None = None, *, fail_open: bool = True, limiter: RateLimiter | None = None) -> Gateway:
    quota = quota or Quota()
    return Gateway(
        limiter or RateLimiter("async+memory://"), quota.reserve, quota.settle, Metrics(), fail_open=fail_open
    )


async def admit(gw: Gateway, who: Principal, prompt: int = 10, new: int = 20, explicit: bool = True) -> Any:
    return await gw.admit(who, prompt_tokens=prompt, max_new_tokens=new, explicit_max=explicit)


async def refused(gw: Gateway, who: Principal, prompt: int = 10, new: int = 20, explicit: bool = True) -> OpenAIError:
    with pytest.raises(OpenAIError) as err:
        await admit(gw, who, prompt, new, explicit)
    return err.value


@pytest.mark.anyio
async def test_admit_and_finish_without_limits_records_usage_once() -> None:
    quota = Quota()
    gw, who = gateway(quota), principal()
    ticket = await admit(gw, who)
    assert (ticket.reserved_tokens, ticket.slot, ticket.quota_reserved, ticket.headers) == (30, False, False, {})
    assert quota.reserved == []  # no quota: the database is not asked
    await gw.finish(ticket, used_tokens=17)
    await gw.finish(ticket, used_tokens=17)  # settled once, however often it is called
    assert quota.settled == [("k1", current_month(), 17, 1)]


@pytest.mark.anyio
async def test_rpm_refuses_the_request_over_the_limit_with_its_headers() -> None:
    gw, who = gateway(), principal(rpm=2, tpm=1000)
    first = await admit(gw, who)
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == "970" and first.headers["x-ratelimit-reset-requests"]
    await admit(gw, who)
    error = await refused(gw, who)
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert "limit 2, used 2, requested 1" in error.message
    assert error.headers["retry-after"].isdigit() and int(error.headers["retry-after-ms"]) > 0
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert (await gw.limiter.window("tokens", "k1", 1000)).remaining == 940  # the refused one counted no tokens


@pytest.mark.anyio
async def test_precheck_tests_the_requests_window_without_consuming_it() -> None:
    gw, who = gateway(), principal(rpm=1)
    await gw.precheck(who)
    await gw.precheck(who)
    assert (await gw.limiter.window("requests", "k1", 1)).remaining == 1
    await gw.admit(who, prompt_tokens=1, max_new_tokens=1, explicit_max=True, rpm_tested=True)
    with pytest.raises(OpenAIError) as err:
        await gw.precheck(who)
    assert (err.value.status, err.value.type) == (429, "requests")
    await gw.precheck(principal())  # a role without RPM is not tested at all


@pytest.mark.anyio
async def test_tpm_counts_prompt_and_max_tokens() -> None:
    gw, who = gateway(), principal(tpm=100)
    ticket = await admit(gw, who, prompt=10, new=50)
    assert ticket.tpm_counted == 60 and ticket.tpm_hit
    error = await refused(gw, who, prompt=10, new=50)
    assert (error.status, error.type, error.code) == (429, "tokens", "rate_limit_exceeded")
    assert "limit 100, used 60, requested 60" in error.message
    too_big = await refused(gw, principal(tpm=100), prompt=1, new=200)
    assert "needs 201 tokens, above your limit of 100 tokens per minute" in too_big.message


@pytest.mark.anyio
async def test_tpm_counts_an_estimate_without_max_tokens_and_the_overrun_when_it_ends() -> None:
    gw, who = gateway(), principal(tpm=10_000)
    ticket = await admit(gw, who, prompt=10, new=4000, explicit=False)
    assert ticket.tpm_counted == 10 + TPM_ESTIMATE and ticket.reserved_tokens == 4010
    assert (await gw.limiter.window("tokens", "k1", 10_000)).remaining == 10_000 - 266
    await gw.finish(ticket, used_tokens=1000)  # all the tokens it used count, not only the estimate
    assert (await gw.limiter.window("tokens", "k1", 10_000)).remaining == 9000


@pytest.mark.anyio
async def test_concurrency_slot_is_taken_and_given_back() -> None:
    gw, who = gateway(), principal(max_concurrency=1)
    ticket = await admit(gw, who)
    assert ticket.slot and await gw.limiter.in_use("k1") == 1
    error = await refused(gw, who)
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert "concurrent" in error.message and error.headers == {"retry-after": "1", "retry-after-ms": "1000"}
    await gw.finish(ticket, used_tokens=5)
    await gw.finish(ticket, used_tokens=5)
    assert await gw.limiter.in_use("k1") == 0
    await gw.finish(await admit(gw, who), used_tokens=1)  # the slot is free again


@pytest.mark.anyio
async def test_quota_reservation_and_reconciliation() -> None:
    quota = Quota()
    gw, who = gateway(quota), principal(monthly_tokens=1000, monthly_requests=5)
    ticket = await admit(gw, who, prompt=10, new=20)
    assert ticket.quota_reserved and quota.reserved == [("k1", current_month(), 30, 1000, 5)]
    await gw.finish(ticket, used_tokens=12)
    assert quota.settled == [("k1", current_month(), 12 - 30, 0)]  # the reservation counted the request


@pytest.mark.anyio
async def test_a_refused_quota_is_429_and_consumes_nothing_before_it() -> None:
    quota = Quota(ok=False)
    gw, who = gateway(quota), principal(rpm=5, tpm=1000, max_concurrency=1, monthly_tokens=10)
    error = await refused(gw, who)
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "insufficient_quota")
    assert error.headers == {"x-should-retry": "false"}
    assert await gw.limiter.in_use("k1") == 0  # the slot taken before was given back
    assert (await gw.limiter.window("requests", "k1", 5)).remaining == 5  # windows are hit only at the end
    assert (await gw.limiter.window("tokens", "k1", 1000)).remaining == 1000
    assert quota.settled == []  # nothing reserved, nothing to give back, no request counted


@pytest.mark.anyio
async def test_a_lost_race_for_the_window_gives_the_reservation_back() -> None:
    class LosesTheRace(RateLimiter):
        async def hit(self, kind: str, key_id: str, limit: int, cost: int) -> bool:
            return False  # a concurrent request took the last room between the test and the hit

    quota = Quota()
    gw = gateway(quota, limiter=LosesTheRace("async+memory://"))
    who = principal(rpm=5, max_concurrency=2, monthly_tokens=1000)
    error = await refused(gw, who)
    assert (error.status, error.type) == (429, "requests")
    assert quota.settled == [("k1", current_month(), -30, -1)]  # the reservation and its request, undone
    assert await gw.limiter.in_use("k1") == 0


@pytest.mark.anyio
async def test_fail_closed_refuses_with_503_when_the_storage_is_down() -> None:
    gw = gateway(fail_open=False, limiter=DownLimiter())
    error = await refused(gw, principal(rpm=5))
    assert (error.status, error.type, error.code) == (503, "server_error", "service_unavailable")
    assert error.headers == {"retry-after": "5"}
    # The early check asks no shared storage (admission, above, is where the 503 comes from).
    await gw.precheck(principal(rpm=5))


@pytest.mark.anyio
async def test_fail_open_admits_without_short_windows_but_quotas_still_hold() -> None:
    quota = Quota()
    gw = gateway(quota, limiter=DownLimiter())
    who = principal(rpm=5, tpm=1000, max_concurrency=1, monthly_tokens=1000)
    await gw.precheck(who)
    ticket = await admit(gw, who)
    assert not ticket.slot and not ticket.tpm_hit and ticket.headers == {} and ticket.quota_reserved
    second = await admit(gw, who)  # no concurrency limit without the storage
    await gw.finish(ticket, used_tokens=30)
    await gw.finish(second, used_tokens=30)
    assert len(quota.settled) == 2 and await gw.headers(who) == {}
    quota.ok = False
    error = await refused(gw, who)
    assert (error.status, error.type) == (429, "insufficient_quota")  # quotas fail closed


@pytest.mark.anyio
async def test_fail_open_admissions_are_logged_once_a_minute_with_a_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], time=lambda: 0.0)
    monkeypatch.setattr(gateway_module, "time", clock)
    caplog.set_level(logging.WARNING, logger="server.admission")
    gw, who = gateway(limiter=DownLimiter()), principal(rpm=5)
    for _ in range(3):
        await admit(gw, who)
    now[0] += gateway_module.OPEN_LOG_INTERVAL_S
    await admit(gw, who)
    warnings = [r.getMessage() for r in caplog.records if "without RPM/TPM/concurrency limits" in r.getMessage()]
    assert len(warnings) == 2
    assert "admitted 1 request(s)" in warnings[0] and "admitted 3 request(s)" in warnings[1]
    assert (await admit(gw, who)).month == "1970-01"  # the replaced clock dates the ticket too


def test_checks_that_need_no_storage() -> None:
    who = principal(allowed_models=["a"], max_tokens=10, max_n=2)
    Gateway.check_model(who, "a")
    with pytest.raises(OpenAIError) as err:
        Gateway.check_model(who, "b")
    assert (err.value.status, err.value.type, err.value.code, err.value.param) == (
        403,
        "permission_error",
        "model_not_allowed",
        "model",
    )
    assert Gateway.max_tokens_cap(who, None, "max_tokens") == 10 and Gateway.max_tokens_cap(who, 10, "x") == 10
    with pytest.raises(OpenAIError) as err:
        Gateway.max_tokens_cap(who, 11, "max_completion_tokens")
    assert (err.value.status, err.value.param) == (400, "max_completion_tokens")
    Gateway.check_n(who, 2)
    with pytest.raises(OpenAIError) as err:
        Gateway.check_n(who, 3, "n")
    assert (err.value.status, err.value.param) == (400, "n")
    assert Gateway.max_tokens_cap(principal(), 10**6, "max_tokens") is None  # unlimited role
    assert current_month(0) == "1970-01"


def test_current_month_is_the_utc_month_across_boundaries_in_any_order() -> None:
    from datetime import UTC, datetime

    edges = [datetime(2026, 12, 31, 23, 59, 59, 999000, UTC), datetime(2027, 1, 1, tzinfo=UTC)]
    edges += [
        datetime(2028, 2, 29, 12, tzinfo=UTC),
        datetime(2028, 3, 1, tzinfo=UTC),
        datetime(2026, 11, 30, tzinfo=UTC),
    ]
    instants = [e.timestamp() for e in edges] + [e.timestamp() - 0.001 for e in edges]
    instants += [1_700_000_000 + i * 1_234_567.89 for i in range(40)]
    for at in instants + instants[::-1]:
        assert current_month(at) == datetime.fromtimestamp(at, UTC).strftime("%Y-%m"), at
