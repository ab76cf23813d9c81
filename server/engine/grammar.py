"""Grammar-constrained decoding: a :class:`~server.engine.base.Constraint` as an llguidance grammar.

Serving code calls :func:`check` to reject a bad schema with a 400 before a request is queued; it needs no
tokenizer and no torch, so this module imports neither (``llguidance`` itself is a Rust extension). The engine
builds one :class:`GrammarCompiler` per tokenizer and one :class:`RowGrammar` per constrained request; the torch
side (turning a row's state into a logits mask) lives in :mod:`server.engine.grammar_mask`.

JSON is compact (llguidance's ``whitespace_flexible: false``): no whitespace between tokens, so a model cannot
wander off into endless blanks and the output is deterministic apart from its values. Object properties come in
the order the schema lists them, as OpenAI's strict mode does.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Final

import llguidance

from server.engine.base import Constraint, EngineError

logger = logging.getLogger("server.engine")

MAX_SCHEMA_BYTES: Final = 64 * 1024
"""Largest accepted ``json_schema`` text (UTF-8 bytes): compile time and grammar size grow with it."""

_MAX_MESSAGE: Final = 400
# Errors name the schema, not the parser state: llguidance's verbose errors dump the grammar (user data) into logs.
_LIMITS: Final = llguidance.LLParserLimits(verbose_errors=False)
_CACHE_SIZE: Final = 128


class GrammarError(ValueError):
    """A constraint cannot be compiled; the message is a sentence fit for the client (a 400 error)."""


class GrammarViolation(EngineError, RuntimeError):
    """A row consumed a token its grammar forbids: the mask was not applied (an engine bug, not the client's)."""


def _json_options(lenient: bool) -> dict[str, Any]:
    # Replaces any client-supplied "x-guidance": whitespace and leniency are the server's decision.
    return {"whitespace_flexible": False, "lenient": lenient}


def _schema(constraint: Constraint) -> dict[str, Any]:
    """The constraint's schema as an object with the server's llguidance options, or :class:`GrammarError`."""
    if len(constraint.json_schema.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"The JSON schema is too large: at most {MAX_SCHEMA_BYTES // 1024} KiB are accepted.")
    try:
        schema = json.loads(constraint.json_schema)
    except (ValueError, RecursionError) as exc:
        raise GrammarError(f"The JSON schema is not valid JSON: {_clean(str(exc))}.") from exc
    if not isinstance(schema, dict):
        raise GrammarError("The JSON schema must be a JSON object.")
    schema["x-guidance"] = _json_options(constraint.lenient)
    return schema


def _literal(text: str, special_tokens: Mapping[str, int]) -> str:
    """Lark for the literal ``text``, or ``""`` when it is empty.

    llguidance treats every added token spelled ``<...>`` as a special token that a quoted string cannot match,
    but models emit such tokens (Qwen's ``<tool_call>``) for their framing: each occurrence of one accepts the
    token itself or its spelling in bytes.
    """
    if not text:
        return ""
    if not special_tokens:
        return _quote(text)
    pattern = "|".join(re.escape(tok) for tok in sorted(special_tokens, key=len, reverse=True))
    parts: list[str] = []
    pos = 0
    for match in re.finditer(pattern, text):
        if match.start() > pos:
            parts.append(_quote(text[pos : match.start()]))
        parts.append(f"({_quote(match.group())} | <[{special_tokens[match.group()]}]>)")
        pos = match.end()
    if pos < len(text):
        parts.append(_quote(text[pos:]))
    return " ".join(parts)


def _quote(text: str) -> str:
    # llguidance decodes Lark string literals as JSON strings, so json.dumps escapes them exactly.
    return json.dumps(text)


def grammar_text(constraint: Constraint, *, special_tokens: Mapping[str, int] | None = None) -> str:
    """The llguidance (Lark) grammar of ``constraint``: its literals around an embedded ``%json`` schema.

    Args:
        constraint: What the output must look like.
        special_tokens: Added tokens (content -> id) llguidance treats as special although the tokenizer does not
            (:class:`GrammarCompiler` finds them); where one occurs in a literal, the token also matches.

    Raises:
        GrammarError: the schema is not a JSON object, is too large, or the item counts make no sense.
    """
    return _grammar_text(constraint, tuple(sorted((special_tokens or {}).items())))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _grammar_text(constraint: Constraint, special_tokens: tuple[tuple[str, int], ...]) -> str:
    _check_counts(constraint)
    specials = dict(special_tokens)
    lo, hi = constraint.min_items, constraint.max_items
    item = " ".join(
        p for p in (_literal(constraint.prefix, specials), "value", _literal(constraint.suffix, specials)) if p
    )
    body = "item"
    if hi is None or hi > 1:
        more = f"{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        sep = _literal(constraint.separator, specials)
        body += f" ({sep} item){more}" if sep else f" item{more}"
    start = f"({body})?" if lo == 0 else body
    schema = json.dumps(_schema(constraint), separators=(",", ":"))
    reasoning = _reasoning_rules(constraint, specials)
    if reasoning:
        start = f"reasoning ({start})" if lo == 0 else f"reasoning {start}"
    return f"%llguidance {{}}\nstart: {start}\nitem: {item}\nvalue: %json {schema}\n{reasoning}"


def _reasoning_rules(constraint: Constraint, specials: Mapping[str, int]) -> str:
    """Lark rules of a reasoning model's free text before the constrained part, or ``""`` without one.

    ``think_text`` is lazy: it ends at the first end marker spelled in bytes, so the reasoning cannot run on past
    it. Where the end marker is an added token, the token itself also ends the free text (a regex never matches a
    special token, so the free text cannot contain it). Whitespace may follow the marker, as models write it.
    """
    end = constraint.reasoning_end
    if not end:
        return ""
    rules = [f"think_text[lazy]: /(.|\\n)*/ {_quote(end)}", "think_gap: /[ \\t\\r\\n]*/"]
    if end in specials:
        rules += [f"think: think_text | think_free <[{specials[end]}]>", "think_free: /(.|\\n)*/"]
    else:
        rules.append("think: think_text")
    if constraint.reasoning_start:
        rules.insert(0, f"reasoning: ({_literal(constraint.reasoning_start, specials)} think think_gap)?")
    else:
        rules.insert(0, "reasoning: think think_gap")
    return "".join(rule + "\n" for rule in rules)


def _check_counts(constraint: Constraint) -> None:
    lo, hi = constraint.min_items, constraint.max_items
    if lo < 0 or (hi is not None and hi < max(lo, 1)):
        raise GrammarError(f"Invalid item counts: min_items={lo}, max_items={hi}.")


def check(constraint: Constraint) -> None:
    """Reject ``constraint`` unless it compiles, without a tokenizer (fast; repeated schemas hit a cache).

    A strict constraint (``lenient=False``) is also rejected when its schema uses keywords or formats llguidance
    cannot enforce; a lenient one ignores them (or, for a few, enforces a stricter approximation).

    Raises:
        GrammarError: the schema is invalid, unsupported under strict, too large, or the item counts make no sense.
    """
    _check_counts(constraint)
    message = _schema_error(constraint.json_schema, constraint.lenient)
    if message is not None:
        raise GrammarError(message)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _schema_error(json_schema: str, lenient: bool) -> str | None:
    """The client-facing reason ``json_schema`` cannot be used, or None (cached: clients repeat their schemas)."""
    try:
        schema = _schema(Constraint(json_schema=json_schema, lenient=lenient))
    except GrammarError as exc:
        return str(exc)
    failed, messages = _validate(schema)
    if not failed and (lenient or not messages):
        return None
    detail = "; ".join(_clean(m) for m in messages)
    if not lenient:
        schema["x-guidance"] = _json_options(True)
        if not _validate(schema)[0]:
            return (
                f"The JSON schema uses features that strict mode cannot enforce ({detail}); "
                'remove them, or set "strict": false to have them ignored or loosened.'
            )
    return f"The JSON schema is invalid or unsupported: {detail}."


def _validate(schema: dict[str, Any]) -> tuple[bool, list[str]]:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    except ValueError as exc:
        return True, [str(exc)]
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_LIMITS)
    return failed, list(messages)


