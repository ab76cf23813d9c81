"""Every error code the server can answer with has a row in the errors table of docs/REFERENCE.md.

The codes are read from the source: ``code=`` arguments, the third argument of ``invalid_request`` and the code
of a request head refused before routing. A new code without a row fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "REFERENCE.md"


def strings(node: ast.expr | None) -> Iterator[str]:
    """A string constant, or both branches of ``"a" if ... else "b"``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from strings(node.body)
        yield from strings(node.orelse)


def codes_in(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg == "code":
                found.update(strings(keyword.value))
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name == "invalid_request" and len(node.args) >= 3:
            found.update(strings(node.args[2]))
        if name == "_refuse" and len(node.args) >= 2:
            found.update(strings(node.args[1]))
    return found


def server_codes() -> set[str]:
    return {code for path in (ROOT / "server").rglob("*.py") for code in codes_in(path.read_text(encoding="utf-8"))}


def errors_section() -> str:
    text = REFERENCE.read_text(encoding="utf-8")
    return text[text.index("\n## Errors\n") : text.index("\n## Headers\n")]


def test_every_error_code_is_documented() -> None:
    section = errors_section()
    codes = server_codes()
    assert {"invalid_api_key", "context_length_exceeded", "request_header_fields_too_large"} <= codes
    assert sorted(c for c in codes if f"`{c}`" not in section) == []


def test_codes_are_read_from_each_form() -> None:
    source = """
invalid_request("m", "p", "empty_array")
invalid_request("m", "p")
OpenAIError(503, "server_error", "m", code="model_failed" if broken else "model_not_ready")
self._refuse(431, "too_large", message)
"""
    assert codes_in(source) == {"empty_array", "model_failed", "model_not_ready", "too_large"}
