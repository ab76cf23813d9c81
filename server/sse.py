"""Server-Sent Events framing: every frame is exactly ``data: <json>\\n\\n``; the stream ends with ``[DONE]``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from schemas.openai.errors import ErrorResponse

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encoder = msgspec.json.Encoder()


def frame(event: msgspec.Struct) -> bytes:
    """One ``data:`` frame."""
    return b"data: " + _encoder.encode(event) + b"\n\n"


async def sse_frames(events: AsyncIterator[msgspec.Struct]) -> AsyncIterator[bytes]:
    """Frame ``events``; after an error frame the stream closes without ``[DONE]``."""
    async for event in events:
        yield frame(event)
        if isinstance(event, ErrorResponse):
            return
    yield DONE
