"""The Transformers engine: one worker thread owns the model and decodes step by step.

Requests wait in a bounded FIFO; the worker prefills a request, then runs single-token decode steps over a
``DynamicCache`` (not ``model.generate``), so the loop can later batch several requests per step. Tokens cross to
asyncio through a per-request :class:`QueueStream` (an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from server.engine.base import (
    EngineDelta,
    EngineError,
    EngineOverloaded,
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestStream,
)
from server.engine.demo_model import demo_preset, resolve_builtin
from server.engine.detok import IncrementalDetokenizer
from server.engine.hf_tokenizer import HFTokenizer
from server.engine.sampling import RowSampler, Sampler
from server.engine.stream import QueueStream

logger = logging.getLogger("server.engine")


@dataclass(eq=False, slots=True)
class _Pending:
    """A request between the event loop and the worker; ``aborted`` is the consumer's only signal to the worker."""

    request: EngineRequest
    stream: QueueStream | None = None
    aborted: bool = False

    def emit(self, item: EngineDelta | EngineError) -> None:
        assert self.stream is not None
        try:
            self.stream.fail(item) if isinstance(item, EngineError) else self.stream.put(item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.aborted = True


class HFEngine:
    """Serves one Transformers causal LM, one request at a time.

    Args:
        model: A hub id, a local folder, or ``builtin:tiny-chat``.
        served_model_name: The name clients use and ``/v1/models`` lists.
        data_dir: Where built-in models are built and cached.
        device: ``"auto"`` (cuda > mps > cpu) or a torch device string.
        dtype: ``"auto"`` (bfloat16 where the hardware has it natively, else float32) or a dtype name.
        max_model_len: Context length (prompt + output); defaults to the config's ``max_position_embeddings``.
        max_queue_size: Requests allowed to wait; beyond it ``generate`` raises :class:`EngineOverloaded`.
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
    ) -> None:
        self._source = model
        self._served_name = served_model_name
        self._data_dir = Path(data_dir)
        self._device_arg = device
        self._dtype_arg = dtype
        self._max_model_len_arg = max_model_len
        self._max_queue_size = max_queue_size
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._model: Any = None
        self._device = torch.device("cpu")
        self._tokenizer: HFTokenizer | None = None
        self._info: ModelInfo | None = None
        self._sampler: Sampler | None = None
        self._cv = threading.Condition()
        self._waiting: deque[_Pending] = deque()
        self._running: _Pending | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

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
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_waiting(self) -> int:
        """Requests queued behind the running one."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests the worker is decoding now."""
        return 0 if self._running is None else 1

    async def start(self) -> None:
        """Load the tokenizer and model in a thread, then start the worker."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="hf-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Refuse new requests, fail queued ones with :class:`EngineOverloaded`, abort the running one, join."""
        with self._cv:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for pending in dropped:
            pending.emit(EngineOverloaded("the engine is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def generate(self, request: EngineRequest) -> RequestStream:
        """Queue ``request`` (FIFO) and return its stream; ``aclose()`` on the stream aborts it.

        Raises:
            EngineOverloaded: the queue is full, or the engine is not running.
        """
        pending = _Pending(request)
        pending.stream = QueueStream(asyncio.get_running_loop(), partial(self._abort, pending))
        with self._cv:
            if not self.ready:
                raise EngineOverloaded("the engine is not running")
            if len(self._waiting) >= self._max_queue_size:
                raise EngineOverloaded(f"the request queue is full ({self._max_queue_size} waiting)")
            self._waiting.append(pending)
            self._cv.notify()
        return pending.stream

    def _abort(self, pending: _Pending) -> None:
        # Runs on the event loop: a queued request leaves at once; a running one is dropped at the worker's next step.
        pending.aborted = True
        with self._cv:
            if pending in self._waiting:
                self._waiting.remove(pending)

    def _load(self) -> None:
        started = time.perf_counter()
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
        hf_tokenizer = AutoTokenizer.from_pretrained(source)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model = model.to(device)
        model.eval()
        extra_eos = _as_ids(model.generation_config.eos_token_id) | _as_ids(model.config.eos_token_id)
        self._tokenizer = HFTokenizer(hf_tokenizer, extra_eos)
        max_len = self._max_model_len_arg or getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if not max_len:
            raise ValueError(f"{self._source}: the config has no max_position_embeddings; pass max_model_len")
        self._model, self._device = model, device
        # Ids past the tokenizer's length are padding rows of the embedding matrix: never emit them.
        self._sampler = Sampler(vocab_limit=self._tokenizer.vocab_size)
        self._info = ModelInfo(
            name=self._served_name, source=self._source, max_model_len=int(max_len), created=int(time.time())
        )
        params, seconds = sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - started
        logger.info(
            "loaded model %s (%s) on %s as %s: %.1fM parameters, max_model_len %d, in %.2fs",
            *(self._served_name, self._source, device, str(dtype).removeprefix("torch."), params, max_len, seconds),
        )

    def _work(self) -> None:
        # inference_mode is thread-local, so it is entered here, in the thread that runs the model.
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._waiting and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        return
                    pending = self._running = self._waiting.popleft()
                try:
                    self._run(pending)
                except EngineError as exc:
                    pending.emit(exc)
                except Exception as exc:
                    logger.exception("request %s failed", pending.request.request_id)
                    pending.emit(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                finally:
                    self._running = None

    def _run(self, pending: _Pending) -> None:
        """Prefill then decode one token per step until EOS, a length limit, an abort or shutdown."""
        assert self._sampler is not None
        assert self._tokenizer is not None
        assert self._info is not None
        request, params, tokenizer = pending.request, pending.request.params, self._tokenizer
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise EngineError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= tokenizer.vocab_size:
            raise EngineError(f"prompt token ids must be in [0, {tokenizer.vocab_size})")
        budget = min(params.max_tokens, self._info.max_model_len - len(prompt))
        if budget <= 0:
            pending.emit(EngineDelta(finish_reason="length"))
            return
        row = RowSampler.create(params, self._device)
        detok = IncrementalDetokenizer(tokenizer, prompt)
        cache = DynamicCache(config=self._model.config)
        input_ids = torch.tensor([prompt], device=self._device)
        positions = torch.arange(len(prompt), device=self._device).unsqueeze(0)
        seq_len, generated = len(prompt), 0
        while True:
            if pending.aborted:
                return
            if self._stopping:
                pending.emit(EngineOverloaded("the engine is shutting down"))
                return
            # The mask must cover exactly cache + new tokens (a shorter one is silently padded and hides tokens).
            mask = torch.ones((1, seq_len), dtype=torch.long, device=self._device)
            out = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            token = self._sampler.sample(out.logits[:, -1, :], [row])[0]
            generated += 1
            finish: FinishReason | None = None
            if token in tokenizer.eos_token_ids and not params.ignore_eos:
                finish, text = "stop", detok.flush()  # EOS counts as a token but is not text
            else:
                text = detok.push(token)
                if generated >= budget:
                    finish, text = "length", text + detok.flush()
            pending.emit(EngineDelta(token_ids=[token], text=text, finish_reason=finish))
            if finish is not None:
                return
            input_ids = torch.tensor([[token]], device=self._device)
            positions = torch.tensor([[seq_len]], device=self._device)
            seq_len += 1


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
