"""Admission that needs no work on the prompt, before any is done: the cheapest refusals first.

:func:`screen` (a ``before_request`` hook) reads only a generation body's ``model`` to refuse a role that may not use
it (403) or a key over its requests per minute (429) before the body is decoded in full. Handlers then call
:func:`gate` for the role's caps and the key's sequence bound (400), and run the serving layer's validation,
template rendering and tokenization through :func:`prepared`, off the event loop for large bodies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import msgspec
from litestar import Request

from server.admission.gateway import Gateway
from server.api.common import BODY_TYPE
from server.api.context import context_of
from server.auth.principal import Principal
from server.wiring.models import ServedModels
from server.wiring.state import app_state

T = TypeVar("T")

INLINE_PREPARE_BYTES = 16_384
"""Bodies up to this size are validated and tokenized on the event loop (microseconds); larger ones in a thread."""
PREPARE_THREADS = 4
"""Worker threads that tokenize and render large prompts (per app; more would only contend for the cores)."""


class _Target(msgspec.Struct):
    model: str | None = None


async def screen(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: the model allowlist (403) and the RPM window (429) before the body is decoded.

    Only ``model`` is read from the body (one scan, no copy of its strings), so a huge body from a role that may not
    use the model, or from a key over its requests per minute, is refused before it is decoded in full. Bodies whose
    model cannot be read this way are left to the strict decode (400) and to :func:`gate`.
    """
    body_type = request.route_handler.opt.get(BODY_TYPE)
    context = context_of(request.scope)
    principal = context.principal
    if body_type is None or principal is None:
        return
    try:
        target = msgspec.json.decode(await request.body(), type=_Target)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return  # the strict decode answers these with a 400
    state = app_state(request.app)
    models: ServedModels = state.models
    name = target.model if target.model is not None else _default_model(body_type, models)
    if name is None or not models.serves(name):
        return
    gateway = state.services.gateway
    gateway.check_model(principal, name)
    await gateway.precheck(principal)
    context.screened_model = name


def _default_model(body_type: type[Any], models: ServedModels) -> str | None:
    """The model a body without one is for: the default where the schema makes ``model`` optional."""
    for f in msgspec.structs.fields(body_type):
        if f.name == "model":
            return None if f.required else models.default
    return None


async def _screened(request: Request[Any, Any, Any], model: str) -> tuple[Principal, Gateway]:
    """The caller and the gateway, with the allowlist (403) and the early RPM check (429) done for ``model``
    (already by :func:`screen` when it read the same model from the body)."""
    context = context_of(request.scope)
    principal = context.caller()
    gateway = app_state(request.app).services.gateway
    if context.screened_model != model:
        gateway.check_model(principal, model)
        await gateway.precheck(principal)
    return principal, gateway


async def gate(
    request: Request[Any, Any, Any],
    model: str,
    *,
    requested: int | None,
    param: str,
    n: int = 1,
    prompts: int = 1,
) -> int | None:
    """Admission that needs no work on the prompt, cheapest first: a refused request costs microseconds.

    The role may use ``model`` (403), its requests-per-minute window has room (429, nothing consumed; both already
    checked by :func:`screen` when it could read the model), the request
    stays within the role's caps on max tokens and choices (400) and asks for no more sequences (``prompts`` x ``n``)
    than a key may ever have in flight (400). Returns the role's max-tokens cap for the serving layer.
    """
    principal, gateway = await _screened(request, model)
    cap = gateway.max_tokens_cap(principal, requested, param)
    choices_param = "n" if n > 1 else "prompt"
    gateway.check_n(principal, n * prompts, choices_param)
    gateway.check_sequences(n * prompts, choices_param)
    return cap


@asynccontextmanager
async def counted(request: Request[Any, Any, Any], model: str) -> AsyncIterator[None]:
    """Admission of a request that runs no model (``/tokenize``, ``/detokenize``), held while its work runs.

    The role may use ``model`` (403); the request counts one in the key's requests-per-minute window (429 when
    full) and holds one of its concurrency slots until it ends, so tokenizing costs a tenant what any request costs
    and cannot burn the server's CPU past the key's limits. It counts no tokens: neither TPM nor the monthly quota
    (tokens or requests) is touched, and a key over its monthly quota may still count its tokens.
    """
    principal, gateway = await _screened(request, model)
    tokenless = dataclasses.replace(principal.role, tpm=None, monthly_tokens=None, monthly_requests=None)
    ticket = await gateway.admit(
        dataclasses.replace(principal, role=tokenless),
        prompt_tokens=0,
        max_new_tokens=0,
        explicit_max=True,
        sequences=0,
        rpm_tested=True,
    )
    try:
        yield
    finally:
        await gateway.finish(ticket, used_tokens=0, count_request=False)


async def prepared(request: Request[Any, Any, Any], work: Callable[[], T], *, extra_bytes: int = 0) -> T:
    """Run ``work`` (validation, template rendering, tokenization) without stalling the event loop.

    A small body is handled inline, where a thread hop would cost more than the work. A large one goes to one of
    ``PREPARE_THREADS`` worker threads, so other streams keep flowing while its prompt is tokenized (the
    tokenizers release the GIL); the serving layer refuses prompts that certainly exceed the context from their
    byte length before tokenizing them at all. ``extra_bytes`` counts what ``work`` reads besides the body (a
    stored conversation the request continues), so a short body continuing a long conversation goes to a thread too.
    """
    if len(await request.body()) + extra_bytes <= INLINE_PREPARE_BYTES:
        return work()
    return await anyio.to_thread.run_sync(work, limiter=app_state(request.app).prepare_limiter)
