"""``serve`` under uvicorn: one worker, bounded request heads, a graceful drain and a meaningful exit status.

uvicorn already stops accepting connections on SIGTERM/SIGINT, waits for open ones and finally cancels what
still runs. This adds, around it:

- the app's :class:`~server.exchange.shutdown.Lifecycle` drain: requests still running when ``SHUTDOWN_GRACE_S`` is
  over are cut cleanly (503, or a stream's error frame, usage recorded) before uvicorn's own cancellation,
  which comes :data:`~server.exchange.shutdown.CANCEL_MARGIN_S` later for whatever ignores the cut;
- exit status 0 after a drained shutdown (uvicorn re-raises the signal, which ends the process as "killed");
- a non-zero exit, with one line on stderr, when the model fails to load;
- the start-up heap frozen once the models have loaded (:func:`freeze_heap`: no full garbage collection walks
  it again);
- request heads (request line + headers) over ``MAX_HEADER_BYTES`` answered 431, and heads that stall for
  ``REQUEST_READ_TIMEOUT_S`` 408, in the OpenAI error shape (bodies that stall are the app's: 408 too).

uvicorn offers no public hooks for these: the subclasses below override its server's and its h11 protocol's
internals, so pyproject bounds uvicorn to the minor series tested.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import secrets
import signal
import socket
from http import HTTPStatus
from types import FrameType
from typing import Any

import h11
import msgspec
import uvicorn
from litestar import Litestar
from uvicorn.protocols.http.h11_impl import H11Protocol

from schemas.openai.errors import ErrorBody, ErrorResponse
from server.exchange.shutdown import CANCEL_MARGIN_S, Lifecycle
from server.settings import Settings
from server.wiring.state import app_state

log = logging.getLogger("server")

#: Seconds after the grace period before connections still open are closed (a cut stream needs only
#: milliseconds to send its last frame, unless its client has stopped reading).
ABORT_AFTER_S = 2.0


class ServeError(Exception):
    """``serve`` could not run or stopped on a fatal error; the message is one line for stderr."""


def run(app: Litestar, settings: Settings) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; return after a clean drain.

    Raises:
        ServeError: the server did not start, or the model failed to load.
    """
    lifecycle = app_state(app).lifecycle
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # server.access logs every request with its request id, route, status and latency
        server_header=False,
        # Pinned to h11 (httptools has neither limit), with heads bounded in size and time.
        http=HeadLimitedH11Protocol.with_head_timeout(settings.request_read_timeout_s),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + CANCEL_MARGIN_S),
    )
    lifecycle.on_loaded = freeze_heap
    server = DrainingServer(config, lifecycle, settings.shutdown_grace_s)
    server.run()
    if lifecycle.failure:
        raise ServeError(lifecycle.failure)
    if not server.started:
        raise ServeError("the server did not start (see the log above)")


def freeze_heap() -> None:
    """Move what start-up allocated (modules, the app, the model) out of the garbage collector's sight.

    Those objects live as long as the process, yet every full collection would walk all of them (about 150,000
    without torch, far more with it): a pause of about 50 ms on these machines, every few thousand requests, in
    the middle of whichever requests were running. Frozen, a full collection walks only what requests created
    since. Collected first, so no garbage is frozen with them: about 0.1 s with torch loaded, once, on the event
    loop right after the last model started (``Lifecycle.on_loaded``).
    """
    gc.collect()
    gc.freeze()
    log.debug("start-up heap frozen: %d objects", gc.get_freeze_count())


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the app's drain and exit status 0 after a signal-initiated shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # As uvicorn, minus recording the signal: uvicorn re-raises it once shut down, so a drained, clean stop
        # would end with "killed by SIGTERM" (143) instead of 0. A second Ctrl-C still forces the exit.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.lifecycle.failure and not self.should_exit:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.lifecycle.failure:
            log.info("draining: in-flight requests may run for %gs (SHUTDOWN_GRACE_S)", self.grace_s)
        self.lifecycle.begin(self.grace_s)
        abort = asyncio.get_running_loop().call_later(self.grace_s + ABORT_AFTER_S, self._abort_connections)
        try:
            await super().shutdown(sockets)
        finally:
            abort.cancel()

    def _abort_connections(self) -> None:
        """Close the connections still open after the grace period (their clients stopped reading).

        The stream sees a disconnect, ends and settles its accounting as any disconnected one; without this
        uvicorn would cancel it mid-write ``CANCEL_MARGIN_S`` later, with a traceback and no usage row.
        """
        stuck = list(self.server_state.connections)
        if stuck:
            log.warning("shutdown: closing %d connection(s) whose client is not reading", len(stuck))
        for connection in stuck:
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


class _HeadLimitedConnection(h11.Connection):
    """h11 bounds only an *incomplete* head; this also refuses a complete one over the limit."""

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise
        if isinstance(event, h11.Request) and head_size(event) > self.max_head_bytes:
            self.error = h11.RemoteProtocolError("request head too large", error_status_hint=431)
            raise self.error
        return event


def head_size(request: h11.Request) -> int:
    """Bytes of the request line and headers as sent (``name: value\\r\\n`` each)."""
    line = len(request.method) + len(request.target) + len(request.http_version) + 9  # "M T HTTP/x\r\n"
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers.raw_items()) + 2


class HeadLimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with bounded request heads, refused in the OpenAI error shape.

    uvicorn answers any unparseable head with a plain-text 400 and waits for a head for ever. Here a head over
    ``MAX_HEADER_BYTES`` gets 431 ``request_header_fields_too_large``, one not complete ``head_timeout_s`` after
    the connection opened (or after the first byte of a keep-alive request) 408 ``request_timeout``, anything
    else malformed a JSON 400 ``invalid_http_request``. Each carries ``x-request-id`` and closes the connection.
    """

    head_timeout_s: float = 30.0

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.conn = _HeadLimitedConnection(config.h11_max_incomplete_event_size or 16_384)
        self._head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_head_timeout(cls, timeout_s: float) -> type[HeadLimitedH11Protocol]:
        return type(cls.__name__, (cls,), {"head_timeout_s": timeout_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the first bytes of the next request on a keep-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            message = f"The request head stalled: it was not complete after {self.head_timeout_s:g} s."
            self._refuse(408, "request_timeout", message)

    def send_400_response(self, msg: str) -> None:
        self._disarm_head_timer()
        error = self.conn.error if isinstance(self.conn, _HeadLimitedConnection) else None
        if error is not None and error.error_status_hint == 431:
            limit = self.conn.max_head_bytes if isinstance(self.conn, _HeadLimitedConnection) else 0
            message = f"Request header fields too large: the request line and headers exceed {limit} bytes."
            self._refuse(431, "request_header_fields_too_large", message)
        else:
            self._refuse(400, "invalid_http_request", f"Invalid HTTP request: {error or msg}.")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` in the error shape and close (written raw: h11 may hold no request to answer)."""
        request_id = f"req_{secrets.token_hex(12)}"
        self.logger.warning("refused a request head: %d %s from %s [%s]", status, code, self.client, request_id)
        body = msgspec.json.encode(
            ErrorResponse(error=ErrorBody(message=message, type="invalid_request_error", param=None, code=code))
        )
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nx-request-id: {request_id}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()
