"""Stored, stateful responses (``/v1/responses``): each turn runs through the exchange as a chat completion, and
its state is kept per key.

- A turn is admitted, cached, run, settled and observed exactly like a chat completion (the exchange does it); this
  module adds the state around it. With ``store`` (the default) the response is written once it has ended, with the
  conversation's input items, before the client sees its final event, so ``previous_response_id`` can name it at
  once. Every read is scoped to the key that made it: another key's response looks like a missing one (404).
- A background turn is written ``queued`` once the gateway has admitted it, and answered then (a refusal is still
  a 429, and nothing was written); it runs on in a task, ``in_progress`` once stored, and its final state replaces
  the row. ``cancel`` stops it (the tokens it used are charged); a cancel made on another replica reaches it
  through the row's ``cancel_requested`` flag, which a running background turn polls (a deleted row stops it
  too).
- A streamed turn whose client goes away before its end is not stored (its usage is settled all the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

from schemas.openai.chat import ChatCompletion
from schemas.openai.errors import ErrorResponse
from schemas.openai.responses import InputItem, Response, ResponseError, ResponseEvent
from server.auth.principal import Principal
from server.errors import OpenAIError, invalid_request
from server.exchange.exchange import Disconnected, Exchange, Reply
from server.exchange.work import Work
from server.records.database import describe_error
from server.records.record import RequestRecord
from server.records.responses import ResponseStore
from server.serving.responses.events import TurnEvents
from server.serving.responses.items import output_as_input
from server.serving.responses.turn import Turn

log = logging.getLogger("server.responses")

CANCEL_POLL_S = 1.0
"""How often a running background turn checks whether a cancel was asked on another replica."""
CANCEL_WAIT_S = 5.0
"""How long ``cancel`` waits for the turn to stop before answering with its state as it stands."""
RUNNING = ("queued", "in_progress")

_items = msgspec.json.Decoder(list[InputItem])
_response = msgspec.json.Decoder(Response)
_encode = msgspec.json.Encoder().encode


def response_not_found(response_id: str, param: str | None = None) -> OpenAIError:
    """404 for a response that does not exist or belongs to another key (the two look the same)."""
    return OpenAIError(
        404, "invalid_request_error", f"Response with id '{response_id}' not found.", param=param, code="not_found"
    )


@dataclass(frozen=True, slots=True)
class History:
    """An earlier turn as stored: its conversation's input items and its response object, both still JSON (empty
    for a turn that continues nothing)."""

    input_items: bytes = b""
    response: bytes = b""

    @property
    def size(self) -> int:
        """The bytes decoding it reads."""
        return len(self.input_items) + len(self.response)

    def items(self) -> list[InputItem]:
        """The items the next turn continues from: the earlier turn's input, then its output."""
        if not self.input_items:
            return []
        return _items.decode(self.input_items) + output_as_input(_response.decode(self.response).output)


