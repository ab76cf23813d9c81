"""Pick the engine for a settings object (torch is imported only when a Transformers model is served)."""

from __future__ import annotations

from server.engine.base import Embedder, Engine
from server.engine.loading import LoadOptions, embeds
from server.settings import Settings


def build_engine(settings: Settings) -> Engine | Embedder:
    """``builtin:echo`` -> :class:`EchoEngine`; an embedding model (see :func:`~server.engine.loading.embeds`) ->
    :class:`HFEmbedder`; anything else -> :class:`HFEngine`."""
    if settings.model == "builtin:echo":
        from server.engine.echo import EchoEngine

        return EchoEngine(
            settings.model_name,
            max_model_len=settings.max_model_len or 32768,
            max_queue_size=settings.max_queue_size,
            token_delay_s=settings.echo_token_delay_ms / 1000,
        )
    if embeds(settings.model, settings.task):
        return _build_embedder(settings)
    from server.engine.hf import HFEngine

    return HFEngine(
        settings.model,
        served_model_name=settings.model_name,
        data_dir=settings.data_dir,
        device=settings.device,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_queue_size=settings.max_queue_size,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        prefix_cache_mb=settings.prefix_cache_mb,
        load=_load_options(settings, chat_template=settings.chat_template, gguf_file=settings.gguf_file),
    )


def _build_embedder(settings: Settings) -> Embedder:
    from server.engine.embedding import HFEmbedder

    return HFEmbedder(
        settings.model,
        served_model_name=settings.model_name,
        device=settings.device,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_queue_size=settings.max_queue_size,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        pooling=settings.pooling,
        normalize=settings.normalize,
        load=_load_options(settings),
    )


def _load_options(settings: Settings, *, chat_template: str | None = None, gguf_file: str | None = None) -> LoadOptions:
    """What to load beyond the model's id: its revision, tokenizer and trust, and for a generation model its chat
    template and GGUF file."""
    return LoadOptions(
        revision=settings.revision,
        tokenizer=settings.tokenizer,
        trust_remote_code=settings.trust_remote_code,
        chat_template=chat_template,
        gguf_file=gguf_file,
        # tqdm's carriage-return bars would break one JSON object per line.
        progress_bars=settings.log_format == "console",
    )
