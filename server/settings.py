"""Settings from ``LLM_SERVER_*`` environment variables and a ``.env`` file (CLI flags override both)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

ENV_PREFIX = "LLM_SERVER_"


class SettingsError(ValueError):
    """An invalid setting; the message is one line that names the variable."""


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Everything the server can be configured with. Field ``x`` is read from ``LLM_SERVER_X``."""

    host: str = "127.0.0.1"
    """Interface ``serve`` binds to."""
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    """TCP port ``serve`` listens on."""
    model: str = "builtin:tiny-chat"
    """Hugging Face model id or local folder; ``builtin:tiny-chat`` or ``builtin:echo`` for the built-ins."""
    served_model_name: str | None = None
    """The model id clients send and ``/v1/models`` lists; derived from ``model`` when unset."""
    revision: str | None = None
    """Hub revision of ``model`` (a branch, tag or commit); the default branch when unset."""
    tokenizer: str | None = None
    """Hub id or folder of the tokenizer, when it is not the model's own."""
    trust_remote_code: bool = False
    """Run Python code that a hub repository ships with its model (custom architectures). Off by default: that code
    runs with the server's rights, so enable it only for repositories you trust."""
    chat_template: str | None = None
    """A Jinja chat template (a file path, or the template itself) used instead of the model's own."""
    gguf_file: str | None = None
    """The GGUF file to load from ``model`` (a hub repository or a folder); a ``model`` that is a ``.gguf`` file path
    needs none."""
    api_keys: str = ""
    """Comma-separated static API keys (``--api-key``), admin rights, for a single-user setup without ``keys create``;
    never stored or logged."""
    task: Literal["auto", "generate", "embed"] = "auto"
    """What the model does: ``generate`` (chat and completions) or ``embed`` (``/v1/embeddings``); ``auto`` embeds
    with a sentence-transformers folder (it has ``modules.json``) and generates otherwise."""
    pooling: Literal["auto", "mean", "cls", "last", "max"] = "auto"
    """How an embedding model turns token states into one vector; ``auto``: its sentence-transformers pooling
    configuration, else ``last`` (a decoder model's last token). Other choices override the configuration."""
    normalize: bool | None = None
    """Whether embeddings are scaled to unit length; unset: as the sentence-transformers folder says (its
    ``Normalize`` module), and on for a decoder model with last-token pooling."""
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = "auto"
    """How tool calls are written by the model and parsed back; ``auto`` picks the format the chat template uses."""
    reasoning_parser: Literal["auto", "none", "think"] = "auto"
    """Where a reasoning model's thinking goes: ``think`` moves text between ``<think>`` and ``</think>`` into
    ``reasoning_content``; ``auto`` does so when the chat template uses those markers; ``none`` leaves it in
    ``content``."""
    models_file: Path | None = None
    """A TOML file listing every served model, in-process (``backend = "hf"``) or remote (``backend = "openai"``);
    when set, ``MODEL`` and ``SERVED_MODEL_NAME`` are not used (README, "Serving several models")."""
    echo_token_delay_ms: Annotated[float, Meta(ge=0, le=10_000)] = 0.0
    """``builtin:echo`` only: pause between streamed tokens, to stand in for a real model's pace in load tests."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where the model runs; ``auto`` picks cuda, then mps, then cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype; ``auto`` is bfloat16 where the device supports it, else float32."""
    max_model_len: Annotated[int, Meta(ge=16)] | None = None
    """Context window used for validation; the model's own when unset."""
    data_dir: Path = Path(".llm-server")
    """Local state: the built-in demo model, the SQLite database and the generated key pepper."""
    max_batch_size: Annotated[int, Meta(ge=1)] = 32
    """Most sequences decoded together."""
    max_queue_size: Annotated[int, Meta(ge=1)] = 256
    """Requests waiting for a batch slot before new ones get 503 ``overloaded``."""
    max_sequences_per_key: Annotated[int, Meta(ge=1)] | None = None
    """Most sequences one key may have running or queued at once on this replica, ``n`` counting each (429 past it),
    so one tenant cannot fill the shared queue; unset: a quarter of ``MAX_QUEUE_SIZE``."""
    max_batch_tokens: Annotated[int, Meta(ge=64)] = 65_536
    """KV budget of the running batch: rows x padded cache width. A request joins only if the merged batch fits with
    room to grow; when growth would overflow it, the newest rows are preempted and later re-prefilled from their
    prompt and generated tokens. A single row always runs."""
    prefill_chunk_tokens: Annotated[int, Meta(ge=16)] = 256
    """Most prompt tokens prefilled per engine step: a running stream waits at most one such chunk plus one decode
    step between tokens (measured on a 2-core CPU with the 0.5B model: ~2.4 s at 256 in float32, ~1.3 s at 64)."""
    prefix_cache_mb: Annotated[int, Meta(ge=0)] = 1024
    """Memory (MiB, on the model's device) that automatic prefix caching may hold: the KV of recent prompts, in blocks
    of 16 tokens, least recently used out first; a prompt that starts like an earlier one (a system prompt, the earlier
    turns of a conversation) is prefilled only from where they differ. 0 turns it off."""
    prefix_cache_scope: Literal["key", "role", "global"] = "key"
    """Who shares cached prefixes: ``key`` (each API key its own, so no tenant can learn another's prompts from
    ``cached_tokens`` or timing), ``role`` (the keys of one role), or ``global`` (every caller)."""
    request_max_body_size: Annotated[int, Meta(ge=1024)] = 10_000_000
    """Largest request body in bytes; larger ones get 413."""
    log_format: Literal["console", "json"] = "console"
    """``console`` for people, ``json`` for one JSON object per line."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Minimum level logged."""
    cors_allow_origins: str = ""
    """Comma-separated origins allowed by CORS; empty disables CORS."""
    database_url: str | None = None
    """SQLAlchemy async URL; ``sqlite+aiosqlite:///<DATA_DIR>/llm_server.db`` when unset, ``postgresql+asyncpg://…``
    in production."""
    auto_migrate: bool = True
    """``serve`` applies pending migrations at start-up."""
    database_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    """Longest wait for the database on a request path before answering 503."""
    ratelimit_storage_uri: str = "async+memory://"
    """Storage of the short-window limits: ``async+memory://`` (one process) or ``async+redis://host:6379/0``."""
    ratelimit_fail_open: bool = True
    """When the rate-limit storage is unreachable: ``true`` admits requests (quotas still apply, they fail
    closed), ``false`` answers 503."""
    quota_lease_requests: Annotated[int, Meta(ge=1, le=1024)] = 16
    """PostgreSQL: most requests' worth of a busy key's monthly quota a replica reserves in one statement, serving
    the next ones from memory (``server.admission.leases``); 1 reserves each request alone."""
    key_pepper: str | None = None
    """Secret for HMAC-SHA-256 of API keys; generated into ``DATA_DIR/key_pepper`` on first run with SQLite, must be
    set explicitly with PostgreSQL."""
    key_cache_ttl_s: Annotated[float, Meta(ge=0)] = 2.0
    """How long a replica trusts a looked-up key; bounds how late a revoke made on another replica takes effect."""
    default_role_rpm: Annotated[int, Meta(ge=1)] | None = 60
    """Requests per minute of the seeded ``default`` role (``unlimited`` for none)."""
    default_role_tpm: Annotated[int, Meta(ge=1)] | None = 100_000
    """Tokens per minute of the seeded ``default`` role (``unlimited`` for none)."""
    default_role_max_concurrency: Annotated[int, Meta(ge=1)] | None = 8
    """Concurrent requests per key of the seeded ``default`` role (``unlimited`` for none)."""
    store_prompts: bool = False
    """Whether the request log keeps prompt and output text."""
    request_log_retention_days: Annotated[int, Meta(ge=0)] = 30
    """Request-log rows older than this are deleted in small chunks (0 keeps them forever)."""
    responses_retention_days: Annotated[int, Meta(ge=0)] = 30
    """Stored ``/v1/responses`` objects (their input and output items) older than this are deleted in small chunks,
    like request-log rows (0 keeps them forever)."""
    cache_enabled: bool = True
    """Completion cache for deterministic requests (temperature 0 or an explicit seed), scoped per key."""
    cache_ttl_s: Annotated[int, Meta(ge=1)] = 3600
    """How long a cached completion is served."""
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 30.0
    """On SIGTERM: how long in-flight requests and streams may run on before they are cancelled."""
    max_messages: Annotated[int, Meta(ge=1)] = 2048
    """Most messages in one chat request."""
    request_read_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    """A request head not complete, or a body that sends nothing, for this long is answered 408 and the connection
    closed (slow or stuck clients cannot hold a slot)."""
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 16_384
    """Largest request head (request line and headers) accepted; a larger one is refused before routing."""
    auth_failures_per_minute: Annotated[int, Meta(ge=1)] | None = 30
    """Failed key checks allowed per client address per minute before 429 (``unlimited`` for none)."""

    @property
    def model_name(self) -> str:
        """The served model name: explicit, else derived from ``model``."""
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith("builtin:"):
            return self.model.removeprefix("builtin:")
        path = Path(self.model)
        if self.model.lower().endswith(".gguf"):
            return path.stem  # a GGUF file path: its name without the folder and the extension
        return path.name if path.exists() else self.model

    @property
    def sequences_per_key(self) -> int:
        """``max_sequences_per_key``, or a quarter of the queue when unset."""
        if self.max_sequences_per_key is not None:
            return self.max_sequences_per_key
        return max(1, self.max_queue_size // 4)

    @property
    def database(self) -> str:
        """The database URL: explicit, else the SQLite file in ``data_dir``."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'llm_server.db'}"

    @property
    def cors_origins(self) -> list[str]:
        """``cors_allow_origins`` split on commas."""
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]


_FIELDS = {f.name for f in msgspec.structs.fields(Settings)}


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file (comments, ``export`` and quotes allowed)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.sub(r"\s+#.*$", "", value)
        values[key.strip()] = value
    return values


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
) -> Settings:
    """Build settings: defaults < ``.env`` < environment < ``overrides`` (CLI flags; ``None`` values skipped).

    Raises:
        SettingsError: a value is invalid; the message names the variable.
    """
    env = dict(read_dotenv(dotenv)) if dotenv is not None else {}
    env.update(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in _FIELDS and value != "":
                raw[name] = None if value.lower() in ("none", "unlimited") else value
                source[name] = key
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value
            source[name] = f"--{name.replace('_', '-')}"
    try:
        return msgspec.convert(raw, Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        match = re.search(r"at `\$\.(\w+)", str(exc))
        name = match.group(1) if match else ""
        where = source.get(name, ENV_PREFIX + name.upper()) if name else "settings"
        detail = str(exc).split(" - at ")[0]
        raise SettingsError(f"invalid {where}={raw.get(name)!r}: {detail}") from None


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError
