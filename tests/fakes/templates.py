"""Jinja chat templates written for the tests, on the FakeEngine's code-point tokenizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    """The code-point tokenizer rendering chats through a Jinja template; records every rendered prompt."""

    def __init__(self, template: str) -> None:
        super().__init__()
        self._template = template
        self._compiled = ImmutableSandboxedEnvironment().from_string(template)
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
            messages=list(messages), add_generation_prompt=add_generation_prompt, tools=tools, **variables
        )
        self.rendered.append(text)
        return self.encode(text)


def templated_engine(template: str, script: Sequence[str]) -> FakeEngine:
    """A FakeEngine emitting ``script`` whose chats render through ``template``."""
    engine = FakeEngine(script)
    engine._tokenizer = TemplateTokenizer(template)
    return engine
