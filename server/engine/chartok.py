"""A torch-free tokenizer for ``builtin:echo`` and the test engine.

Every Unicode code point is one token (id = code point), so any text round-trips; extra multi-character
"pieces" can be registered to imitate BPE tokens that span characters. Chats render as ChatML, tools the way the
demo model's template (and Qwen2.5's) renders them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

EOS_ID = 0x110000
_FIRST_PIECE_ID = EOS_ID + 1
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


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

    @property
    def chat_template(self) -> str | None:
        """``None``: the built-in ChatML rendering is Python, not a Jinja template."""
        return None

    @property
    def max_token_bytes(self) -> int:
        """``encode`` gives one token per code point: at most four UTF-8 bytes each."""
        return 4

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
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """ChatML text of ``messages`` (content flattened to text), with ``tools`` as the demo model renders them."""
        parts: list[str] = []
        if tools:
            system = ""
            if messages and messages[0]["role"] == "system":
                system = f"{messages[0].get('content') or ''}\n\n"
                messages = messages[1:]
            listing = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
            parts.append(f"{IM_START}system\n{system}{_TOOLS_INTRO}{listing}{_TOOLS_OUTRO}{IM_END}\n")
        for i, m in enumerate(messages):
            content = m.get("content") or ""
            if m["role"] == "tool":
                # A run of tool results shares one user turn.
                opens = i == 0 or messages[i - 1]["role"] != "tool"
                closes = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
                response = f"\n<tool_response>\n{content}\n</tool_response>"
                parts.append(f"{IM_START}user" * opens + response + f"{IM_END}\n" * closes)
            elif m["role"] == "assistant" and m.get("tool_calls"):
                text = f"\n{content}" if content else ""
                calls = "".join(_render_call(call) for call in m["tool_calls"])
                parts.append(f"{IM_START}assistant{text}{calls}{IM_END}\n")
            else:
                parts.append(f"{IM_START}{m['role']}\n{content}{IM_END}\n")
        if continue_final_message:
            parts[-1] = parts[-1][: -len(IM_END) - 1]
        elif add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """ChatML token ids of ``messages``; ``chat_template_kwargs`` are ignored (the built-in template has no
        variables)."""
        return self.encode(
            self.render_chat_text(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
            )
        )


def _render_call(call: Mapping[str, Any]) -> str:
    """One earlier tool call as the Hermes ``<tool_call>`` block a model would have written."""
    function = call.get("function", call)
    arguments = function["arguments"]
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'\n<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n</tool_call>'


def last_user_message(prompt: str) -> str:
    """The content of the last ChatML user turn in ``prompt``, or the whole prompt if there is none."""
    marker = f"{IM_START}user\n"
    start = prompt.rfind(marker)
    if start == -1:
        return prompt
    body = prompt[start + len(marker) :]
    end = body.find(IM_END)
    return body if end == -1 else body[:end]
