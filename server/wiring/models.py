"""The served models: each name routes to an in-process engine or to a remote upstream."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from server.engine.base import Engine
from server.errors import OpenAIError, model_not_found
from server.models.file import RemoteModel, api_key, load_models_file
from server.providers.upstream import Upstream
from server.settings import Settings


@dataclass(slots=True)
class ServedModels:
    """Name -> backend, in the order ``/v1/models`` lists them; the first is the default of the native routes."""

    engines: dict[str, Engine] = field(default_factory=dict)
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    """Why a local model failed to load, by name."""
    created: int = field(default_factory=lambda: int(time.time()))

    def add(self, name: str, backend: Engine | Upstream) -> None:
        """Serve ``backend`` as ``name`` (an engine's ``info`` exists only once it has loaded)."""
        if name in self.engines or name in self.upstreams:
            raise ValueError(f"the model name {name!r} is served twice")
        if isinstance(backend, Upstream):
            self.upstreams[name] = backend
        else:
            self.engines[name] = backend
        self.order.append(name)

    def describe(self, name: str) -> tuple[int, str, int | None]:
        """``(created, owned_by, max_model_len)`` of a served model for ``/v1/models`` (the window when known)."""
        engine = self.engines.get(name)
        if engine is not None and engine.ready:
            return engine.info.created, engine.info.owned_by, engine.info.max_model_len
        upstream = self.upstreams.get(name)
        return self.created, "llm-server", upstream.entry.max_model_len if upstream is not None else None

    @property
    def default(self) -> str:
        return self.order[0]

    def serves(self, name: str) -> bool:
        """Whether ``name`` is one of the served models."""
        return name in self.engines or name in self.upstreams

    def resolve(self, model: str | None) -> tuple[str, Engine | Upstream]:
        """The served name (the default for ``None``) and its backend, or 404 ``model_not_found``."""
        name = self.default if model is None else model
        return name, self.lookup(name)

    def lookup(self, model: str | None) -> Engine | Upstream:
        """The backend serving ``model`` (the default for ``None``), or 404 ``model_not_found``."""
        name = self.default if model is None else model
        backend = self.engines.get(name) or self.upstreams.get(name)
        if backend is None:
            raise model_not_found(name)
        return backend

    def ready_engine(self, engine: Engine) -> Engine:
        """``engine`` when it can generate, else 503 ``model_not_ready`` / ``model_failed``."""
        if engine.ready:
            return engine
        name = next((n for n, e in self.engines.items() if e is engine), "")
        broken = self.failures.get(name) or engine.failure
        raise OpenAIError(
            503,
            "server_error",
            f"The model failed and this server cannot generate: {broken}"
            if broken
            else "The model is still loading; retry shortly.",
            code="model_failed" if broken else "model_not_ready",
            headers={"retry-after": "5"},
        )


def build_models(settings: Settings) -> ServedModels:
    """The backends ``settings`` describe: the models file's entries, else the one ``MODEL``.

    Raises:
        SettingsError: the models file is invalid.
    """
    from server.engine.factory import build_engine  # torch is imported only if a Transformers model is served

    models = ServedModels()
    if settings.models_file is None:
        models.add(settings.model_name, build_engine(settings))
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
            models.add(entry.name, build_engine(local))
    return models
