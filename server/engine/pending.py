"""One request inside the Transformers engine: the consumer's side (stream, abort flag) and the worker's row state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.engine.base import Constraint, EngineDelta, EngineError, EngineRequest, FinishReason, TokenLogprob
from server.engine.detok import IncrementalDetokenizer
from server.engine.sampling import RowSampler
from server.engine.stream import QueueStream

if TYPE_CHECKING:
    from server.engine.grammar import RowGrammar
    from server.engine.hf_tokenizer import HFTokenizer


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
    cached_tokens: int | None = None  # prompt tokens its first prefill took from the prefix cache, until reported
    digests: tuple[int, list[bytes]] | None = None  # its context's prefix-cache block names, by context length - 1
    group: object | None = None  # shared by the samples of one prompt, which may share its prefill

    def forks(self, other: Pending) -> bool:
        """Whether this request can share ``other``'s prefill: a sample of the same prompt, neither one started."""
        return self.group is not None and self.group is other.group and not self.tokens and not other.tokens

    def emit(self, item: EngineDelta | EngineError) -> None:
        assert self.stream is not None
        try:
            self.stream.fail(item) if isinstance(item, EngineError) else self.stream.put(item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.aborted = True

    def context(self) -> list[int]:
        """The tokens a (re)prefill must feed: the prompt and everything generated so far."""
        return [*self.request.prompt_token_ids, *self.tokens]

    def prepare(
        self,
        tokenizer: HFTokenizer,
        device: Any,
        max_model_len: int,
        grammar_for: Callable[[HFTokenizer, Constraint], RowGrammar],
    ) -> bool:
        """Validate the request and give it its row state; emit its end and return False if it cannot run."""
        prompt = list(self.request.prompt_token_ids)
        if not prompt:
            self.emit(EngineError("the prompt is empty"))
            return False
        if min(prompt) < 0 or max(prompt) >= tokenizer.vocab_size:
            self.emit(EngineError(f"prompt token ids must be in [0, {tokenizer.vocab_size})"))
            return False
        params = self.request.params
        self.budget = min(params.max_tokens, max_model_len - len(prompt))
        if self.budget <= 0:
            self.emit(EngineDelta(finish_reason="length"))
            return False
        try:
            grammar = None if params.constraint is None else grammar_for(tokenizer, params.constraint)
        except ValueError as exc:  # serving validates constraints first; this is the engine's own safety net
            self.emit(EngineError(f"the output constraint cannot be compiled: {exc}"))
            return False
        self.sampler = RowSampler.create(params, device, prompt=prompt, grammar=grammar)
        self.detok = IncrementalDetokenizer(tokenizer, prompt)
        self.eos = tokenizer.eos_token_ids
        return True

    def advance(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record and emit ``token`` (with its logprob, if asked for); return whether the row keeps running."""
        assert self.detok is not None
        assert self.sampler is not None
        self.tokens.append(token)
        self.sampler.accept(token)
        grammar = self.sampler.grammar
        finish: FinishReason | None = None
        eos = token in self.eos and (not self.request.params.ignore_eos or grammar is not None)
        if eos:
            finish, text = "stop", self.detok.flush()  # EOS counts as a token but is not text
        else:
            text = self.detok.push(token)
            if grammar is not None and grammar.is_stopped:
                finish, text = "stop", text + self.detok.flush()  # the grammar is complete: only EOS could follow
            elif len(self.tokens) >= self.budget:
                finish, text = "length", text + self.detok.flush()
        if not self.aborted:
            delta = EngineDelta(token_ids=[token], text=text, finish_reason=finish)
            if logprob is not None and (text or not eos):  # a final EOS is not text: no entry, as in OpenAI's
                delta.logprobs, delta.token_texts = [logprob], [text]
            elif logprob is not None:
                delta.logprobs, delta.token_texts = [], []
            if self.prompt_logprobs is not None:
                delta.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
            if self.cached_tokens is not None:
                delta.cached_tokens, self.cached_tokens = self.cached_tokens, None
            self.emit(delta)
        return finish is None and not self.aborted
