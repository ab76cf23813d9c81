"""The served models: each name routes to an in-process engine or to a remote upstream."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from server.engine.base import Embedder, Engine
from server.engine.loading import embeds
from server.errors import OpenAIError, model_not_found
from server.models.file import RemoteModel, api_key, load_models_file
from server.providers.upstream import Upstream
from server.settings import Settings

Local = Engine | Embedder
"""An in-process model: a generation engine or an embedding model."""


@dataclass(slots=True)
class ServedModels:
    """Name -> backend, in the order ``/v1/models`` lists them; the first is the default of the native routes."""

    engines: dict[str, Engine] = field(default_factory=dict)
    embedders: dict[str, Embedder] = field(default_factory=dict)
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    """Why a local model failed to load, by name."""
    created: int = field(default_factory=lambda: int(time.time()))

    def add(self, name: str, backend: Engine | Embedder | Upstream, *, embeds: bool = False) -> None:
        """Serve ``backend`` as ``name`` (a local model's ``info`` exists only once it has loaded); ``embeds``: it is
        an embedding model."""
        if self.serves(name):
            raise ValueError(f"the model name {name!r} is served twice")
        if isinstance(backend, Upstream):
            self.upstreams[name] = backend
        elif embeds:
            self.embedders[name] = backend  # type: ignore[assignment]
        else:
            self.engines[name] = backend  # type: ignore[assignment]
        self.order.append(name)

    @property
    def local(self) -> dict[str, Local]:
        """Every in-process model, generation and embedding alike, by name."""
        return {**self.engines, **self.embedders}

    def describe(self, name: str) -> tuple[int, str, int | None]:
        """``(created, owned_by, max_model_len)`` of a served model for ``/v1/models`` (the window when known)."""
        local = self.engines.get(name) or self.embedders.get(name)
        if local is not None and local.ready:
            return local.info.created, local.info.owned_by, local.info.max_model_len
        upstream = self.upstreams.get(name)
        return self.created, "llm-server", upstream.entry.max_model_len if upstream is not None else None

    @property
    def default(self) -> str:
        return self.order[0]

    def serves(self, name: str) -> bool:
        """Whether ``name`` is one of the served models."""
        return name in self.engines or name in self.upstreams or name in self.embedders

    def resolve(self, model: str | None) -> tuple[str, Engine | Embedder | Upstream]:
        """The served name (the default for ``None``) and its backend, or 404 ``model_not_found``."""
        name = self.default if model is None else model
        return name, self.lookup(name)

    def lookup(self, model: str | None) -> Engine | Embedder | Upstream:
        """The backend serving ``model`` (the default for ``None``), or 404 ``model_not_found``."""
        name = self.default if model is None else model
        backend = self.engines.get(name) or self.upstreams.get(name) or self.embedders.get(name)
        if backend is None:
            raise model_not_found(name)
        return backend

    def ready_engine(self, backend: Engine | Embedder) -> Engine:
        """``backend`` when it is a generation model that can generate: 400 for an embedding model, else 503
        ``model_not_ready`` / ``model_failed``."""
        for name, embedder in self.embedders.items():
            if embedder is backend:
                raise wrong_task(name, "embed", "use /v1/embeddings")
        engine: Engine = backend  # type: ignore[assignment]
        self._check_ready(engine, self.engines)
        return engine

    def ready_embedder(self, name: str, backend: Engine | Embedder | Upstream) -> Embedder:
        """The embedding model serving ``name``: 400 for a generation or remote model, else 503 while not ready."""
        embedder = self.embedders.get(name)
        if embedder is None:
            where = "a remote model" if isinstance(backend, Upstream) else "a generation model (task 'generate')"
            raise wrong_task(name, None, f"it is {where} and serves no embeddings")
        self._check_ready(embedder, self.embedders)
        return embedder

    def _check_ready(self, local: Local, among: Mapping[str, Local]) -> None:
        if local.ready:
            return
        name = next((n for n, e in among.items() if e is local), "")
        broken = self.failures.get(name) or local.failure
        raise OpenAIError(
            503,
            "server_error",
            f"The model failed and this server cannot generate: {broken}"
            if broken
            else "The model is still loading; retry shortly.",
            code="model_failed" if broken else "model_not_ready",
            headers={"retry-after": "5"},
        )


def wrong_task(name: str, task: str | None, advice: str) -> OpenAIError:
    """400 naming ``model`` for a request the model's task does not serve."""
    what = f"is an embedding model (task '{task}'): {advice}" if task is not None else advice
    return OpenAIError(
        400, "invalid_request_error", f"The model '{name}' {what}.", param="model", code="model_task_mismatch"
    )


def build_models(settings: Settings) -> ServedModels:
    """The backends ``settings`` describe: the models file's entries, else the one ``MODEL``.

    Raises:
        SettingsError: the models file is invalid.
    """
    from server.engine.factory import build_engine  # torch is imported only if a Transformers model is served

    models = ServedModels()
    if settings.models_file is None:
        models.add(settings.model_name, build_engine(settings), embeds=embeds(settings.model, settings.task))
        return models
    for entry in load_models_file(settings.models_file):
        if isinstance(entry, RemoteModel):
            models.add(entry.name, Upstream(entry, api_key(entry)))
        else:
            local = msgspec.structs.replace(
                settings,
                model=entry.model,
                served_model_name=entry.name,
                device=entry.device or settings.device,
                dtype=entry.dtype or settings.dtype,
                max_model_len=entry.max_model_len or settings.max_model_len,
                task=entry.task or settings.task,
                pooling=entry.pooling or settings.pooling,
                normalize=settings.normalize if entry.normalize is None else entry.normalize,
                # Per model: the global REVISION/GGUF_FILE/TOKENIZER/CHAT_TEMPLATE name one model's files.
                revision=entry.revision,
                gguf_file=entry.gguf_file,
                tokenizer=entry.tokenizer,
                chat_template=entry.chat_template,
                trust_remote_code=settings.trust_remote_code
                if entry.trust_remote_code is None
                else entry.trust_remote_code,
            )
            models.add(entry.name, build_engine(local), embeds=embeds(local.model, local.task))
    return models