def _clean(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


class RowGrammar:
    """One constrained request's position in its grammar.

    Call :meth:`consume` with every token the row generates, EOS included. Its mask (see
    :func:`server.engine.grammar_mask.apply_masks`) allows EOS only where the grammar is complete, and only EOS once
    :attr:`is_stopped`.
    """

    __slots__ = ("_eos", "_matcher", "vocab_size")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids
        self.vocab_size = vocab_size
        """Ids the mask covers; logits at or beyond it are always forbidden."""

    @property
    def matcher(self) -> llguidance.LLMatcher:
        """The llguidance state (for mask computation)."""
        return self._matcher

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and cannot grow: only EOS may follow (also true after EOS or an error)."""
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The text so far is complete (EOS is allowed), though it may still grow (e.g. another item)."""
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str | None:
        """Why the grammar failed (a parser limit hit while computing a mask), or None; its mask is EOS only."""
        return _clean(self._matcher.get_error()) if self._matcher.is_error() else None

    def consume(self, token_id: int) -> None:
        """Advance past ``token_id``, which the row's last mask must have allowed.

        Raises:
            GrammarViolation: the grammar forbids ``token_id`` here.
        """
        if token_id in self._eos and self._matcher.is_error():
            # A grammar that failed (a parser limit) masks all but EOS: the row ends here, its output incomplete.
            logger.warning("grammar failed, ending the row: %s", self.error)
            return
        if not 0 <= token_id < self.vocab_size or not self._matcher.consume_token(token_id):
            raise GrammarViolation(f"token {token_id} is not allowed by the grammar: {self.error or 'out of range'}")


def _spelled_specials(tokenizer: Any, vocab_size: int) -> dict[str, int]:
    """Added tokens spelled ``<...>`` that the tokenizer does not call special but llguidance does (see _literal).

    Truly special tokens are left out: decoding skips them, so the text would lose the framing they stand for.
    """
    found: dict[str, int] = {}
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(token.content)
        if not token.special and content.startswith("<") and content.endswith(">") and token_id < vocab_size:
            found[content] = int(token_id)
    return found


class GrammarCompiler:
    """Makes :class:`RowGrammar` objects for one tokenizer (building the llguidance tokenizer takes a while).

    Args:
        tokenizer: A fast Transformers tokenizer (``PreTrainedTokenizerFast``/``TokenizersBackend``).
        vocab_size: Ids the sampler may pick (``len(tokenizer)``): the width of a row's mask.
        eos_token_ids: Every id that ends generation; all of them are allowed where the grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        import llguidance.hf  # imports transformers: only the engine, which has it loaded already, gets here

        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("constrained decoding needs at least one EOS token id")
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=sorted(self.eos_token_ids)
        )
        self._specials = _spelled_specials(tokenizer, vocab_size)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint) -> RowGrammar:
        """A fresh grammar state for one request.

        Compiled grammars are cached per grammar text, so a repeated schema costs a copy, not a compile.

        Raises:
            GrammarError: the constraint is invalid (see :func:`check`).
        """
        check(constraint)
        text = grammar_text(constraint, special_tokens=self._specials)
        with self._lock:
            pristine = self._cache.get(text)
            if pristine is not None:
                self._cache.move_to_end(text)
        if pristine is None:
            pristine = llguidance.LLMatcher(self._tokenizer, text, log_level=0, limits=_LIMITS)
            if pristine.is_error():
                raise GrammarError(f"The JSON schema cannot be compiled: {_clean(pristine.get_error())}.")
            with self._lock:
                self._cache[text] = pristine
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return RowGrammar(pristine.deep_copy(), self.vocab_size, self.eos_token_ids)
