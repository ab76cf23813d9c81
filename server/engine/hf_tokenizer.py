"""The :class:`~server.engine.base.Tokenizer` protocol over a Transformers tokenizer (no torch needed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


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

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

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
    ) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint with a raw prompt")
        if tools and "tools" not in str(self.hf.chat_template):
            # Rendering would silently drop them: the model would never learn it has tools.
            raise ValueError("this model's chat template does not support tools")
        # Passed only when given: a template's output without tools stays exactly what it always was.
        extra: dict[str, Any] = {} if tools is None else {"tools": [dict(t) for t in tools]}
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
