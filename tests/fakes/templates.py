"""Jinja chat templates written for the tests, on the FakeEngine's code-point tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.base import EngineRequest
from server.engine.chartok import CharTokenizer
from server.engine.fake import FakeEngine

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
)

QWEN3_LIKE = (
    _CHATML + "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
"""Thinks unless ``enable_thinking`` is false, which closes an empty reasoning block in the prompt (Qwen3)."""

R1_LIKE = _CHATML + "<think>\n{% endif %}"
"""Opens the reasoning in the generation prompt: the output begins inside it (DeepSeek-R1 distills)."""

PLAIN = _CHATML + "{% endif %}"
"""A template that knows nothing of reasoning."""


class TemplateTokenizer(CharTokenizer):
    """The code-point tokenizer rendering chats through a Jinja template as Transformers does; records every prompt.

    Args:
        template: The Jinja chat template.
        trim_blocks: Jinja's ``trim_blocks`` and ``lstrip_blocks`` (the tool-call templates are written with them).

    ``tojson`` keeps the key order, as Transformers' own filter does, so a rendered call reads as a model writes it.
    """

    def __init__(self, template: str, *, trim_blocks: bool = False) -> None:
        super().__init__()
        self._template = template
        env = ImmutableSandboxedEnvironment(trim_blocks=trim_blocks, lstrip_blocks=trim_blocks)
        env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
        self._compiled = env.from_string(template)
        self.rendered: list[str] = []

    @property
    def chat_template(self) -> str | None:
        return self._template

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        variables = dict(chat_template_kwargs or {})
        text = self._compiled.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tools=tools, **variables
        )
        self.rendered.append(text)
        return self.encode(text)


def templated_engine(
    template: str,
    script: Sequence[str] | Callable[[EngineRequest], Sequence[str]] | None = None,
    *,
    trim_blocks: bool = False,
) -> FakeEngine:
    """A FakeEngine whose chats render through ``template`` and whose reply is ``script`` (token pieces)."""
    engine = FakeEngine(script)
    engine._tokenizer = TemplateTokenizer(template, trim_blocks=trim_blocks)
    return engine
