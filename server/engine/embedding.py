"""The Transformers embedder: one worker thread owns the model and embeds queued inputs of all callers in batches.

An :meth:`HFEmbedder.embed` call queues its inputs (admission is synchronous, so a full queue is an
:class:`EngineOverloaded` before anything runs) and awaits a future. The worker takes the inputs at the front of the
queue, up to ``max_batch_size`` of them, sorted by length so that a batch pads as little as possible, and keeps the
shortest that fit ``max_batch_tokens`` (rows x padded length; one input always runs); the others go back to the
front. One forward pass under ``torch.inference_mode()``, pooling and normalization give the vectors, which cross to
asyncio through ``loop.call_soon_threadsafe`` once all of a call's inputs are done (see
:mod:`server.engine.embedding_batch`).

Failures stay with their batch: a failed forward pass fails the calls it served with :class:`EngineError`; only
``MAX_FAILED_STEPS`` failed passes in a row (the model or device is broken) end the embedder for good.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from server.engine.base import EngineError, EngineOverloaded, ModelInfo
from server.engine.embedding_batch import Call, Item, run_batch, take_batch
from server.engine.embedding_load import LoadedEmbedder, load_embedder
from server.engine.hf import pick_device, pick_dtype
from server.engine.hf_tokenizer import HFTokenizer
from server.engine.loading import LoadOptions
from server.engine.scheduler import MAX_FAILED_STEPS

logger = logging.getLogger("server.engine")

GATHER_S = 0.004
"""Longest a batch waits for more inputs while the embedder is under load (never when the last batch had one)."""


class HFEmbedder:
    """Serves one Transformers embedding model (a sentence-transformers folder or a decoder) with batching.

    Args:
        model: A hub id or a local folder.
        served_model_name: The name clients use and ``/v1/models`` lists.
        device: ``"auto"`` (cuda > mps > cpu) or a torch device string.
        dtype: ``"auto"`` (bfloat16 where the hardware has it natively, else float32) or a dtype name.
        max_model_len: Most tokens per input; defaults to the model's ``max_seq_length``, else its positions.
        max_queue_size: Calls (requests) allowed to wait, whatever their number of inputs; beyond it ``embed``
            raises :class:`EngineOverloaded`. Waiting calls share each batch in turn (see
            :func:`~server.engine.embedding_batch.take_batch`).
        max_batch_size: Most inputs in one forward pass.
        max_batch_tokens: Most rows x padded length in one forward pass (a single input always runs).
        pooling: ``"auto"`` (the folder's Pooling module; last-token for a decoder) or mean, cls, last, max.
        normalize: ``None``: as the folder says (its Normalize module; always for a decoder); else forced.
        load: Revision, tokenizer, remote code and progress bars of the load.
    """

    def __init__(
        self,
        model: str,
        *,
        served_model_name: str,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_queue_size: int = 256,
        max_batch_size: int = 32,
        max_batch_tokens: int = 65_536,
        pooling: str = "auto",
        normalize: bool | None = None,
        load: LoadOptions | None = None,
    ) -> None:
        self._source = model
        self._served_name = served_model_name
        self._device_arg, self._dtype_arg = device, dtype
        self._max_model_len_arg = max_model_len
        self._max_queue_size = max_queue_size
        self._max_batch_size = max(1, max_batch_size)
        self._max_batch_tokens = max_batch_tokens
        self._pooling_arg, self._normalize_arg = pooling, normalize
        self._load_options = load or LoadOptions()
        self._loaded: LoadedEmbedder | None = None
        self._info: ModelInfo | None = None
        self._device = torch.device("cpu")
        self._pad_id = 0
        self._vocab = 0
        self._cv = threading.Condition()
        self._last_batch = 0
        self._queue: deque[Item] = deque()
        self._running: list[Item] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed_batches = 0
        self._failure: str | None = None

    @property
    def name(self) -> str:
        return self._served_name

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("the embedder is not started")
        return self._info

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._require().tokenizer

    @property
    def model(self) -> Any:
        """The loaded Transformers model (tests wrap it to count forward passes)."""
        return self._require().model

    @property
    def dimensions(self) -> int:
        return self._require().dimensions

    @property
    def normalized(self) -> bool:
        return self._require().spec.normalize

    @property
    def truncatable(self) -> bool:
        return self._require().spec.truncatable

    @property
    def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._stopping and self.failure is None

    @property
    def failure(self) -> str | None:
        """Why the embedder stopped serving for good (failed forward passes, its thread ended), else ``None``."""
        if self._failure is not None:
            return self._failure
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the embedder worker thread exited"
        return None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        """Load the model in a thread, then start the worker."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hf-embedder", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Refuse new calls, fail queued and running ones with :class:`EngineOverloaded`, join the worker."""
        with self._cv:
            self._stopping = True
            calls = {id(item.call): item.call for item in [*self._queue, *self._running]}
            self._queue.clear()
            self._cv.notify_all()
        for call in calls.values():
            call.fail(EngineOverloaded("the embedder is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[array[float]]:
        """One float32 vector per input, in order.

        Raises:
            EngineOverloaded: the queue is full or the embedder is not running (nothing was queued).
            ValueError: an input is empty, longer than ``info.max_model_len`` tokens or holds an id past the model's
                vocabulary (nothing was queued).
            EngineError: the forward pass of a batch holding one of the inputs failed.
        """
        self._admit(inputs)
        if not inputs:
            return []
        self._check(inputs)
        call = Call(asyncio.get_running_loop(), len(inputs))
        with self._cv:
            self._admit(inputs)
            self._queue.extend(Item(next(self._seq), list(ids), call, i) for i, ids in enumerate(inputs))
            self._cv.notify()
        try:
            return await call.future
        except asyncio.CancelledError:
            call.cancelled = True
            with self._cv:
                self._queue = deque(item for item in self._queue if item.call is not call)
            raise

    def _check(self, inputs: Sequence[Sequence[int]]) -> None:
        limit, vocab = self.info.max_model_len, self._vocab
        for ids in inputs:
            if not ids or len(ids) > limit:
                raise ValueError(f"an input must have 1 to {limit} tokens, not {len(ids)}")
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"token ids must be in 0..{vocab - 1}")

    def _admit(self, inputs: Sequence[Sequence[int]]) -> None:
        if self._failure is not None:
            raise EngineOverloaded(f"the embedder failed: {self._failure}")
        if not self.ready:
            raise EngineOverloaded("the embedder is not running")
        waiting = len({id(item.call) for item in self._queue})
        if waiting >= self._max_queue_size:
            raise EngineOverloaded(f"the embedding queue is full ({waiting} requests waiting)")

    def _require(self) -> LoadedEmbedder:
        if self._loaded is None:
            raise RuntimeError("the embedder is not started")
        return self._loaded

    def _load(self) -> None:
        device = pick_device(self._device_arg)
        dtype = pick_dtype(self._dtype_arg, device)
        loaded = load_embedder(
            self._source,
            self._load_options,
            name=self._served_name,
            device=device,
            dtype=dtype,
            pooling=self._pooling_arg,
            normalize=self._normalize_arg,
            max_model_len=self._max_model_len_arg,
        )
        pad = loaded.tokenizer.hf.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0  # padded positions are masked out: any id serves
        # An id past the embedding matrix would fail the whole batch's forward pass (and count against the model).
        self._vocab = int(loaded.model.get_input_embeddings().num_embeddings)
        self._loaded, self._device = loaded, device
        self._info = ModelInfo(
            name=self._served_name, source=self._source, max_model_len=loaded.max_model_len, created=int(time.time())
        )
        params = sum(p.numel() for p in loaded.model.parameters()) / 1e6
        logger.info(
            "loaded embedding model %s (%s) on %s as %s: %.1fM parameters, %d dimensions, %s pooling%s, "
            "max_model_len %d, in %.2fs",
            *(self._served_name, self._source, device, str(dtype).removeprefix("torch."), params),
            *(loaded.dimensions, loaded.spec.pooling, ", normalized" if loaded.spec.normalize else ""),
            *(loaded.max_model_len, loaded.seconds),
        )

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._serve(batch)
        except BaseException as exc:  # the thread is ending for a reason nobody handled
            self._give_up(f"the embedder worker crashed: {type(exc).__name__}: {exc}")
            raise

    def _next_batch(self) -> list[Item] | None:
        """The next batch (worker thread), or ``None`` once stopping."""
        with self._cv:
            while True:
                while self._queue and self._queue[0].call.cancelled:
                    self._queue.popleft()
                if self._stopping:
                    return None
                if self._queue:
                    break
                self._cv.wait()
            if self._last_batch > 1:
                self._gather()
            batch, rest = take_batch(self._queue, self._max_batch_size, self._max_batch_tokens)
            self._last_batch = len(batch)
            self._queue.extendleft(reversed(rest))
            self._running = batch
            return batch

    def _gather(self) -> None:
        """Under load (the last batch had several inputs), wait up to ``GATHER_S`` for a full batch (lock held by
        the caller; waiting releases it). The forward pass holds the GIL for much of its Python-level work, so
        without this pause the event loop admits only a few requests per pass and the passes stay small."""
        deadline = time.monotonic() + GATHER_S
        while len(self._queue) < self._max_batch_size and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _serve(self, batch: list[Item]) -> None:
        try:
            vectors = run_batch(self._require(), [item.token_ids for item in batch], self._pad_id, self._device)
        except Exception as exc:
            logger.exception("embedding forward pass failed (%d inputs)", len(batch))
            self._failed_batches += 1
            if self._failed_batches >= MAX_FAILED_STEPS:  # first, so that its callers see the embedder failed
                last = f"{type(exc).__name__}: {exc}"
                self._give_up(f"{self._failed_batches} embedding batches in a row failed, the last with {last}")
            else:
                self._fail_batch(batch, EngineError(f"embedding failed: {type(exc).__name__}: {exc}"))
            return
        self._failed_batches = 0
        with self._cv:
            self._running = []
        for item, vector in zip(batch, vectors, strict=True):
            if item.call.remaining > 0:
                item.call.done(item.index, vector)

    def _fail_batch(self, batch: list[Item], exc: EngineError) -> None:
        with self._cv:
            self._running = []
        for call in {id(item.call): item.call for item in batch}.values():
            if call.remaining > 0:
                call.fail(exc)

    def _give_up(self, reason: str) -> None:
        """Mark the embedder failed for good and fail every queued and running call (worker thread)."""
        logger.critical("the embedder failed and stops serving: %s", reason)
        with self._cv:
            self._failure = reason
            self._stopping = True
            items = [*self._queue, *self._running]
            self._queue.clear()
            self._running = []
            self._cv.notify_all()
        for call in {id(item.call): item.call for item in items}.values():
            if call.remaining > 0:
                call.fail(EngineError(f"the embedder failed: {reason}"))
