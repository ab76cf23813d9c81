"""Grammar-constrained decoding: llguidance grammars, validation and logits masks on the tiny model's tokenizer.

Random logits stand in for a model: whatever they favour, a masked row must produce text the constraint accepts
and then end with EOS.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.base import Constraint
from server.engine.grammar import (
    MAX_SCHEMA_BYTES,
    GrammarCompiler,
    GrammarError,
    GrammarViolation,
    RowGrammar,
    check,
    grammar_text,
)
from server.engine.grammar_mask import apply_masks, forbidden_tokens

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", None, 3]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "ok", "color", "tags", "address"],
    "additionalProperties": False,
}
SMALL_SCHEMA = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}'


def tool_calls(max_items: int | None) -> Constraint:
    return Constraint(
        SMALL_SCHEMA, prefix="<tool_call>\n", suffix="\n</tool_call>", separator="\n", max_items=max_items
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def eos_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"), 0})


@pytest.fixture(scope="module")
def compiler(tokenizer: Any, eos_ids: frozenset[int]) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), eos_ids)


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> None:
    """Just enough JSON Schema for NESTED_SCHEMA (jsonschema is not a dependency)."""
    if "enum" in schema:
        assert any(value == e and type(value) is type(e) for e in schema["enum"]), f"{path}: {value!r} not in enum"
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool}
    kind = schema.get("type")
    if kind == "integer":
        assert type(value) is int, f"{path}: {value!r} is not an integer"
    elif kind is not None:
        assert type(value) is kinds[kind], f"{path}: {value!r} is not a {kind}"
    if kind == "object":
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= value.keys(), f"{path}: missing keys in {value!r}"
        if schema.get("additionalProperties") is False:
            assert value.keys() <= props.keys(), f"{path}: extra keys in {value!r}"
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub, f"{path}.{key}")
    if kind == "array":
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{path}[{i}]")


def outside_strings(text: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


def sample_batch(
    tokenizer: Any, eos_ids: frozenset[int], rows: list[RowGrammar], seed: int, max_steps: int = 4000
) -> list[str]:
    """Decode every row with random logits through the masks until each samples EOS; return their texts."""
    generator = torch.Generator().manual_seed(seed)
    tokens: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    for _ in range(max_steps):
        logits = torch.randn(len(live), len(tokenizer), generator=generator)
        apply_masks(logits, [rows[i] for i in live])
        picks = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).flatten().tolist()
        for i, token in zip(live, picks, strict=True):
            rows[i].consume(token)
            if token not in eos_ids:
                tokens[i].append(token)
            else:
                assert rows[i].is_stopped
        live = [i for i, token in zip(live, picks, strict=True) if token not in eos_ids]
        if not live:
            return [tokenizer.decode(t) for t in tokens]
    raise AssertionError(f"rows {live} did not finish in {max_steps} steps")


def consume_text(tokenizer: Any, row: RowGrammar, text: str) -> bool:
    """Feed the tokenizer's own encoding of ``text``; whether the grammar took all of it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return bool(row.matcher.try_consume_tokens(ids) == len(ids))


def allowed(row: RowGrammar) -> set[int]:
    return set((~forbidden_tokens([row])[0]).nonzero().flatten().tolist())


# --- (a) random decoding stays inside the schema ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_random_decoding_produces_json_objects(
    tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler, seed: int
) -> None:
    rows = [compiler.matcher(Constraint('{"type": "object"}')) for _ in range(8)]
    for text in sample_batch(tokenizer, eos_ids, rows, seed):
        assert isinstance(json.loads(text), dict)
        assert not re.search(r"\s", outside_strings(text)), text  # compact: no whitespace between tokens


@pytest.mark.parametrize("seed", range(3))
def test_random_decoding_follows_a_strict_nested_schema(
    tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler, seed: int
) -> None:
    rows = [compiler.matcher(Constraint(json.dumps(NESTED_SCHEMA))) for _ in range(8)]
    for text in sample_batch(tokenizer, eos_ids, rows, 100 + seed):
        value = json.loads(text)
        validate(value, NESTED_SCHEMA)
        assert list(value) == list(NESTED_SCHEMA["properties"])  # properties in schema order
        assert not re.search(r"\s", outside_strings(text)), text


# --- (a') compact at every step: no whitespace token outside strings -------------------------------------------

