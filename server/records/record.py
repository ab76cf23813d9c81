"""One ``/v1`` request's row in the request log, filled as the request goes and queued when it ends."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    """What one ``/v1`` request did; ``done`` once it has been queued."""

    request_id: str
    route: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    model: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    finish_reason: str | None = None
    cached: bool = False
    usage_estimated: bool = False
    error_type: str | None = None
    prompt_text: str | None = None
    output_text: str | None = None
    streaming: bool = False
    done: bool = False

    def end(
        self,
        *,
        completion_tokens: int,
        cached: bool,
        finish_reasons: Iterable[str | None],
        ok: bool,
        output_text: str | None,
    ) -> None:
        """Note how a generation request ended (``ok``: every choice finished; else ``cancelled`` unless an error
        was noted); several different finish reasons are logged as ``mixed``."""
        self.completion_tokens = completion_tokens
        self.cached = cached
        finishes = {f for f in finish_reasons if f}
        self.finish_reason = finishes.pop() if len(finishes) == 1 else ("mixed" if finishes else None)
        if not ok and self.error_type is None:
            self.error_type = "cancelled"
        if output_text is not None:
            self.output_text = output_text
        if self.streaming:
            self.status = self.status or 200

    def first_token(self) -> None:
        """Note the time to the first token (once)."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000

    def row(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "key_id": self.key_id,
            "model": self.model,
            "route": self.route,
            "method": self.method,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "ttft_ms": self.ttft_ms,
            "finish_reason": self.finish_reason,
            "cached": self.cached,
            "usage_estimated": self.usage_estimated,
            "error_type": self.error_type,
            "prompt_text": self.prompt_text,
            "output_text": self.output_text,
            "created_at": datetime.now(UTC),
        }
