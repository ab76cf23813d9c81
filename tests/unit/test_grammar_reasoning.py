"""A constraint applies after a reasoning model's ``<think>`` block, not to it (llguidance on the tiny tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from server.engine.base import Constraint
from server.engine.grammar import GrammarCompiler, RowGrammar

SCHEMA = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}'
OPEN = Constraint(SCHEMA, reasoning_start="<think>", reasoning_end="</think>")
INSIDE = Constraint(SCHEMA, reasoning_end="</think>")  # the prompt opened the reasoning


def load(folder: Path, *, think_tokens: bool) -> tuple[Any, GrammarCompiler]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if think_tokens:  # Qwen3 and the R1 distills have them as single (non-special) added tokens
        tokenizer.add_tokens(["<think>", "</think>"])
    eos = frozenset({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    return tokenizer, GrammarCompiler(tokenizer, len(tokenizer), eos)


@pytest.fixture(scope="module", params=[False, True], ids=["spelled", "added-tokens"])
def loaded(tiny_model_dir: Path, request: pytest.FixtureRequest) -> tuple[Any, GrammarCompiler]:
    return load(tiny_model_dir, think_tokens=request.param)


def takes(tokenizer: Any, row: RowGrammar, text: str) -> bool:
    """The grammar takes all of ``text`` and may end there."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return bool(row.matcher.try_consume_tokens(ids) == len(ids)) and row.is_accepting


@pytest.mark.parametrize(
    "text",
    [
        '<think>free text: {not json} "quotes" </thin\n</think>{"a":1}',
        '<think>\nhm\n</think>\n\n{"a":1}',
        "<think></think>" + '{"a":2}',
        '{"a":3}',  # no reasoning at all (enable_thinking=False): the schema alone
    ],
)
def test_free_reasoning_then_the_schema(loaded: tuple[Any, GrammarCompiler], text: str) -> None:
    tokenizer, compiler = loaded
    row = compiler.matcher(OPEN)
    assert takes(tokenizer, row, text)
    assert row.is_stopped


@pytest.mark.parametrize(
    "text",
    [
        '<think>hm</think>garbage{"a":1}',
        '<think>hm</think>{"b":1}',
        '<think>a</think>b</think>{"a":1}',  # the reasoning ends at its first end marker
        'hm</think>{"a":1}',  # not inside: the block must open first
        '<think>hm{"a":1}',  # never closed
        'x{"a":1}',
    ],
)
def test_anything_else_is_refused(loaded: tuple[Any, GrammarCompiler], text: str) -> None:
    tokenizer, compiler = loaded
    assert not takes(tokenizer, compiler.matcher(OPEN), text)


def test_output_that_begins_inside_the_reasoning_must_close_it(loaded: tuple[Any, GrammarCompiler]) -> None:
    tokenizer, compiler = loaded
    assert takes(tokenizer, compiler.matcher(INSIDE), 'hm {"a":0} </think>\n{"a":1}')
    assert takes(tokenizer, compiler.matcher(INSIDE), '</think>{"a":1}')
    assert not takes(tokenizer, compiler.matcher(INSIDE), '{"a":1}')
    assert not takes(tokenizer, compiler.matcher(INSIDE), 'hm</think>{"a":1} more')


def test_the_end_marker_may_be_one_added_token_or_spelled_in_pieces(tiny_model_dir: Path) -> None:
    tokenizer, compiler = load(tiny_model_dir, think_tokens=True)
    ids = tokenizer.encode('<think>hm</think>{"a":1}', add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<think>")
    row = compiler.matcher(OPEN)
    assert row.matcher.try_consume_tokens(ids) == len(ids) and row.is_stopped
    spelled = compiler.matcher(OPEN)
    for piece in ["<", "think", ">", "hm", "</", "think", ">", '{"a":1}']:
        assert spelled.matcher.try_consume_tokens(tokenizer.encode(piece, add_special_tokens=False)) > 0
    assert spelled.is_stopped


def test_tool_call_framing_follows_the_reasoning(loaded: tuple[Any, GrammarCompiler]) -> None:
    tokenizer, compiler = loaded
    tools = Constraint(
        SCHEMA,
        prefix="<tool_call>\n",
        suffix="\n</tool_call>",
        max_items=None,
        reasoning_start="<think>",
        reasoning_end="</think>",
    )
    assert takes(tokenizer, compiler.matcher(tools), '<think>x</think>\n<tool_call>\n{"a":1}\n</tool_call>')
    assert not takes(tokenizer, compiler.matcher(tools), '<think>x</think>\n{"a":1}')
