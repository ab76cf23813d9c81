"""Chat templates written for the tests, one per tool-call family, and a FakeEngine that renders them.

(Unlike :mod:`tests.fakes.templates`, ``tojson`` keeps the key order, as Transformers' own filter does, so that a
rendered call reads as the model would write it.)

Each template lists the tools and tells the model to answer in its family's format (which is what auto-detection
reads), renders earlier calls that way, and otherwise writes ``<|role|>content`` turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.base import EngineRequest
from server.engine.chartok import CharTokenizer
from server.engine.fake import FakeEngine

_TURNS = (
    "{%- for m in messages -%}<|{{ m.role }}|>{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}{CALL}{% endfor %}\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif -%}"
)

HERMES_TEMPLATE = (
    "{%- if tools %}<|system|>Tools: <tools>{{ tools | tojson }}</tools>. Call one with "
    '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>\n{% endif -%}'
) + _TURNS.replace(
    "{CALL}", "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
)

LLAMA3_TEMPLATE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>Given the following functions, respond with a JSON "
    'for a function call in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}. {{ tools | tojson }}<|eot_id|>\n{% endif -%}"
) + _TURNS.replace("{CALL}", "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}").replace(
    "<|{{ m.role }}|>", "<|{{ 'ipython' if m.role == 'tool' else m.role }}|>"
)

MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]\n{% endif -%}"
) + _TURNS.replace(
    "{%- for c in m.tool_calls or [] %}{CALL}{% endfor %}",
    "{%- if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list | tojson }}{% endif %}",
)

NO_TOOLS_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
"""A template that never mentions tools: the model knows no tool-call format."""


class TemplatedTokenizer(CharTokenizer):
    """The code-point tokenizer, rendering chats through a Jinja template as Transformers does."""

    def __init__(self, template: str) -> None:
        super().__init__()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
        self._template_text = template
        self._template = env.from_string(template)

    @property
    def chat_template(self) -> str | None:
        return self._template_text

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        text = self._template.render(
            messages=[dict(m) for m in messages],
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **dict(chat_template_kwargs or {}),
        )
        return self.encode(text)


def templated_engine(
    template: str, script: Sequence[str] | Callable[[EngineRequest], Sequence[str]] | None = None
) -> FakeEngine:
    """A FakeEngine whose chats render through ``template`` and whose reply is ``script`` (token pieces)."""
    engine = FakeEngine(script)
    engine._tokenizer = TemplatedTokenizer(template)
    return engine