COMPACT = {"a": [1, -2.5e3, True, None, {"b": "x y\n\t"}], "c": {}, "d": [], "e": "", "f": [[], [{}]], "g": 0.5}
COMPACT_SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "array"},
        "c": {"type": "object"},
        "d": {"type": "array", "items": {"type": "integer"}},
        "e": {"type": "string"},
        "f": {"type": "array", "items": {"type": "array"}},
        "g": {"type": "number"},
    },
    "required": ["a", "c", "d", "e", "f", "g"],
    "additionalProperties": False,
}


def free_whitespace(texts: list[str], allowed_ids: set[int], in_string: bool, expected: str) -> list[str]:
    """Allowed tokens that would put whitespace outside a JSON string where ``expected`` (the text to come) has none.

    ``in_string`` is the lexer state before the token; whitespace inside strings is content, and whitespace that the
    grammar's own literals spell (the framing's newlines) matches ``expected`` at the same offset.
    """
    bad = []
    for token in allowed_ids:
        inside, escaped = in_string, False
        for j, ch in enumerate(texts[token]):
            if inside:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    inside = False
            elif ch == '"':
                inside = True
            elif ch.isspace() and (j >= len(expected) or expected[j] != ch):
                bad.append(texts[token])
                break
    return bad


CASES = {
    "json_object": (Constraint('{"type":"object"}'), "", ""),
    "json_object_lenient": (Constraint('{"type":"object"}', lenient=True), "", ""),
    "json_schema_strict": (Constraint(json.dumps(COMPACT_SCHEMA)), "", ""),
    "json_schema_lenient": (Constraint(json.dumps(COMPACT_SCHEMA), lenient=True), "", ""),
    "tools": (
        Constraint('{"type":"object"}', lenient=True, prefix="<tool_call>\n", suffix="\n</tool_call>", max_items=None),
        "<tool_call>\n{}\n</tool_call>\n<tool_call>\n",
        "\n</tool_call>",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_whitespace_token_is_allowed_outside_strings_at_any_step(
    tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler, case: str
) -> None:
    """Walk a compact value character by character; at every step outside a string, check every allowed token."""
    constraint, before, after = CASES[case]
    compact = json.dumps(COMPACT, separators=(",", ":"))
    text = before + compact + after
    # What may follow the text: the next item's framing (unbounded items), or nothing but EOS.
    tail = "\n<tool_call>\n" if constraint.max_items is None else ""
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    assert sum(1 for t in texts if t and not t.strip()) >= 20  # the vocabulary has whitespace-only tokens to offer
    row = compiler.matcher(constraint)
    in_string, escaped, whitespace_in_strings = False, False, 0
    for k in range(len(text) + 1):
        ids = allowed(row) - eos_ids
        if in_string:
            whitespace_in_strings += any(not texts[t].strip() for t in ids)
        else:
            assert not free_whitespace(texts, ids, False, (text + tail)[k:]), (case, text[:k])
        if k == len(text):
            break
        ch = text[k]
        (token,) = tokenizer.encode(ch, add_special_tokens=False)
        row.consume(token)
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        else:
            in_string = ch == '"'
    assert whitespace_in_strings  # inside strings whitespace is content, and the check above would have seen it
    assert row.is_accepting


# --- (b) framing: prefix, suffix, separator, item counts ------------------------------------------------------


def test_unbounded_tool_calls_are_framed(tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler) -> None:
    constraint = tool_calls(None)
    texts = sample_batch(tokenizer, eos_ids, [compiler.matcher(constraint) for _ in range(16)], seed=7)
    item = r"<tool_call>\n(\{[^\n]*\})\n</tool_call>"
    for text in texts:
        assert re.fullmatch(rf"{item}(\n{item})*", text), text
        for value in re.findall(item, text):
            assert type(json.loads(value)["a"]) is int
    assert any(text.count("<tool_call>") > 1 for text in texts)  # several items do occur


def test_single_tool_call_stops_after_its_suffix(
    tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler
) -> None:
    constraint = tool_calls(1)
    for text in sample_batch(tokenizer, eos_ids, [compiler.matcher(constraint) for _ in range(8)], seed=3):
        assert re.fullmatch(r'<tool_call>\n\{"a":-?\d+\}\n</tool_call>', text), text

    row = compiler.matcher(constraint)
    assert consume_text(tokenizer, row, '<tool_call>\n{"a":1}\n</tool_call')
    assert not row.is_stopped and not row.is_accepting and not allowed(row) & eos_ids
    assert consume_text(tokenizer, row, ">")
    assert row.is_stopped and allowed(row) == eos_ids  # every EOS id, nothing else
    row.consume(min(eos_ids))
    assert row.is_stopped


def test_unbounded_items_allow_eos_or_another_item(
    tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler
) -> None:
    row = compiler.matcher(tool_calls(None))
    assert consume_text(tokenizer, row, '<tool_call>\n{"a":1}\n</tool_call>')
    assert row.is_accepting and not row.is_stopped
    assert eos_ids <= allowed(row)
    assert consume_text(tokenizer, row, '\n<tool_call>\n{"a":2}\n</tool_call>')
    row.consume(max(eos_ids))
    assert row.is_stopped


def test_min_items_holds_back_eos(tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler) -> None:
    row = compiler.matcher(Constraint(SMALL_SCHEMA, separator=",", min_items=2, max_items=3))
    assert consume_text(tokenizer, row, '{"a":1}')
    assert not allowed(row) & eos_ids
    assert consume_text(tokenizer, row, ',{"a":2}')
    assert eos_ids <= allowed(row) and not row.is_stopped
    assert consume_text(tokenizer, row, ',{"a":3}')
    assert row.is_stopped


def test_zero_items_allow_eos_at_once(tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler) -> None:
    row = compiler.matcher(Constraint(SMALL_SCHEMA, min_items=0, max_items=2))
    assert row.is_accepting and eos_ids <= allowed(row)
    assert consume_text(tokenizer, row, '{"a":1}\n{"a":2}')
    assert row.is_stopped


def test_literals_are_escaped(tokenizer: Any, compiler: GrammarCompiler) -> None:
    prefix = 'say "hi" \\ \t%json {"x": 1} <b>é😀 //'
    constraint = Constraint('{"type":"integer"}', prefix=prefix, suffix="\n}\"'")
    assert consume_text(tokenizer, compiler.matcher(constraint), prefix + "42\n}\"'")
    assert not consume_text(tokenizer, compiler.matcher(constraint), prefix.replace("\\", "/") + "42")


def test_tool_call_tokens_may_be_single_added_tokens(tiny_model_dir: Path, eos_ids: frozenset[int]) -> None:
    # Models like Qwen emit <tool_call> as one (non-special) added token; llguidance alone would demand its bytes.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    compiler = GrammarCompiler(tokenizer, len(tokenizer), eos_ids)
    constraint = tool_calls(1)
    ids = tokenizer.encode('<tool_call>\n{"a":1}\n</tool_call>', add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<tool_call>")
    row = compiler.matcher(constraint)
    assert row.matcher.try_consume_tokens(ids) == len(ids) and row.is_stopped
    spelled = compiler.matcher(constraint)
    pieces = ["<", "tool", "_call", ">\n", '{"a":1}', "\n</", "tool", "_call", ">"]
    for piece in pieces:
        assert spelled.matcher.try_consume_tokens(tokenizer.encode(piece, add_special_tokens=False)) > 0
    assert spelled.is_stopped


# --- EOS and violations -----------------------------------------------------------------------------------------


def test_eos_only_once_the_value_is_complete(
    tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler
) -> None:
    row = compiler.matcher(Constraint('{"type": "object"}'))
    assert all(tokenizer.decode([t]).startswith("{") for t in allowed(row))
    with pytest.raises(GrammarViolation):
        row.consume(min(eos_ids))
    row = compiler.matcher(Constraint('{"type": "object"}'))
    assert consume_text(tokenizer, row, '{"k":[1,true,null]')
    assert not row.is_stopped and not allowed(row) & eos_ids
    assert consume_text(tokenizer, row, "}")
    assert row.is_stopped and allowed(row) == eos_ids


def test_forbidden_tokens_raise(tokenizer: Any, compiler: GrammarCompiler) -> None:
    row = compiler.matcher(Constraint('{"type": "object"}'))
    letter = tokenizer.encode("a", add_special_tokens=False)[0]
    with pytest.raises(GrammarViolation, match=f"token {letter}") as info:
        row.consume(letter)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(GrammarViolation):
        compiler.matcher(Constraint('{"type": "object"}')).consume(len(tokenizer) + 5)


def test_client_x_guidance_cannot_loosen_whitespace(tokenizer: Any, compiler: GrammarCompiler) -> None:
    schema = '{"type": "object", "x-guidance": {"whitespace_flexible": true}}'
    assert not consume_text(tokenizer, compiler.matcher(Constraint(schema)), '{ "a": 1 }')
    assert consume_text(tokenizer, compiler.matcher(Constraint(schema)), '{"a":1}')


# --- (c) check ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "object"', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "objec"}', "objec"),
        ('{"type": "integer", "minimum": 5, "maximum": 1}', "minimum"),
        ('{"type": "string", "pattern": "(?=a)b"}', "look-around"),
        ('{"$ref": "https://example.com/schema.json"}', "example.com"),
    ],
)
def test_check_rejects_invalid_schemas(schema: str, message: str) -> None:
    for lenient in (False, True):
        with pytest.raises(GrammarError, match=re.escape(message)):
            check(Constraint(schema, lenient=lenient))


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}, "else": {"type": "integer"}}, "if"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "string", "format": "x-custom"}, "x-custom"),
        ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "oneOf"),
        ({"type": "object", "properties": {"a": {}}, "minProperties": 1}, "min/maxProperties"),
    ],
)
def test_strict_rejects_what_it_cannot_enforce_and_lenient_ignores_it(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(keyword)) as info:
        check(Constraint(json.dumps(schema)))
    assert '"strict": false' in str(info.value)
    check(Constraint(json.dumps(schema), lenient=True))


