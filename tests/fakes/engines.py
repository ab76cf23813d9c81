"""Variations on the FakeEngine that more than one test module needs."""

from __future__ import annotations

from server.engine.chartok import CharTokenizer
from server.engine.fake import FakeEngine


class NoChatTemplate(CharTokenizer):
    """A tokenizer of a base model: no chat template, so only raw prompts can be served."""

    @property
    def has_chat_template(self) -> bool:
        return False


def without_chat_template() -> FakeEngine:
    """A FakeEngine whose tokenizer has no chat template."""
    engine = FakeEngine()
    engine._tokenizer = NoChatTemplate()
    return engine
