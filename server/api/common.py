"""Helpers the controllers share: JSON responses, SSE responses, reading and decoding bodies."""

from __future__ import annotations

import asyncio
import re
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import accumulate
from typing import Any

import anyio
import msgspec
from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.enums import ScopeType
from litestar.response import Stream
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send
from litestar.utils.scope.state import ScopeState

from server.api.exceptions import from_msgspec
from server.errors import OpenAIError, invalid_request
from server.sse import HEADERS, sse_frames

_encoder = msgspec.json.Encoder()
BODY_TYPE = "body_type"


def json_response(obj: msgspec.Struct, headers: dict[str, str] | None = None) -> Response[bytes]:
    """A 200 with ``obj`` encoded by msgspec."""
    return Response(content=_encoder.encode(obj), media_type="application/json", headers=headers)


def sse_response(
    events: AsyncIterator[msgspec.Struct],
    headers: dict[str, str] | None = None,
    after: Callable[[], Awaitable[None]] | None = None,
    *,
    framing: Callable[[AsyncIterator[msgspec.Struct]], AsyncIterator[bytes]] = sse_frames,
) -> Stream:
    """A ``text/event-stream`` response of ``data:`` frames (or of ``framing``'s); ``after`` runs once the response
    has ended."""
    return Stream(
        framing(events),
        media_type="text/event-stream",
        headers={**HEADERS, **(headers or {})},
        background=BackgroundTask(after) if after is not None else None,
    )


MAX_JSON_DEPTH = 128
"""Most levels of nesting in a request body (``[[1]]`` has 2): far above any real request, far below what the
decoder and the code downstream (schemas, tool arguments, re-encoding for a remote model) can recurse through."""
_THREAD_BYTES = 1 << 20  # bodies over 1 MiB are checked and decoded in a worker thread, off the event loop
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_FOLD = bytes.maketrans(b"{}", b"[]")
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")  # +1 and -1 as signed bytes
# Only a number this long, or with a 3-digit positive exponent, can be out of range (a float over ~1.8e308, an
# integer over Python's 4,300 digits); the typed decode skips unknown fields without converting their numbers.
# Found with one translate and substring searches (a regex scan of a 10 MB body took 150 ms, holding the GIL):
# digits become "0", "e"/"E" become "e", "+" stays, everything else becomes a space.
_NUMBER_SHAPE = bytes(
    ord("0") if chr(b).isdigit() and b < 128 else ord("e") if b in b"eE" else b if b == ord("+") else ord(" ")
    for b in range(256)
)
_HUGE_NUMBER_SHAPES = (b"0" * 309, b"e000", b"e+000")
_HEX2 = rb"[0-9a-fA-F]{2}"
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB]" + _HEX2 + rb"(?!\\u[dD][c-fC-F]" + _HEX2 + rb")"
    rb"|(?<!\\u[dD][89abAB]" + _HEX2 + rb")\\u[dD][c-fC-F]" + _HEX2
)


def _invalid_body(message: str) -> OpenAIError:
    return invalid_request(message, None, "invalid_json")


def nesting_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``raw`` nests deeper than ``limit``, without recursing (brackets in strings ignored).

    Linear time; the common case (few brackets) is two ``count`` calls.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", raw).translate(_FOLD, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    if b"[" * (limit + 1) in brackets:
        return True
    return max(accumulate(array("b", brackets.translate(_STEPS)))) > limit


def _may_hold_huge_number(raw: bytes) -> bool:
    """Whether ``raw`` has a digit run of 309+ or a 3-digit positive exponent (false positives only cost a decode)."""
    shape = raw.translate(_NUMBER_SHAPE)
    return any(pattern in shape for pattern in _HUGE_NUMBER_SHAPES)


def decode_body(raw: bytes, body_type: Any) -> Any:
    """Decode a request body strictly into ``body_type``, or raise a 400 ``invalid_request_error`` saying why.

    The whole body must be JSON that every later reader can take: valid UTF-8 (unknown fields included: the typed
    decode skips those unchecked), no lone UTF-16 surrogate escape (``"\\ud800"``: not Unicode, so no tokenizer,
    database or upstream could take it; it is refused rather than replaced, which would change the prompt
    silently), at most :data:`MAX_JSON_DEPTH` levels of nesting, and numbers in range.
    """
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid_body(
            f"The request body is not valid UTF-8 (byte 0x{raw[exc.start]:02X} at offset {exc.start}); "
            "send JSON encoded as UTF-8."
        ) from None
    if nesting_exceeds(raw):
        raise _invalid_body(f"The JSON body is nested too deeply: at most {MAX_JSON_DEPTH} levels are accepted.")
    try:
        body = msgspec.json.decode(raw, type=body_type, strict=True)
    except msgspec.DecodeError as exc:
        lone = _LONE_SURROGATE.search(raw)
        if lone is not None:
            raise _invalid_body(
                f"The JSON body contains a lone UTF-16 surrogate escape ('{lone.group().decode()}' without its pair), "
                "which is not valid Unicode."
            ) from None
        raise from_msgspec(exc) from None
    except msgspec.ValidationError as exc:
        raise from_msgspec(exc) from None
    if _may_hold_huge_number(raw):
        try:
            msgspec.json.decode(raw)
        except msgspec.ValidationError:
            raise _invalid_body(
                "A number in the JSON body is out of range (floats must fit a double, integers 4,300 digits)."
            ) from None
    return body


async def strict_body(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: decode the body once, strictly (OpenAI rejects ``"stream": 0``; Litestar would not).

    The decoded value is handed to Litestar as the request's parsed JSON, so the handler's ``data: JSONBody[...]``
    parameter receives it as is and the body is never decoded again (Litestar's own, untyped decode failed with 500s
    on input this one refuses with 400s). The raw bytes stay cached on the request; nothing forwards them: a
    remote model's body is rebuilt from the validated request (``server.serving.forward``).
    """
    body_type = request.route_handler.opt.get(BODY_TYPE)
    if body_type is None:
        return
    raw = await request.body()
    if len(raw) > _THREAD_BYTES:
        body = await anyio.to_thread.run_sync(decode_body, raw, body_type)
    else:
        body = decode_body(raw, body_type)
    # Litestar has no public way to hand it a decoded body; ScopeState is internal (pyproject bounds the minor).
    ScopeState.from_scope(request.scope).json = body


def read_timeout_middleware(timeout_s: float) -> Any:
    """Litestar middleware factory: 408 when the request body stalls for ``timeout_s`` (a stuck or slow client).

    Only reads of the body are timed (each ``receive`` until the last body chunk, before the response starts);
    the wait of a stream for the client's disconnect is not. The 408 closes the connection, since the rest of
    the body may still be on its way.
    """

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            reading = True

            async def timed_receive() -> ReceiveMessage:
                nonlocal reading
                if not reading:
                    return await receive()
                try:
                    async with asyncio.timeout(timeout_s):
                        message = await receive()
                except TimeoutError:
                    reading = False
                    raise OpenAIError(
                        408,
                        "invalid_request_error",
                        f"The request body stalled: nothing arrived for {timeout_s:g} s.",
                        code="request_timeout",
                        headers={"connection": "close"},
                    ) from None
                if message["type"] != "http.request" or not message.get("more_body", False):
                    reading = False
                return message

            async def watched_send(message: Message) -> None:
                nonlocal reading
                if message["type"] == "http.response.start":
                    reading = False
                await send(message)

            await app(scope, timed_receive, watched_send)

        return middleware

    return factory
