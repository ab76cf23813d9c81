"""Chat templates written for the tests, one per tool-call family, and a FakeEngine that renders them.

They render through :class:`tests.fakes.templates.TemplateTokenizer` with Jinja's trimmed blocks.

Each template lists the tools and tells the model to answer in its family's format (which is what auto-detection
reads), renders earlier calls that way, and otherwise writes ``<|role|>content`` turns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from server.engine.base import EngineRequest
from server.engine.fake import FakeEngine
from tests.fakes.templates import templated_engine as template_engine

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


def templated_engine(
    template: str, script: Sequence[str] | Callable[[EngineRequest], Sequence[str]] | None = None
) -> FakeEngine:
    """A FakeEngine whose chats render through ``template`` (trimmed blocks) and whose reply is ``script``."""
    return template_engine(template, script, trim_blocks=True)
