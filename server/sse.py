"""Server-Sent Events framing.

Chat and completion streams: every frame is exactly ``data: <json>\\n\\n`` and the stream ends with ``[DONE]``.
Responses streams name each frame by its event's ``type`` (``event: <type>\\n``) and end without ``[DONE]``, as
OpenAI sends them.
"""

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


def named_frame(event: msgspec.Struct) -> bytes:
    """One ``event:`` + ``data:`` frame, named by the event's tag (its ``type``)."""
    name = str(event.__struct_config__.tag).encode()
    return b"event: " + name + b"\ndata: " + _encoder.encode(event) + b"\n\n"


async def named_frames(events: AsyncIterator[msgspec.Struct]) -> AsyncIterator[bytes]:
    """Frame ``events`` by name; the stream ends with the last event."""
    async for event in events:
        yield named_frame(event)
