"""Reasoning models: splitting ``<think>`` blocks off the content, counting their tokens, detecting them."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.openai.chat import ChatCompletionRequest
from server.engine.base import Constraint, EngineDelta
from server.errors import OpenAIError
from server.serving import chat
from server.serving.reasoning import (
    Reasoning,
    ReasoningCounter,
    ReasoningSplitter,
    check_template_kwargs,
    reasoning_for,
    split,
)
from tests.fakes.templates import PLAIN, QWEN3_LIKE, R1_LIKE, TemplateTokenizer, templated_engine

OPEN = Reasoning()
INSIDE = Reasoning(inside=True)


def streamed(pieces: list[str], reasoning: Reasoning) -> tuple[str | None, str | None]:
    """What a stream of ``pieces`` gives, joined like a client joins deltas."""
    splitter = ReasoningSplitter(reasoning)
    segments = [s for p in pieces for s in splitter.push(p)] + splitter.finish()
    thought = "".join(t for r, t in segments if r)
    content = "".join(t for r, t in segments if not r)
    return (thought if splitter.reasoned else None), (content or None if splitter.reasoned else content)


@pytest.mark.parametrize(
    ("text", "reasoning", "expected"),
    [
        ("<think>hm</think>Hi", OPEN, ("hm", "Hi")),
        ("<think>\nhm\n</think>\n\nHi there", OPEN, ("\nhm\n", "Hi there")),
        ("  <think>hm</think>Hi", OPEN, ("hm", "Hi")),
        ("Hi <think>no</think>", OPEN, (None, "Hi <think>no</think>")),
        ("Hello", OPEN, (None, "Hello")),
        ("", OPEN, (None, "")),
        ("<think>cut off", OPEN, ("cut off", None)),
        ("<think>hm</think>", OPEN, ("hm", None)),
        ("<thinking>x", OPEN, (None, "<thinking>x")),
        ("<thi", OPEN, (None, "<thi")),
        ("hm</think>Hi", INSIDE, ("hm", "Hi")),
        ("<think>hm</think>Hi", INSIDE, ("hm", "Hi")),
        ("still thinking", INSIDE, ("still thinking", None)),
        ("a</think>b</think>", INSIDE, ("a", "b</think>")),
        ("</thin", INSIDE, ("</thin", None)),
    ],
)
def test_split_whole_and_streamed_agree(
    text: str, reasoning: Reasoning, expected: tuple[str | None, str | None]
) -> None:
    assert split(text, reasoning) == expected
    assert streamed(list(text), reasoning) == expected  # every marker cut at every character
    assert streamed([text], reasoning) == expected


def test_markers_split_across_pieces_never_leak() -> None:
    splitter = ReasoningSplitter(OPEN)
    assert splitter.push("<th") == []
    assert splitter.push("ink>so") == [(True, "so")]
    assert splitter.push("me </th") == [(True, "me ")]
    assert splitter.push("ink") == []
    assert splitter.push(">\n\n") == []
    assert splitter.push("Hi") == [(False, "Hi")]
    assert splitter.finish() == []


def test_held_back_text_that_is_not_a_marker_is_released() -> None:
    splitter = ReasoningSplitter(OPEN)
    assert splitter.push("<think>a </") == [(True, "a ")]
    assert splitter.push("b>") == [(True, "</b>")]


def deltas(pieces: list[str], finish: str = "stop") -> list[EngineDelta]:
    out = [EngineDelta(token_ids=[i], text=p) for i, p in enumerate(pieces)]
    out.append(EngineDelta(token_ids=[99], text="", finish_reason=finish))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize(
    ("pieces", "reasoning", "count"),
    [
        (["<think>", "hm", "</think>", "Hi"], OPEN, 3),
        (["\n", "<think>", "hm", "</", "think>", "\n\n", "Hi"], OPEN, 5),
        (["<", "think>", "a", "</think>\n\nHi"], OPEN, 4),
        (["Hi", "<think>", "x", "</think>"], OPEN, 0),
        (["Hello"], OPEN, 0),
        (["hm", "</think>", "Hi"], INSIDE, 2),
        (["hm", " more"], INSIDE, 2),  # never closed: every token but EOS
        (["<think>", "hm"], OPEN, 2),
    ],
)
def test_reasoning_tokens_include_the_markers_and_never_eos(
    pieces: list[str], reasoning: Reasoning, count: int
) -> None:
    counter = ReasoningCounter(reasoning)
    for delta in deltas(pieces):
        counter.feed(delta)
    assert counter.count == count


def test_a_row_cut_by_max_tokens_counts_its_last_token() -> None:
    counter = ReasoningCounter(OPEN)
    for delta in [EngineDelta([1], "<think>"), EngineDelta([2], "hm", finish_reason="length")]:
        counter.feed(delta)
    assert counter.count == 2


@pytest.mark.parametrize(
    ("setting", "template", "kwargs", "expected"),
    [
        ("auto", QWEN3_LIKE, None, OPEN),
        ("auto", QWEN3_LIKE, {"enable_thinking": False}, OPEN),  # the prompt closed its block: not inside
        ("auto", R1_LIKE, None, INSIDE),
        ("auto", PLAIN, None, None),
        ("think", PLAIN, None, OPEN),
        ("none", QWEN3_LIKE, None, None),
        ("none", R1_LIKE, None, None),
    ],
)
def test_reasoning_for_reads_the_setting_the_template_and_the_prompt(
    setting: str, template: str, kwargs: dict[str, bool] | None, expected: Reasoning | None
) -> None:
    tok = TemplateTokenizer(template)
    messages = [{"role": "user", "content": "hi"}]
    prompt = tok.render_chat(
        messages, add_generation_prompt=True, continue_final_message=False, chat_template_kwargs=kwargs
    )
    assert reasoning_for(setting, tok, prompt) == expected


def test_a_user_message_ending_in_the_marker_does_not_open_the_reasoning() -> None:
    tok = TemplateTokenizer(QWEN3_LIKE)
    prompt = tok.render_chat(
        [{"role": "user", "content": "say <think>"}], add_generation_prompt=True, continue_final_message=False
    )
    assert reasoning_for("auto", tok, prompt) == OPEN


def test_template_kwargs_may_not_set_the_rendering_arguments() -> None:
    assert check_template_kwargs(None) is None
    assert check_template_kwargs({}) is None
    assert check_template_kwargs({"enable_thinking": False}) == {"enable_thinking": False}
    for key in ("add_generation_prompt", "tokenize", "messages", "tools"):
        with pytest.raises(OpenAIError) as info:
            check_template_kwargs({key: True})
        assert info.value.status == 400 and info.value.param == f"chat_template_kwargs.{key}"


def test_constraint_after_reasoning() -> None:
    base = Constraint('{"type":"object"}')
    assert OPEN.constrain(base) == Constraint(base.json_schema, reasoning_start="<think>", reasoning_end="</think>")
    assert INSIDE.constrain(base) == Constraint(base.json_schema, reasoning_start="", reasoning_end="</think>")


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="fake", messages=[], **fields)  # type: ignore[arg-type]


def test_prepare_hands_the_template_its_kwargs_and_plans_the_split() -> None:
    import msgspec

    engine = templated_engine(QWEN3_LIKE, [])
    body = msgspec.json.decode(
        b'{"model":"fake","messages":[{"role":"user","content":"hi"}],'
        b'"chat_template_kwargs":{"enable_thinking":false}}',
        type=ChatCompletionRequest,
    )
    plan = chat.prepare(engine, body)
    tok = engine.tokenizer
    assert isinstance(tok, TemplateTokenizer)
    assert tok.rendered[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert plan.reasoning == OPEN
    assert chat.prepare(engine, body, reasoning_parser="none").reasoning is None


def test_hf_tokenizer_hands_the_kwargs_to_the_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from server.engine.hf_tokenizer import HFTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf.chat_template = QWEN3_LIKE
    tok = HFTokenizer(hf)
    assert tok.chat_template == QWEN3_LIKE
    messages = [{"role": "user", "content": "hi"}]
    on = tok.render_chat(messages, add_generation_prompt=True, continue_final_message=False)
    off = tok.render_chat(
        messages,
        add_generation_prompt=True,
        continue_final_message=False,
        chat_template_kwargs={"enable_thinking": False},
    )
    assert tok.decode(off).startswith(tok.decode(on)) and tok.decode(off).endswith("<think>\n\n</think>\n\n")
    assert reasoning_for("auto", tok, on) == OPEN
