"""The per-key bound on sequences in flight: taken at admission, given back on every way a request ends."""

from __future__ import annotations

from typing import Any

import pytest

from persistence.models import Role
from persistence.records import RoleRecord
from server.admission.gateway import Gateway
from server.admission.ratelimit import RateLimiter
from server.admission.sequences import SequenceBudget
from server.auth.principal import Principal
from server.errors import OpenAIError
from server.metrics import Metrics


def principal(key_id: str = "k1", **limits: Any) -> Principal:
    role = RoleRecord.from_orm(Role(name="r", is_admin=False, **limits))
    return Principal(key_id=key_id, key_name=key_id, role=role)


def gateway(limit: int, *, quota_ok: bool = True) -> Gateway:
    async def reserve(*_: Any) -> bool:
        return quota_ok

    return Gateway(
        RateLimiter("async+memory://"),
        reserve,
        lambda *_: None,
        Metrics(),
        fail_open=True,
        sequences=SequenceBudget(limit),
    )


def test_budget_counts_per_key_and_forgets_idle_keys() -> None:
    budget = SequenceBudget(10)
    assert budget.take("a", 6) and budget.take("a", 4)
    assert not budget.take("a", 1)
    assert budget.take("b", 10)  # keys are independent
    budget.give("a", 4)
    assert budget.held("a") == 6 and budget.take("a", 4)
    budget.give("a", 10)
    assert budget.held("a") == 0 and "a" not in budget._held
    with pytest.raises(ValueError, match="at least 1"):
        SequenceBudget(0)


@pytest.mark.anyio
async def test_sequences_are_given_back_when_the_request_settles() -> None:
    gw, who = gateway(8), principal()
    ticket = await gw.admit(who, prompt_tokens=3, max_new_tokens=5, explicit_max=True, sequences=8)
    assert gw.sequences is not None and gw.sequences.held("k1") == 8
    with pytest.raises(OpenAIError) as refused:
        await gw.admit(who, prompt_tokens=3, max_new_tokens=5, explicit_max=True, sequences=1)
    assert refused.value.status == 429 and refused.value.type == "requests"
    await gw.finish(ticket, used_tokens=10)
    await gw.finish(ticket, used_tokens=10)  # settling twice gives nothing back twice
    assert gw.sequences.held("k1") == 0


@pytest.mark.anyio
@pytest.mark.parametrize("refusal", ["quota", "concurrency"])
async def test_a_request_refused_after_its_sequences_were_counted_gives_them_back(refusal: str) -> None:
    gw = gateway(8, quota_ok=refusal != "quota")
    limits = {"monthly_tokens": 100} if refusal == "quota" else {"max_concurrency": 1}
    who = principal(**limits)
    held = None
    if refusal == "concurrency":
        held = await gw.admit(who, prompt_tokens=1, max_new_tokens=1, explicit_max=True, sequences=2)
    with pytest.raises(OpenAIError) as refused:
        await gw.admit(who, prompt_tokens=1, max_new_tokens=1, explicit_max=True, sequences=3)
    assert refused.value.status == 429
    assert gw.sequences is not None and gw.sequences.held("k1") == (2 if held else 0)


def test_a_request_larger_than_the_whole_budget_is_a_400() -> None:
    gw = gateway(4)
    gw.check_sequences(4)
    with pytest.raises(OpenAIError) as err:
        gw.check_sequences(5, "n")
    assert err.value.status == 400 and err.value.param == "n"


def test_a_request_that_holds_no_sequences_leaves_no_entry() -> None:
    budget = SequenceBudget(2)
    assert budget.take("k", 0) and budget.held("k") == 0 and budget._held == {}
    assert budget.take("k", 2) and not budget.take("k", 1) and budget.take("k", 0)
    budget.give("k", 2)
    assert budget._held == {}