@pytest.mark.parametrize(
    "schema",
    [
        NESTED_SCHEMA,
        {"type": "string", "format": "email"},
        {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 5},
        {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.25},
        {"type": "object", "patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False},
        {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
        {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "t", "description": "d", "default": None},
    ],
)
def test_strict_accepts_what_it_enforces(schema: dict[str, Any]) -> None:
    check(Constraint(json.dumps(schema)))


def test_check_caps_schema_size() -> None:
    big = json.dumps({"type": "object", "description": "x" * MAX_SCHEMA_BYTES})
    with pytest.raises(GrammarError, match="too large"):
        check(Constraint(big, lenient=True))


@pytest.mark.parametrize(("low", "high"), [(-1, 1), (2, 1), (0, 0)])
def test_check_rejects_bad_item_counts(low: int, high: int | None) -> None:
    with pytest.raises(GrammarError, match="item counts"):
        check(Constraint('{"type": "object"}', min_items=low, max_items=high))


def test_compiler_rejects_what_check_rejects(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.matcher(Constraint('{"type": "array", "uniqueItems": true}'))


def test_grammar_text_is_lark_with_the_schema_embedded() -> None:
    text = grammar_text(Constraint('{"type":"integer"}', prefix="<a>", suffix="", max_items=None, separator=""))
    assert 'item: "<a>" value\n' in text
    assert "start: item item{0,}\n" in text
    assert '"whitespace_flexible":false' in text


def test_grammar_module_imports_no_torch() -> None:
    code = (
        "import sys, server.engine.grammar; print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- (d) masks on a batch -------------------------------------------------------------------------------------


def test_masks_touch_only_constrained_rows(tokenizer: Any, eos_ids: frozenset[int], compiler: GrammarCompiler) -> None:
    vocab = len(tokenizer)
    grammar = compiler.matcher(Constraint('{"type": "object"}'))
    done = compiler.matcher(Constraint('{"type": "object"}'))
    assert consume_text(tokenizer, done, "{}")
    rows: list[RowGrammar | None] = [None, grammar, None, done]
    logits = torch.randn(4, vocab + 64, generator=torch.Generator().manual_seed(0))  # a padded embedding matrix
    before = logits.clone()
    apply_masks(logits, rows)
    for i in (0, 2):
        assert torch.equal(logits[i], before[i])
    for i, row in ((1, grammar), (3, done)):
        assert row is not None
        ok = torch.tensor(sorted(allowed(row)))
        assert torch.equal(logits[i, ok], before[i, ok])
        assert torch.isinf(logits[i]).sum() == vocab + 64 - len(ok)
    assert set(torch.isfinite(logits[3]).nonzero().flatten().tolist()) == eos_ids
    assert torch.isinf(logits[1, vocab:]).all()


def test_masks_on_a_fully_constrained_batch_match_row_by_row(tokenizer: Any, compiler: GrammarCompiler) -> None:
    rows = [compiler.matcher(Constraint(json.dumps(NESTED_SCHEMA))) for _ in range(3)]
    assert consume_text(tokenizer, rows[1], '{"name":"x","age":')
    assert consume_text(tokenizer, rows[2], '{"name":"x","age":1,"ok":')
    logits = torch.zeros(3, len(tokenizer))
    apply_masks(logits, rows)
    for i, row in enumerate(rows):
        assert set(torch.isfinite(logits[i]).nonzero().flatten().tolist()) == allowed(row)
    texts = [tokenizer.decode([t]) for t in allowed(rows[2])]
    assert texts and all(any(w.startswith(t) or t.startswith(w) for w in ("true", "false")) for t in texts)
