"""One OpenAI-compatible upstream (vLLM, TGI, another llm-server) behind a pooled ``httpx`` client.

The upstream's key goes only into the ``Authorization`` header of its requests: it never appears in a log line,
an error message or a response. Failures become OpenAI-shaped errors: an upstream that cannot be reached (after the
retries) is 502 ``upstream_error``, one that does not answer in time is 504 ``upstream_timeout``, its own client
errors (400, 413, 422, 429 …) pass through in OpenAI's shape, and a refusal of the gateway's own credentials or
model name is the operator's problem (502, logged), never blamed on the client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from server import tracing
from server.errors import OpenAIError, overloaded
from server.models.file import RemoteModel

log = logging.getLogger("server.upstream")

RETRY_STATUSES = frozenset({502, 503, 504})
# Failures before any response byte arrived: the request can be sent again without a client noticing.
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 2.0
ERROR_BODY_LIMIT = 65_536
HEALTH_TIMEOUT_S = 5.0
MIN_WINDOW = 16  # the smallest max_model_len a models file accepts


@dataclass(slots=True)
class Health:
    """The last background check of an upstream (``/readyz`` shows it)."""

    status: str = "unknown"
    """``ok`` (answered and lists the model), ``degraded`` (answered without the model), ``down`` or ``unknown``."""
    checked_at: str | None = None
    latency_ms: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checked_at": self.checked_at,
            "latency_ms": self.latency_ms,
            "error": self.error,
        }


class Upstream:
    """Requests to one upstream, at most ``max_concurrency`` at once from this replica.

    Args:
        entry: The models-file entry.
        api_key: The upstream's key (read from the variable ``entry.api_key_env`` names), or ``None``.
        transport: An ``httpx`` transport for tests; the default opens real connections.
    """

    def __init__(
        self, entry: RemoteModel, api_key: str | None, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.entry = entry
        """The models-file entry; without a ``max_model_len`` of its own it takes the one the upstream reports."""
        self._configured = entry
        self.name = entry.name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secret = api_key or None
        timeout = httpx.Timeout(entry.timeout_s, connect=min(entry.timeout_s, 10.0), pool=entry.timeout_s)
        limits = httpx.Limits(
            max_connections=entry.max_concurrency + 2,  # + the health check
            max_keepalive_connections=entry.max_concurrency,
            keepalive_expiry=30.0,
        )
        self._client = httpx.AsyncClient(
            base_url=entry.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=timeout,
            limits=limits,
            transport=transport,
            trust_env=False,  # an HTTP(S)_PROXY meant for the hub must not capture internal upstream traffic
        )
        self._slots = asyncio.Semaphore(entry.max_concurrency)
        self.running = 0
        self.waiting = 0
        self.health = Health()

    # -- requests ------------------------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Take one of the upstream's concurrency slots (503 ``overloaded`` after waiting ``timeout_s``)."""
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.entry.timeout_s)
        except TimeoutError:
            raise overloaded(
                f"The model '{self.name}' is at its concurrency limit; retry shortly.", retry_after_s=5
            ) from None
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        self.running -= 1
        self._slots.release()

    async def open(self, path: str, payload: dict[str, Any]) -> Answer:
        """POST ``payload`` and return the answer with its headers read and its body not yet read.

        Retries (with jittered exponential backoff) only what failed before any response byte: connection
        errors and 502/503/504 answers. The caller must ``aclose()`` the answer.

        Raises:
            OpenAIError: 502/503/504 after the retries, 504 on a timeout, the upstream's 4xx in OpenAI shape.
        """
        body = msgspec.json.encode(payload)
        headers = {"content-type": "application/json"}
        tracing.inject(headers)  # the request span's traceparent, while tracing is on
        attempts = self.entry.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            request = self._client.build_request("POST", path, content=body, headers=headers)
            try:
                response = await self._client.send(request, stream=True)
            except RETRY_ERRORS as exc:
                log.warning(
                    "upstream %r: %s on attempt %d/%d: %s", self.name, type(exc).__name__, attempt + 1, attempts, exc
                )
                if last:
                    raise unreachable(self.name) from None
            except httpx.TimeoutException as exc:
                log.warning("upstream %r: %s", self.name, type(exc).__name__)
                raise timed_out(self.name) from None
            except httpx.HTTPError as exc:
                log.warning("upstream %r: %s: %s", self.name, type(exc).__name__, exc)
                raise unreachable(self.name) from None
            else:
                if response.status_code < 400:
                    return Answer(self.name, response)
                retryable = response.status_code in RETRY_STATUSES and not last
                detail = await read_limited(response)
                await response.aclose()
                if not retryable:
                    raise self._refused(response, detail)
                log.warning(
                    "upstream %r answered %d on attempt %d/%d", self.name, response.status_code, attempt + 1, attempts
                )
            await asyncio.sleep(backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _refused(self, response: httpx.Response, body: bytes) -> OpenAIError:
        status = response.status_code
        error = parse_error(body)
        message = self.scrub(str(error.get("message") or f"HTTP {status}"))
        if status in (401, 403, 404):
            # The gateway's key or upstream_model is wrong: an operator's problem, not the client's.
            log.error("upstream %r refused the gateway's request with %d: %s", self.name, status, message)
            return OpenAIError(
                502,
                "server_error",
                f"The upstream serving '{self.name}' refused the gateway's request (HTTP {status}); "
                "the operator has been told.",
                code="upstream_error",
            )
        if status == 504 or status == 408:
            return timed_out(self.name)
        if status == 503:
            retry_after = response.headers.get("retry-after", "5")
            return OpenAIError(
                503,
                "server_error",
                f"The upstream serving '{self.name}' is overloaded; retry shortly.",
                code="overloaded",
                headers={"retry-after": retry_after if retry_after.isdigit() else "5"},
            )
        if status >= 500:
            log.warning("upstream %r failed with %d: %s", self.name, status, message)
            return OpenAIError(
                502, "server_error", f"The upstream serving '{self.name}' failed: {message}", code="upstream_error"
            )
        headers = {k: v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS}
        return OpenAIError(
            status,
            str(error.get("type") or ("requests" if status == 429 else "invalid_request_error")),
            str(message),
            param=_opt_str(error.get("param")),
            code=_opt_str(error.get("code")),
            headers=headers,
        )

    def scrub(self, text: str) -> str:
        """``text`` (an upstream's error message, logged or passed on) without the upstream's key in it."""
        return text.replace(self._secret, "[redacted]") if self._secret else text

    # -- health --------------------------------------------------------------------------------------------
    async def check(self) -> Health:
        """``GET /models`` once; ``ok`` when it answers 200 and lists the upstream model."""
        began = time.perf_counter()
        health = Health(checked_at=datetime.now(UTC).isoformat(timespec="seconds"))
        try:
            response = await self._client.get("models", timeout=min(HEALTH_TIMEOUT_S, self.entry.timeout_s))
        except httpx.HTTPError as exc:
            health.status, health.error = "down", f"{type(exc).__name__}"
        else:
            health.latency_ms = round((time.perf_counter() - began) * 1000, 1)
            if response.status_code != 200:
                health.status, health.error = "down", f"HTTP {response.status_code}"
            else:
                listing = _models(response.content)
                listed = listing.get(self.entry.target_model)
                health.status = "ok" if listed is not None else "degraded"
                if listed is None:
                    health.error = f"the upstream does not list the model {self.entry.target_model!r}"
                else:
                    self._learn_window(listed)
        if health.status != self.health.status:
            level = logging.INFO if health.status == "ok" else logging.WARNING
            log.log(level, "upstream %r is %s%s", self.name, health.status, f": {health.error}" if health.error else "")
        self.health = health
        return health

    def _learn_window(self, listed: dict[str, Any]) -> None:
        """Take the context window the upstream lists for the model (vLLM's ``max_model_len``) unless the entry
        sets one: the max tokens sent for a request without one is then the room its prompt leaves in it."""
        window = listed.get("max_model_len")
        if self._configured.max_model_len is not None or type(window) is not int or window < MIN_WINDOW:
            return
        if window != self.entry.max_model_len:
            log.info("upstream %r: context window %d (from its model listing)", self.name, window)
            self.entry = msgspec.structs.replace(self._configured, max_model_len=window)

    async def watch(self) -> None:
        """Check now, then every ``health_interval_s``, until cancelled."""
        while True:
            try:
                await self.check()
            except Exception:  # a bug in a check must not end the loop
                log.exception("upstream %r: health check failed", self.name)
            await asyncio.sleep(self.entry.health_interval_s)

    async def aclose(self) -> None:
        await self._client.aclose()


class Answer:
    """An upstream's answer whose headers have arrived; its body is read here, failures already in OpenAI's shape.

    Reading raises 504 ``upstream_timeout`` when the upstream stalls and 502 ``upstream_error`` when the connection
    breaks. ``aclose()`` closes the connection, which aborts an unfinished request upstream.
    """

    def __init__(self, name: str, response: httpx.Response) -> None:
        self._name = name
        self._response = response

    async def read(self) -> bytes:
        """The whole body."""
        try:
            return await self._response.aread()
        except httpx.TimeoutException:
            raise timed_out(self._name) from None
        except httpx.HTTPError:
            raise unreachable(self._name) from None

    async def events(self) -> AsyncIterator[bytes]:
        """The ``data`` payloads of an SSE body (multi-line data joined, comments and other fields skipped)."""
        data: list[str] = []
        try:
            async for line in self._response.aiter_lines():
                if line == "":
                    if data:
                        yield "\n".join(data).encode()
                        data = []
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
        except httpx.TimeoutException:
            raise timed_out(self._name) from None
        except httpx.HTTPError:
            raise unreachable(self._name) from None
        if data:
            yield "\n".join(data).encode()

    async def aclose(self) -> None:
        await self._response.aclose()


PASSED_HEADERS = frozenset({"retry-after", "retry-after-ms", "x-should-retry"})


def backoff(attempt: int) -> float:
    """Jittered exponential backoff before retry ``attempt + 1``."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0))


def unreachable(name: str) -> OpenAIError:
    """502 ``upstream_error``: the upstream could not be reached or broke the connection."""
    return OpenAIError(
        502,
        "server_error",
        f"The upstream serving '{name}' could not be reached; retry shortly.",
        code="upstream_error",
        headers={"retry-after": "1"},
    )


def timed_out(name: str) -> OpenAIError:
    """504 ``upstream_timeout``."""
    return OpenAIError(
        504, "server_error", f"The upstream serving '{name}' did not answer in time.", code="upstream_timeout"
    )


async def read_limited(response: httpx.Response, limit: int = ERROR_BODY_LIMIT) -> bytes:
    """At most ``limit`` bytes of an (error) response body; an unreadable body is empty."""
    out = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            out += chunk
            if len(out) >= limit:
                break
    except httpx.HTTPError:
        pass
    return bytes(out[:limit])


def parse_error(body: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-style error body (``{"message": text}`` for anything else)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()
        return {"message": text[:500]} if text else {}
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return error
        if isinstance(error, str):  # TGI: {"error": "...", "error_type": "..."}
            return {"message": error}
    return {}


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _models(body: bytes) -> dict[str, dict[str, Any]]:
    """The entries of a ``GET /models`` listing by id."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return {}
    items = data.get("data") if isinstance(data, dict) else None
    return {str(m.get("id")): m for m in items if isinstance(m, dict)} if isinstance(items, list) else {}