@dataclass(slots=True)
class _Job:
    """A background turn running in this process."""

    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class Responses:
    """Runs Responses turns through ``exchange`` and keeps their state in ``store``.

    ``max_history_bytes`` bounds the stored conversation a turn may continue from (``None``: unbounded), so that
    a long ``previous_response_id`` chain costs one bounded read before admission, never an unbounded decode.
    """

    exchange: Exchange
    store: ResponseStore
    max_history_bytes: int | None = None
    _jobs: dict[str, _Job] = field(default_factory=dict, init=False, repr=False)

    # -- reading ------------------------------------------------------------------------------------------------
    async def history(self, caller: Principal, previous_response_id: str | None) -> History:
        """The earlier turn a turn continues from, still encoded (empty without an id): decoding it is part of the
        turn's preparation, off the event loop when it is large.

        Raises:
            OpenAIError: 404 naming ``previous_response_id`` when it is not one of the caller's responses; 400 while
                it is still running, or when the stored conversation is over ``max_history_bytes``.
        """
        if previous_response_id is None:
            return History()
        row = await self.store.get(previous_response_id, caller.key_id)
        if row is None:
            raise response_not_found(previous_response_id, "previous_response_id")
        if row.status in RUNNING:
            raise invalid_request(
                f"Response '{previous_response_id}' is still {row.status}; continue from it once it has ended.",
                "previous_response_id",
            )
        history = History(row.input_items, row.response)
        if self.max_history_bytes is not None and history.size > self.max_history_bytes:
            raise invalid_request(
                f"The conversation of response '{previous_response_id}' is {history.size} bytes as stored, over the "
                f"{self.max_history_bytes} a conversation may be continued with; start a new conversation, giving "
                "the items to keep as 'input'.",
                "previous_response_id",
                "context_length_exceeded",
            )
        return history

    async def get(self, caller: Principal, response_id: str) -> bytes:
        """The stored response object (as JSON)."""
        row = await self.store.get(response_id, caller.key_id)
        if row is None:
            raise response_not_found(response_id)
        return row.response

    async def input_items(self, caller: Principal, response_id: str) -> list[InputItem]:
        """The conversation's input items of a stored response (the earlier turns' included)."""
        row = await self.store.get(response_id, caller.key_id)
        if row is None:
            raise response_not_found(response_id)
        return _items.decode(row.input_items)

    async def delete(self, caller: Principal, response_id: str) -> None:
        """Delete a stored response (a background turn still running here is stopped)."""
        if not await self.store.delete(response_id, caller.key_id):
            raise response_not_found(response_id)
        job = self._jobs.get(response_id)
        if job is not None:
            job.cancel.set()

    async def cancel(self, caller: Principal, response_id: str) -> bytes:
        """Stop a background turn; answers the response as it stands after (``cancelled`` once it has stopped)."""
        row = await self.store.get(response_id, caller.key_id)
        if row is None:
            raise response_not_found(response_id)
        if not row.background:
            raise invalid_request("Only a response created with 'background' true can be cancelled.", None)
        if row.status == "cancelled":
            return row.response
        if row.status not in RUNNING:
            raise invalid_request(f"Cannot cancel a response whose status is '{row.status}'.", None)
        await self.store.request_cancel(response_id, caller.key_id)
        job = self._jobs.get(response_id)
        if job is not None and job.task is not None:
            job.cancel.set()
            await asyncio.wait({job.task}, timeout=CANCEL_WAIT_S)
        else:  # running on another replica: it sees the flag within CANCEL_POLL_S
            for _ in range(round(CANCEL_WAIT_S / CANCEL_POLL_S) * 4):
                row = await self.store.get(response_id, caller.key_id)
                if row is None or row.status not in RUNNING:
                    break
                await asyncio.sleep(CANCEL_POLL_S / 4)
        row = await self.store.get(response_id, caller.key_id)
        if row is None:
            raise response_not_found(response_id)
        return row.response

    # -- running ------------------------------------------------------------------------------------------------
    async def run(
        self, turn: Turn, work: Work, caller: Principal, record: RequestRecord | None, disconnected: Disconnected
    ) -> Reply:
        """Run a turn for its client: the response (stored first when asked), or its stream of events."""
        reply = await self.exchange.run(work, caller, record, disconnected)
        if reply.events is not None:
            return Reply(reply.headers, events=self._events(turn, reply.events, caller), after=reply.after)
        assert isinstance(reply.body, ChatCompletion)
        response = turn.finished(reply.body)
        await self._keep(turn, response, caller)
        return Reply(reply.headers, body=response)

    async def _events(
        self, turn: Turn, chunks: AsyncIterator[msgspec.Struct], caller: Principal
    ) -> AsyncIterator[ResponseEvent]:
        """The turn's events; the final one goes out once the response is stored."""
        stream = TurnEvents(turn)
        for event in stream.start():
            yield event
        final: list[ResponseEvent] = []
        try:
            async for chunk in chunks:
                if final:  # nothing follows an error frame; were it to, it is not part of the response
                    continue
                if isinstance(chunk, ErrorResponse):
                    final = stream.fail(chunk)
                    continue
                for event in stream.push(chunk):  # type: ignore[arg-type]
                    yield event
        finally:
            with anyio.CancelScope(shield=True):
                closer = getattr(chunks, "aclose", None)
                if closer is not None:
                    await closer()  # settles the turn's usage first
        if not final:
            final = stream.finish()
        with anyio.CancelScope(shield=True):
            await self._keep(turn, stream.response, caller)
        for event in final:
            yield event

    async def start_background(
        self, turn: Turn, work: Work, caller: Principal, record: RequestRecord | None
    ) -> tuple[Response, dict[str, str]]:
        """Start the turn and answer it ``queued`` (with its rate-limit headers) once the gateway has admitted it and
        its row is stored.

        The row is written only after admission: a refused turn costs the database nothing, so a key at its limits
        cannot turn refusals into writes.

        Raises:
            OpenAIError: the gateway refused it (429, ...), or its row could not be stored (the turn is stopped):
                nothing is kept.
        """
        queued = turn.response("queued")
        stored: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        job = _Job()
        if record is not None:
            record.streaming = True  # its row is written when the turn settles, not when this answer starts
        job.task = asyncio.ensure_future(self._background(turn, queued, work, caller, record, job, stored))
        either: set[asyncio.Future[Any]] = {job.task, stored}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not stored.done():
            job.task.result()  # raises the refusal, or the failure to store the row
        self._jobs[turn.id] = job
        job.task.add_done_callback(lambda _: self._jobs.pop(turn.id, None))
        return queued, stored.result()

    async def _background(
        self,
        turn: Turn,
        queued: Response,
        work: Work,
        caller: Principal,
        record: RequestRecord | None,
        job: _Job,
        stored: asyncio.Future[dict[str, str]],
    ) -> None:
        admitted: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

        def on_admitted(headers: dict[str, str]) -> None:
            admitted.set_result(headers)

        async def cancelled() -> None:
            """Returns once the turn is to stop: cancelled or deleted here, or through its row on another replica
            (the flag set, or the row deleted once it was stored)."""
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(job.cancel.wait(), CANCEL_POLL_S)
                    return
                if not stored.done():
                    continue
                with contextlib.suppress(Exception):
                    if await self.store.cancel_requested(turn.id) is not False:
                        return

        run = asyncio.ensure_future(self.exchange.run(work, caller, record, cancelled, on_admitted))
        try:
            either: set[asyncio.Future[Any]] = {run, admitted}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not admitted.done():
                run.result()  # refused: raises, and nothing was written
            try:
                await self._create(turn, queued, caller)
            except BaseException:
                job.cancel.set()  # the client is answered with this failure: stop the turn, settling what it used
                with contextlib.suppress(BaseException):
                    await run
                raise
            stored.set_result(admitted.result())
            if not run.done():
                await self._progress(turn)
            reply = await run
            assert isinstance(reply.body, ChatCompletion)
            response = turn.finished(reply.body)
        except OpenAIError as exc:
            if not stored.done():
                raise
            if exc.code == "client_closed_request":
                response = turn.response("cancelled")
            else:
                response = turn.response("failed", error=ResponseError(code=exc.code or exc.type, message=exc.message))
        except Exception:
            if not stored.done():
                raise
            log.exception("background response %s failed", turn.id)
            failure = ResponseError(code="server_error", message="The server failed while running this response.")
            response = turn.response("failed", error=failure)
        finally:
            if not run.done():  # this task itself was cancelled
                run.cancel()
        with anyio.CancelScope(shield=True):
            await self._final(turn, response)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the background turns of this process to store their final state."""
        tasks = {job.task for job in self._jobs.values() if job.task is not None}
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        return not pending

    async def _create(self, turn: Turn, response: Response, caller: Principal) -> None:
        """Write the turn's row (raises when the database is unavailable)."""
        await self.store.create(
            id=turn.id,
            key_id=caller.key_id,
            model=turn.model,
            status=response.status,
            background=turn.request.background,
            previous_response_id=turn.request.previous_response_id,
            response=_encode(response),
            input_items=_encode(turn.items),
        )

    async def _keep(self, turn: Turn, response: Response, caller: Principal) -> None:
        """Store a finished turn (nothing when ``store`` is off). The client has paid for the answer, so a database
        that cannot take it costs the stored copy only: logged, and the answer still goes out."""
        if not turn.request.store:
            return
        try:
            await self._create(turn, response, caller)
        except Exception as exc:
            log.warning("response %s could not be stored (%s)", turn.id, describe_error(exc))

    async def _progress(self, turn: Turn) -> None:
        """Mark an admitted background turn ``in_progress`` (a failed write leaves it ``queued``)."""
        try:
            await self.store.update(turn.id, status="in_progress", response=_encode(turn.response("in_progress")))
        except Exception as exc:
            log.warning("background response %s: storing in_progress failed (%s)", turn.id, describe_error(exc))

    async def _final(self, turn: Turn, response: Response) -> None:
        """Replace a background turn's row with its final state."""
        try:
            if not await self.store.update(turn.id, status=response.status, response=_encode(response)):
                log.info("background response %s was deleted before it ended", turn.id)
        except Exception as exc:  # the row keeps its earlier state
            log.warning("background response %s: storing its final state failed (%s)", turn.id, describe_error(exc))
