"""The :class:`~server.engine.base.Tokenizer` protocol over a Transformers tokenizer (no torch needed)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# How much each normalizer can shrink text (input bytes per output byte); a normalizer not listed may delete
# characters outright (stripping, control-character cleaning, a precompiled charsmap), so no byte bound holds.
# NFKC/NFKD and lowercasing map some 4-byte characters to 1 byte (U+1D400 -> "A"), NFC composes at most 3:1.
_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 4, "Prepend": 1}


class HFTokenizer:
    """The :class:`~server.engine.base.Tokenizer` protocol over a Transformers tokenizer.

    Args:
        tokenizer: A loaded Transformers tokenizer.
        extra_eos_token_ids: EOS ids beyond the tokenizer's own (e.g. from the model's generation config).
    """

    def __init__(self, tokenizer: Any, extra_eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = tokenizer
        eos = set(extra_eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos = frozenset(eos)
        self._vocab_size = len(tokenizer)
        self._max_token_bytes = _max_token_bytes(tokenizer)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        return None if not template else str(template)

    @property
    def max_token_bytes(self) -> int | None:
        return self._max_token_bytes

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(token_ids), skip_special_tokens=True))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint with a raw prompt")
        if tools and "tools" not in str(self.hf.chat_template):
            # Rendering would silently drop them: the model would never learn it has tools.
            raise ValueError("this model's chat template does not support tools")
        # Passed only when given: a template's output without tools stays exactly what it always was.
        extra: dict[str, Any] = dict(chat_template_kwargs or {})  # names of the call's own arguments refused earlier
        if tools is not None:
            extra["tools"] = [dict(t) for t in tools]
        try:
            text = self.hf.apply_chat_template(
                [dict(m) for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **extra,
            )
        except Exception as exc:  # templates are arbitrary Jinja code: any failure is the messages' fault
            raise ValueError(f"the chat template rejected the messages: {exc}") from exc
        # The template writes the special tokens itself; adding them again would double a BOS.
        return list(self.hf.encode(text, add_special_tokens=False))


def _max_token_bytes(tokenizer: Any) -> int | None:
    """The most input bytes one token of ``tokenizer`` can stand for, or ``None`` when that is unbounded.

    The longest vocabulary entry (added and special tokens included) bounds what one token covers; with a byte-level
    vocabulary every character of an entry is one input byte, otherwise its UTF-8 length over-counts, which keeps
    the bound safe. A normalizer that shrinks text multiplies it; one that may delete characters voids it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    shrink = _normalizer_shrink(backend.normalizer)
    if shrink is None:
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        return None
    byte_level = type(backend.decoder).__name__ == "ByteLevel"
    longest = max(len(entry) if byte_level else len(entry.encode("utf-8")) for entry in vocab)
    return max(1, longest) * shrink


def _normalizer_shrink(normalizer: Any) -> int | None:
    if normalizer is None:
        return 1
    try:
        spec = json.loads(normalizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return None
    return _spec_shrink(spec)


def _spec_shrink(spec: Any) -> int | None:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        total = 1
        for part in spec.get("normalizers") or []:
            factor = _spec_shrink(part)
            if factor is None:
                return None
            total *= factor
        return total
    if kind == "Replace":
        pattern, content = spec.get("pattern") or {}, spec.get("content")
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        if not isinstance(literal, str) or not literal or not isinstance(content, str):
            return None  # a regex pattern may match (and delete) anything
        if not content:
            return None
        return max(1, -(-len(literal.encode()) // len(content.encode())))
    return _SHRINK.get(kind) if isinstance(kind, str) else None
