"""Log probabilities in OpenAI's two wire shapes: chat ``logprobs.content[]`` and legacy completions lists.

Every entry's token text is the text that token added to the output (see :class:`~server.serving.common.Choice`),
so the tokens of a choice join to exactly its text, stop strings and multi-byte characters included. Alternatives
are single tokens decoded on their own, which for a token holding part of a character shows U+FFFD, as OpenAI's do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from schemas.openai.chat import ChoiceLogprobs, TokenLogprobContent, TopLogprob
from schemas.openai.completions import CompletionLogprobs
from server.engine.base import Tokenizer, TokenLogprob
from server.engine.detok import IncrementalDetokenizer
from server.serving.choices import LogprobEntry

# JSON has no -Infinity; OpenAI reports impossible tokens with this floor.
_FLOOR = -9999.0


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class TokenTexts:
    """Decodes single token ids for alternatives, remembering each (a vocabulary is finite; requests repeat)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def chat_logprobs(entries: Sequence[LogprobEntry], texts: TokenTexts) -> ChoiceLogprobs:
    """``choices[].logprobs`` of a chat choice (or of one stream chunk)."""
    content = []
    for e in entries:
        lp = e.logprob
        top = [
            TopLogprob(token=tok, logprob=_value(value), bytes=list(tok.encode()))
            for tok, value in ((e.text if tid == lp.token_id else texts(tid), value) for tid, value in lp.top)
        ]
        content.append(
            TokenLogprobContent(token=e.text, logprob=_value(lp.logprob), bytes=list(e.text.encode()), top_logprobs=top)
        )
    return ChoiceLogprobs(content=content)


def _top_map(chosen_text: str, lp: TokenLogprob, texts: TokenTexts) -> dict[str, float]:
    """Legacy ``top_logprobs`` item: the alternatives plus the chosen token (so up to ``logprobs + 1`` keys)."""
    out = {texts(tid): _value(value) for tid, value in lp.top if tid != lp.token_id}
    out[chosen_text] = _value(lp.logprob)
    return out


def completion_logprobs(
    entries: Sequence[tuple[str, TokenLogprob | None]], texts: TokenTexts, offset: int
) -> CompletionLogprobs:
    """Legacy logprobs of ``(token text, logprob)`` pairs starting ``offset`` characters into the choice's text.

    A ``None`` logprob (the first prompt token, which nothing predicts) gives ``None`` in both value lists.
    """
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for text, lp in entries:
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(None if lp is None else _value(lp.logprob))
        tops.append(None if lp is None else _top_map(text, lp, texts))
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def prompt_token_texts(tokenizer: Tokenizer, prompt: Sequence[int]) -> list[str]:
    """The text each prompt token adds, decoded incrementally so that they join to the decoded prompt."""
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push(t) for t in prompt]
    if out:
        out[-1] += detok.flush()
    return out


def echo_entries(
    tokenizer: Tokenizer, prompt: Sequence[int], prompt_logprobs: Sequence[TokenLogprob] | None
) -> list[tuple[str, TokenLogprob | None]]:
    """``(text, logprob)`` of each prompt token for ``echo``; the first has no logprob (nothing precedes it)."""
    token_texts = prompt_token_texts(tokenizer, prompt)
    scored: list[TokenLogprob | None] = [None, *(prompt_logprobs or [])]
    if len(scored) != len(token_texts):
        scored = [None] * len(token_texts)  # the engine sent no prompt logprobs: report none rather than misalign
    return list(zip(token_texts, scored, strict=True))
