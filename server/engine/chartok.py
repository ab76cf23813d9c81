"""A torch-free tokenizer for ``builtin:echo`` and the test engine.

Every Unicode code point is one token (id = code point), so any text round-trips; extra multi-character
"pieces" can be registered to imitate BPE tokens that span characters. Chats render as ChatML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

EOS_ID = 0x110000
_FIRST_PIECE_ID = EOS_ID + 1
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class CharTokenizer:
    """Code-point tokenizer with optional multi-character pieces and a ChatML template."""

    def __init__(self, pieces: Iterable[str] = ()) -> None:
        self._pieces: list[str] = []
        self._piece_ids: dict[str, int] = {}
        for p in pieces:
            self.piece_id(p)

    def piece_id(self, piece: str) -> int:
        """The id of ``piece`` (a single character is its code point); registers new pieces."""
        if len(piece) == 1:
            return ord(piece)
        if piece not in self._piece_ids:
            self._piece_ids[piece] = _FIRST_PIECE_ID + len(self._pieces)
            self._pieces.append(piece)
        return self._piece_ids[piece]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS_ID})

    @property
    def vocab_size(self) -> int:
        return _FIRST_PIECE_ID + len(self._pieces)

    @property
    def has_chat_template(self) -> bool:
        return True

    def encode(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        out: list[str] = []
        for t in token_ids:
            if t < EOS_ID:
                out.append(chr(t))
            elif t > EOS_ID:
                out.append(self._pieces[t - _FIRST_PIECE_ID])
        return "".join(out)

    def render_chat_text(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool, continue_final_message: bool
    ) -> str:
        """ChatML text of ``messages``."""
        parts = [f"{IM_START}{m['role']}\n{m.get('content') or ''}{IM_END}\n" for m in messages]
        if continue_final_message:
            parts[-1] = parts[-1][: -len(IM_END) - 1]
        elif add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool, continue_final_message: bool
    ) -> list[int]:
        return self.encode(
            self.render_chat_text(
                messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message
            )
        )


def last_user_message(prompt: str) -> str:
    """The content of the last ChatML user turn in ``prompt``, or the whole prompt if there is none."""
    marker = f"{IM_START}user\n"
    start = prompt.rfind(marker)
    if start == -1:
        return prompt
    body = prompt[start + len(marker) :]
    end = body.find(IM_END)
    return body if end == -1 else body[:end]
