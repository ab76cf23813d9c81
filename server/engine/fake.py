"""A scriptable engine for tests: fixed token pieces, pacing, failures, and a record of aborts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from server.engine.base import EngineRequest
from server.engine.chartok import CharTokenizer
from server.engine.echo import EchoEngine, ScriptedStream


class FakeEngine(EchoEngine):
    """Like ``builtin:echo`` unless ``script`` says what to emit.

    Args:
        script: Token pieces to emit (each one token; multi-character pieces imitate BPE merges), or a
            function of the request returning them. ``None`` echoes the last user message.
        delay_s: Pause before each token (lets tests disconnect mid-stream).
        fail_after: Raise ``EngineError`` after this many tokens.
        served_model_name / max_model_len / max_queue_size: as for :class:`EchoEngine`.
    """

    def __init__(
        self,
        script: Sequence[str] | Callable[[EngineRequest], Sequence[str]] | None = None,
        *,
        delay_s: float = 0.0,
        fail_after: int | None = None,
        served_model_name: str = "fake",
        max_model_len: int = 4096,
        max_queue_size: int = 64,
    ) -> None:
        super().__init__(served_model_name, max_model_len=max_model_len, max_queue_size=max_queue_size)
        self._script = script
        self._delay = delay_s
        self._fail_after = fail_after
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.completed: list[str] = []

    @property
    def tokenizer(self) -> CharTokenizer:
        return self._tokenizer

    def _make_stream(self, request: EngineRequest) -> ScriptedStream:
        self.requests.append(request)
        if self._script is None:
            ids = self.reply_ids(request)
        else:
            pieces = self._script(request) if callable(self._script) else self._script
            ids = [self._tokenizer.piece_id(p) for p in pieces]

        def on_close(stream: ScriptedStream, aborted: bool) -> None:
            (self.aborted if aborted else self.completed).append(stream.request.request_id)

        return ScriptedStream(
            request,
            ids,
            self._tokenizer,
            eos_id=next(iter(self._tokenizer.eos_token_ids)),
            delay_s=self._delay,
            fail_after=self._fail_after,
            on_close=on_close,
        )
