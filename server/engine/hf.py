"""The Transformers engine: one worker thread owns the model and decodes a continuously batched set of requests.

Requests wait in a bounded FIFO. Between decode steps the worker prefills newly admitted requests (a bounded number
of prompt tokens per step) and merges them into the running left-padded batch; finished or cancelled rows leave at
once. See :mod:`server.engine.scheduler` for the step loop and its budgets and :mod:`server.engine.batch` for the
cache work. Tokens cross to asyncio through a per-request :class:`QueueStream` (an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from server.engine.base import EngineOverloaded, EngineRequest, EngineStats, ModelInfo, RequestStream
from server.engine.batch import supports_merging
from server.engine.demo_model import demo_preset, resolve_builtin
from server.engine.hf_load import load_pretrained
from server.engine.hf_tokenizer import HFTokenizer
from server.engine.loading import LoadOptions
from server.engine.pending import Pending
from server.engine.prefix_cache import PrefixCache
from server.engine.sampling import Sampler
from server.engine.scheduler import Scheduler
from server.engine.stream import QueueStream

logger = logging.getLogger("server.engine")


class HFEngine:
    """Serves one Transformers causal LM with step-level continuous batching.

    Args:
        model: A hub id, a local folder, a ``.gguf`` file, or ``builtin:tiny-chat``.
        served_model_name: The name clients use and ``/v1/models`` lists.
        data_dir: Where built-in models are built and cached.
        device: ``"auto"`` (cuda > mps > cpu) or a torch device string.
        dtype: ``"auto"`` (bfloat16 where the hardware has it natively, else float32) or a dtype name.
        max_model_len: Context length (prompt + output); defaults to the config's ``max_position_embeddings``.
        max_queue_size: Requests allowed to wait; beyond it ``generate`` raises :class:`EngineOverloaded`.
        max_batch_size: Most requests decoding together (1 for models with sliding-window or linear-attention
            layers, whose caches cannot be merged).
        max_batch_tokens: KV budget of the running batch: rows x padded width of its cache, in tokens.
        prefill_chunk_tokens: Most (padded) prompt tokens prefilled per decode step; bounds how long a new
            prompt stalls the running streams.
        prefix_cache_mb: Memory for the KV of prompt prefixes kept for reuse (see
            :mod:`server.engine.prefix_cache`); 0 turns prefix caching off.
        load: Revision, tokenizer, chat template, GGUF file and progress bars of the load (defaults: the model's own).
    """

    def __init__(
        self,
        model: str,
        *,
        served_model_name: str,
        data_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_queue_size: int = 256,
        max_batch_size: int = 32,
        max_batch_tokens: int = 65_536,
        prefill_chunk_tokens: int = 256,
        prefix_cache_mb: int = 1024,
        load: LoadOptions | None = None,
    ) -> None:
        self._source = model
        self._load_options = load or LoadOptions()
        self._served_name = served_model_name
        self._data_dir = Path(data_dir)
        self._device_arg = device
        self._dtype_arg = dtype
        self._max_model_len_arg = max_model_len
        self._max_queue_size = max_queue_size
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._prefix_cache_bytes = prefix_cache_mb * 2**20
        self._model: Any = None
        self._device = torch.device("cpu")
        self._tokenizer: HFTokenizer | None = None
        self._info: ModelInfo | None = None
        self._scheduler: Scheduler | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def name(self) -> str:
        """The name clients use, known before the model has loaded (``info`` exists only after)."""
        return self._served_name

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("the engine is not started")
        return self._info

    @property
    def tokenizer(self) -> HFTokenizer:
        if self._tokenizer is None:
            raise RuntimeError("the engine is not started")
        return self._tokenizer

    @property
    def supports_constraints(self) -> bool:
        """Grammar masks apply per row inside the batch."""
        return True

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self.failure is None

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving for good (repeated step failures, its worker thread ended), else ``None``."""
        if self._scheduler is not None and self._scheduler.failure is not None:
            return self._scheduler.failure
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine worker thread exited"
        return None

    @property
    def num_waiting(self) -> int:
        """Requests queued for a batch slot (preempted ones included)."""
        return 0 if self._scheduler is None else self._scheduler.num_waiting

    @property
    def num_running(self) -> int:
        """Requests being prefilled or decoded now."""
        return 0 if self._scheduler is None else self._scheduler.num_running

    def stats(self) -> EngineStats:
        """The prefix cache's counters and memory, the running batch's KV usage and its preemptions."""
        scheduler = self._scheduler
        if scheduler is None:
            return EngineStats()
        prefix = scheduler.prefix_cache
        return EngineStats(
            prefix_cache_queries=0 if prefix is None else prefix.queries,
            prefix_cache_hits=0 if prefix is None else prefix.hits,
            prefix_cache_bytes=0 if prefix is None else prefix.bytes,
            kv_usage=scheduler.kv_tokens / self._max_batch_tokens,
            preemptions=scheduler.preemptions,
        )

    async def start(self) -> None:
        """Load the tokenizer and model in a thread, then start the worker."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        assert self._scheduler is not None
        self._stopping = False
        self._thread = threading.Thread(target=self._scheduler.run, name="hf-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Refuse new requests, fail queued ones with :class:`EngineOverloaded`, abort running ones, join."""
        self._stopping = True
        if self._scheduler is None:
            return
        for pending in self._scheduler.shutdown():
            pending.emit(EngineOverloaded("the engine is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def generate(self, request: EngineRequest) -> RequestStream:
        """Queue ``request`` (FIFO) and return its stream; ``aclose()`` on the stream aborts it.

        Raises:
            EngineOverloaded: the queue is full, or the engine is not running.
        """
        return self.generate_group([request])[0]

    def generate_group(self, requests: Sequence[EngineRequest]) -> list[RequestStream]:
        """Queue the samples of one prompt together (all or none) and return their streams, in order.

        Their prompt is prefilled once and forked into one batch row per request (see
        :mod:`server.engine.scheduler`); each row keeps its own parameters and seed.

        Raises:
            EngineOverloaded: they do not fit the queue, or the engine is not running.
            ValueError: the requests do not share one prompt (and one ``prompt_logprobs``).
        """
        failure = self.failure
        if failure is not None:
            raise EngineOverloaded(f"the engine failed: {failure}")
        if not self.ready or self._scheduler is None:
            raise EngineOverloaded("the engine is not running")
        if not requests:
            return []
        first = requests[0]
        prompt = list(first.prompt_token_ids)
        for other in requests[1:]:
            same = other.prompt_token_ids is first.prompt_token_ids or list(other.prompt_token_ids) == prompt
            if not same or other.params.prompt_logprobs != first.params.prompt_logprobs:
                raise ValueError("the requests of a group must share one prompt and one prompt_logprobs")
        group = object() if len(requests) > 1 else None
        loop = asyncio.get_running_loop()
        pendings = [Pending(request, group=group) for request in requests]
        for pending in pendings:
            pending.stream = QueueStream(loop, partial(self._scheduler.abort, pending))
        self._scheduler.submit(pendings)
        return [pending.stream for pending in pendings if pending.stream is not None]

    def _load(self) -> None:
        source: str | Path = self._source
        if self._source.startswith("builtin:"):
            source = resolve_builtin(self._source, self._data_dir)
        preset = demo_preset(source)
        if preset is not None:
            logger.warning(
                "Serving a built-in demo model (%s preset): random weights, its output is noise. To serve a real "
                "model: uv run llm-server serve --model Qwen/Qwen2.5-0.5B-Instruct (any HF id or local folder)",
                preset,
            )
        device = pick_device(self._device_arg)
        dtype = pick_dtype(self._dtype_arg, device)
        loaded = load_pretrained(source, self._load_options, name=self._served_name, device=device, dtype=dtype)
        model, hf_tokenizer = loaded.model, loaded.tokenizer
        extra_eos = _as_ids(model.generation_config.eos_token_id) | _as_ids(model.config.eos_token_id)
        self._tokenizer = HFTokenizer(hf_tokenizer, extra_eos)
        max_len = self._max_model_len_arg or getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if not max_len:
            raise ValueError(f"{self._source}: the config has no max_position_embeddings; pass max_model_len")
        self._model, self._device = model, device
        max_batch_size = self._max_batch_size
        mergeable = supports_merging(model.config)
        if max_batch_size > 1 and not mergeable:
            logger.warning(
                "%s has sliding-window or linear-attention layers, whose caches cannot be merged into a padded "
                "batch: serving one request at a time (max_batch_size 1)",
                self._served_name,
            )
            max_batch_size = 1
        prefix_cache = None
        if self._prefix_cache_bytes and mergeable:  # the layers whose caches merge are the ones cut into blocks
            prefix_cache = PrefixCache(self._prefix_cache_bytes)
        self._info = ModelInfo(
            name=self._served_name, source=self._source, max_model_len=int(max_len), created=int(time.time())
        )
        self._scheduler = Scheduler(
            model,
            lambda: self.tokenizer,
            # Ids past the tokenizer's length are padding rows of the embedding matrix: never emit them.
            Sampler(vocab_limit=self._tokenizer.vocab_size, apply_masks=_apply_grammar_masks),
            device=device,
            max_model_len=int(max_len),
            max_queue_size=self._max_queue_size,
            max_batch_size=max_batch_size,
            max_batch_tokens=self._max_batch_tokens,
            prefill_chunk_tokens=self._prefill_chunk_tokens,
            prefix_cache=prefix_cache,
        )
        params, seconds = sum(p.numel() for p in model.parameters()) / 1e6, loaded.seconds
        weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        logger.info(
            "loaded model %s (%s) on %s as %s: %.1fM parameters, %.0f MiB of weights, max_model_len %d, in %.2fs",
            *(self._served_name, self._source, device, str(dtype).removeprefix("torch."), params, weights_mib),
            *(max_len, seconds),
        )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    """Resolve ``"auto"`` to cuda, then mps, then cpu; pass any other torch device string through."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Resolve ``"auto"`` to bfloat16 where ``device`` computes it natively, else float32.

    Without native support (no avx512_bf16/AMX on a CPU, pre-Ampere GPUs) bfloat16 is emulated and slower
    than float32, so it is not chosen automatically.
    """
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (x86 avx512_bf16 or AMX, as torch's cpuinfo reports it)."""
    # Private but stable since torch 2.3; read through getattr so a rename degrades to float32, not a crash.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _as_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def _apply_grammar_masks(logits: torch.Tensor, rows: Any) -> None:
    # Imported on first use: llguidance's torch helpers load only when a constrained request arrives.
    from server.engine.grammar_mask import apply_masks

    apply_masks(logits, rows)
