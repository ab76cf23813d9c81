"""Load a Transformers model and its tokenizer from a hub id, a folder or a GGUF file, visibly.

A log line says what is being loaded before a download can start; hub and conversion progress bars stay on in
console mode and are turned off for JSON logs (tqdm's carriage-return lines would break one object per line).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from server.engine.loading import LoadOptions, read_chat_template, resolve_source

logger = logging.getLogger("server.engine")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A loaded model and its tokenizer, on ``device``, in eval mode."""

    model: Any
    tokenizer: Any
    seconds: float
    """Wall time of the load (download, conversion and the move to the device included)."""


def quiet_hub_output() -> None:
    """No tqdm bars, and Transformers' own warnings through the root logger (its default handler writes raw text)."""
    import transformers.utils.logging as hf_logging
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The GGUF converter calls tqdm.auto directly, past both switches above (TQDM_DISABLE is read only when tqdm is
    # imported): give that module a bar that is always off.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not isinstance(bar, partial):
        gguf_utils.tqdm = partial(bar, disable=True)  # type: ignore[attr-defined]
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def load_pretrained(
    source: str | Path, options: LoadOptions, *, name: str, device: torch.device, dtype: torch.dtype
) -> Loaded:
    """Load ``source`` (a hub id, a folder, or a ``.gguf`` path) as ``options`` say.

    A GGUF file is always de-quantized to ``dtype``: kept packed, Transformers needs matmul kernels from the hub's
    ``kernels`` package, which this server does not ship, and would de-quantize anyway (with a warning).
    """
    if not options.progress_bars:
        quiet_hub_output()
    started = time.perf_counter()
    folder, gguf = resolve_source(str(source), options.gguf_file)
    dtype_name = str(dtype).removeprefix("torch.")
    logger.info(
        "loading model %s from %s%s (revision %s) on %s as %s",
        *(name, folder, f" (GGUF file {gguf})" if gguf else "", options.revision or "default"),
        *(device, dtype_name),
    )
    common: dict[str, Any] = {"revision": options.revision, "trust_remote_code": options.trust_remote_code}
    model_kwargs: dict[str, Any] = dict(common, dtype=dtype)
    if gguf is not None:
        model_kwargs.update(gguf_file=gguf, quantization_config=GgufConfig(dequantize=True))
    model: Any = AutoModelForCausalLM.from_pretrained(folder, **model_kwargs)
    if options.tokenizer is not None:
        tokenizer: Any = AutoTokenizer.from_pretrained(options.tokenizer, **common)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, **common, **({"gguf_file": gguf} if gguf else {}))
    if options.chat_template is not None:
        tokenizer.chat_template = read_chat_template(options.chat_template)
    model = model.to(device)
    model.eval()
    seconds = time.perf_counter() - started
    if gguf is not None:
        weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        logger.info(
            "GGUF %s: de-quantized to %s (packed GGUF weights need matmul kernels this install does not have): "
            "%.0f MiB of weights, loaded in %.2fs",
            *(gguf, dtype_name, weights_mib, seconds),
        )
    return Loaded(model, tokenizer, seconds)
