"""One embedding batch: the calls awaiting vectors, how a batch is taken from the queue, and its forward pass.

These run on the embedder's worker thread; a :class:`Call` hands its vectors (or its failure) to the caller's event
loop with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.base import EngineError
from server.engine.embedding_load import LoadedEmbedder, Pooling


class Call:
    """One :meth:`HFEmbedder.embed` call: its vectors so far and the future its caller awaits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[array[float]]] = loop.create_future()
        self.vectors: list[array[float] | None] = [None] * size
        self.remaining = size
        self.cancelled = False

    def done(self, index: int, vector: array[float]) -> None:
        """Record one input's vector (worker thread); the last one resolves the future."""
        self.vectors[index] = vector
        self.remaining -= 1
        if self.remaining == 0:
            self._settle(self.vectors, None)

    def fail(self, exc: EngineError) -> None:
        self.remaining = -1
        self._settle(None, exc)

    def _settle(self, vectors: list[Any] | None, exc: EngineError | None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if exc is not None:
                self.future.set_exception(exc)
            else:
                self.future.set_result(vectors or [])

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(settle)


@dataclass(slots=True)
class Item:
    seq: int
    token_ids: list[int]
    call: Call
    index: int


def take_batch(queue: deque[Item], max_batch_size: int, max_batch_tokens: int) -> tuple[list[Item], list[Item]]:
    """``(batch, rest)``: up to ``max_batch_size`` live inputs taken off ``queue``, then those that fit
    ``max_batch_tokens`` as rows x padded length; ``rest`` (in queue order) goes back to its front.

    Inputs are taken from the waiting calls in turn, one each per round in arrival order, so a call of 2,048 inputs
    shares each batch with the small calls behind it instead of holding the model for its whole length. Of those,
    the oldest always runs and the others join shortest first while the batch fits (a long input cannot be
    passed over for ever).
    """
    groups: dict[int, deque[Item]] = {}
    for item in queue:
        if not item.call.cancelled:
            groups.setdefault(id(item.call), deque()).append(item)
    queue.clear()
    window: list[Item] = []
    while groups and len(window) < max_batch_size:
        for key in list(groups):
            group = groups[key]
            window.append(group.popleft())
            if not group:
                del groups[key]
            if len(window) == max_batch_size:
                break
    oldest = min(window, key=lambda item: item.seq, default=None)
    if oldest is None:
        return [], []
    others = sorted((item for item in window if item is not oldest), key=lambda item: len(item.token_ids))
    batch, width = [oldest], len(oldest.token_ids)
    deferred: list[Item] = []
    for item in others:
        wider = max(width, len(item.token_ids))
        if (len(batch) + 1) * wider <= max_batch_tokens:
            batch.append(item)
            width = wider
        else:
            deferred.append(item)
    rest = [*deferred, *(item for group in groups.values() for item in group)]
    return batch, sorted(rest, key=lambda item: item.seq)


def run_batch(loaded: LoadedEmbedder, rows: list[list[int]], pad_id: int, device: torch.device) -> list[array[float]]:
    """One forward pass over ``rows`` (right-padded with ``pad_id``, masked), pooled and normalized as ``loaded``
    says; pooling runs in float32 whatever the model's dtype."""
    width = max(len(ids) for ids in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    with torch.inference_mode():
        ids, mask = ids.to(device), mask.to(device)
        states = loaded.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(states.float(), mask, loaded.spec.pooling)
        if loaded.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        data = pooled.cpu().contiguous().numpy()
    out = []
    for values in data:
        vector = array("f")
        vector.frombytes(values.tobytes())
        out.append(vector)
    return out


def pool(states: torch.Tensor, mask: torch.Tensor, how: Pooling) -> torch.Tensor:
    """One vector per row of ``states`` (rows x tokens x hidden) over the tokens ``mask`` (rows x tokens) keeps.

    Last-token pooling takes each row's last kept position, so it holds for left and right padding alike.
    """
    keep = mask.to(states.dtype).unsqueeze(-1)
    if how == "mean":
        return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
    if how == "cls":
        return states[:, 0]
    if how == "max":
        return states.masked_fill(keep == 0, torch.finfo(states.dtype).min).max(dim=1).values
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    return states[torch.arange(states.shape[0], device=states.device), last]
