"""One request inside the Transformers engine: the consumer's side (stream, abort flag) and the worker's row state."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.base import EngineDelta, EngineError, EngineRequest, TokenLogprob
from server.engine.detok import IncrementalDetokenizer
from server.engine.sampling import RowSampler
from server.engine.stream import QueueStream


@dataclass(eq=False, slots=True)
class Pending:
    """One request: the consumer's stream and abort flag, plus the worker's per-row state once admitted."""

    request: EngineRequest
    stream: QueueStream | None = None
    aborted: bool = False
    sampler: RowSampler | None = None
    detok: IncrementalDetokenizer | None = None
    eos: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)  # generated so far; the last one is not in the cache yet
    budget: int = 0  # most tokens it may generate (max_tokens, cut at the context end)
    order: int = -1  # admission order; the newest rows are preempted first
    prompt_logprobs: list[TokenLogprob] | None = None  # computed by the prefill, sent with the first delta
    prompt_reported: bool = False

    def emit(self, item: EngineDelta | EngineError) -> None:
        assert self.stream is not None
        try:
            self.stream.fail(item) if isinstance(item, EngineError) else self.stream.put(item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.aborted = True

    def context(self) -> list[int]:
        """The tokens a (re)prefill must feed: the prompt and everything generated so far."""
        return [*self.request.prompt_token_ids, *self.tokens]
