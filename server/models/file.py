"""The models file (``MODELS_FILE`` / ``serve --models-file``): every served model and the backend behind it.

A TOML file with one ``[[models]]`` table per served model. ``backend = "hf"`` runs the model in this
process; ``backend = "openai"`` forwards requests to an OpenAI-compatible upstream (vLLM, TGI, another
llm-server). The file is validated completely at start-up; the first problem stops ``serve`` with one line that
names the file, the entry and the field.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from server.settings import SettingsError

Name = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\s/][^\s]*$")]


class LocalModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="backend", tag="hf"):
    """A model run in this process by the Transformers engine (or ``builtin:echo``)."""

    name: Name
    """The id clients send and ``/v1/models`` lists."""
    model: Annotated[str, Meta(min_length=1)]
    """Hugging Face id, local folder or ``.gguf`` file, as ``MODEL``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit), as ``REVISION``."""
    gguf_file: str | None = None
    """The GGUF file inside ``model`` (a hub repository or folder), as ``GGUF_FILE``."""
    tokenizer: str | None = None
    """Hub id or folder of the tokenizer when it is not the model's own, as ``TOKENIZER``."""
    trust_remote_code: bool | None = None
    """Overrides ``TRUST_REMOTE_CODE`` for this model (runs code its repository ships)."""
    chat_template: str | None = None
    """A Jinja chat template (file path or inline) used instead of the model's, as ``CHAT_TEMPLATE``."""
    device: Literal["auto", "cpu", "cuda", "mps"] | None = None
    """Overrides ``DEVICE`` for this model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    """Overrides ``DTYPE`` for this model."""
    max_model_len: Annotated[int, Meta(ge=16)] | None = None
    """Context window used for validation; the model's own when unset."""
    task: Literal["auto", "generate", "embed"] | None = None
    """Overrides ``TASK`` for this model: ``embed`` serves ``/v1/embeddings``."""
    pooling: Literal["auto", "mean", "cls", "last", "max"] | None = None
    """Overrides ``POOLING`` for this embedding model."""
    normalize: bool | None = None
    """Overrides ``NORMALIZE`` for this embedding model."""


class RemoteModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="backend", tag="openai"):
    """A model served by an OpenAI-compatible upstream."""

    name: Name
    """The id clients send and ``/v1/models`` lists."""
    base_url: str
    """The upstream's API root, ending in ``/v1`` (``http://gpu-node-1:8000/v1``)."""
    upstream_model: str | None = None
    """The ``model`` sent upstream; ``name`` when unset."""
    api_key_env: str | None = None
    """Name of the environment variable holding the upstream's key (never the key itself); no key when unset."""
    timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    """Longest wait for the upstream: to connect, for its first byte (the whole answer of a non-streaming request)
    and between two pieces of a stream. Past it the client gets 504 ``upstream_timeout``."""
    max_concurrency: Annotated[int, Meta(ge=1)] = 64
    """Requests this replica sends the upstream at once; more wait for a slot (up to ``timeout_s``, then 503)."""
    max_model_len: Annotated[int, Meta(ge=16)] | None = None
    """The upstream model's context window: bounds the quota reservation of a request without ``max_tokens``."""
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    """Retries (with backoff) of a request that failed before its first byte with a connection error or a 502, 503
    or 504."""
    health_interval_s: Annotated[float, Meta(ge=1)] = 15.0
    """How often this replica checks ``GET {base_url}/models`` for ``/readyz``."""
    responses_api: bool = False
    """The upstream serves ``/v1/responses``: Responses turns are forwarded there (the whole conversation, with
    ``store: false``; the state stays here) instead of being translated to chat completions."""

    @property
    def target_model(self) -> str:
        """The model name the upstream knows."""
        return self.upstream_model or self.name


ModelEntry = LocalModel | RemoteModel


class ModelsFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole file."""

    models: Annotated[list[ModelEntry], Meta(min_length=1)]


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load_models_file(path: Path, environ: dict[str, str] | None = None) -> list[ModelEntry]:
    """Read and validate ``path``.

    Raises:
        SettingsError: the file is missing, not TOML, or an entry is invalid; the message names where.
    """
    env = dict(os.environ) if environ is None else environ
    where = f"models file {str(path)!r}"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{where} is not valid TOML: {exc}") from None
    try:
        parsed = msgspec.convert(raw, ModelsFile)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{where}: {_describe(raw, exc)}") from None
    seen: set[str] = set()
    for i, entry in enumerate(parsed.models):
        label = f"{where}: models[{i}] ({entry.name!r})"
        if entry.name in seen:
            raise SettingsError(f"{label}: the name is used by an earlier entry")
        seen.add(entry.name)
        if isinstance(entry, RemoteModel):
            _check_remote(entry, label, env)
    return parsed.models


def _check_remote(entry: RemoteModel, label: str, env: dict[str, str]) -> None:
    url = urlsplit(entry.base_url)
    if url.username or url.password:  # checked first: the message below shows the URL
        raise SettingsError(f"{label}: base_url must not contain credentials; name an env var in api_key_env")
    if url.scheme not in ("http", "https") or not url.hostname:
        shown = "" if "@" in entry.base_url else f", got {entry.base_url!r}"
        raise SettingsError(f"{label}: base_url must be an http:// or https:// URL{shown}")
    if entry.api_key_env is not None:
        if not _ENV_NAME.match(entry.api_key_env):
            raise SettingsError(f"{label}: api_key_env must be the NAME of an environment variable")
        if not env.get(entry.api_key_env):
            raise SettingsError(f"{label}: the environment variable {entry.api_key_env} (api_key_env) is not set")


def _describe(raw: object, exc: msgspec.ValidationError) -> str:
    """msgspec's message with ``$.models[1].timeout_s`` turned into ``models[1] ('big'): timeout_s``."""
    text = str(exc)
    match = re.search(r"at `\$\.models\[(\d+)\](?:\.(\w+))?", text)
    if not match:
        return text.replace("`$.", "`").replace("`$`", "the file")
    i, field = int(match.group(1)), match.group(2)
    models = raw.get("models") if isinstance(raw, dict) else None
    name = models[i].get("name") if isinstance(models, list) and isinstance(models[i], dict) else None
    detail = text.split(" - at ")[0]
    if field == "backend" or "`backend`" in detail or (detail.startswith("Invalid value") and field is None):
        detail = f"{detail} (backend must be 'hf' or 'openai')"
    label = f"models[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")
    return f"{label}: {field}: {detail}" if field else f"{label}: {detail}"


def api_key(entry: RemoteModel, environ: dict[str, str] | None = None) -> str | None:
    """The upstream key from the variable ``entry.api_key_env`` names."""
    if entry.api_key_env is None:
        return None
    env = os.environ if environ is None else environ
    return env.get(entry.api_key_env) or None
