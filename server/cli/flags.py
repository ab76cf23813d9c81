"""``llm-server serve``'s flags, grouped as in ``--help``, and their mapping onto settings.

Each flag is a setting (``--max-batch-size`` is ``MAX_BATCH_SIZE``): a flag left out keeps what the environment or
``.env`` says, a flag given overrides both. The names follow ``vllm serve`` where the two share a meaning.
"""

from __future__ import annotations

import argparse
import typing
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec

from server.settings import ENV_PREFIX, Settings

_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}


class FlagError(ValueError):
    """Flags that contradict each other; the message is one line."""


def package_version() -> str:
    """The installed ``llm-server`` distribution's version."""
    try:
        return version("llm-server")
    except PackageNotFoundError:  # a bare source tree on sys.path, never installed
        return "0+unknown"


def _choices(name: str) -> list[str]:
    """The values of a ``Literal`` setting, so a flag's choices never drift from the setting's."""
    annotation = typing.get_type_hints(Settings)[name]
    return [str(value) for value in typing.get_args(annotation)]


def _env(name: str) -> str:
    return f"[{ENV_PREFIX}{name.upper()}]"


def _add(group: Any, flag: str, help: str, **kwargs: Any) -> None:
    """A flag whose destination is the setting of the same name; its help ends with that setting's variable."""
    dest = flag.removeprefix("--").replace("-", "_")
    assert dest in _FIELDS, dest
    if kwargs.get("type") is int:
        kwargs.setdefault("metavar", "N")
    group.add_argument(flag, dest=dest, help=f"{help} {_env(dest)}", **kwargs)


def _api_key(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the key is empty")
    if "," in value:
        raise argparse.ArgumentTypeError("a key may not contain a comma (LLM_SERVER_API_KEYS separates keys by commas)")
    return value.strip()


def add_serve_command(sub: Any) -> argparse.ArgumentParser:
    """Register ``serve`` and its flags, in groups, on the top-level subparsers."""
    serve: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the server (settings from LLM_SERVER_* env vars and .env; flags override both)",
        description="Run the OpenAI-compatible server. Every flag is a setting: without the flag, its "
        "LLM_SERVER_* variable (shown in brackets) or .env applies; with it, the flag wins.",
    )
    serve.add_argument("--version", action="version", version=f"llm-server {package_version()}")

    model = serve.add_argument_group("model")
    model.add_argument(
        "model_positional",
        nargs="?",
        metavar="MODEL",
        help="same as --model (as in `vllm serve MODEL`); giving both, differently, is an error",
    )
    _add(
        model,
        "--model",
        "HF hub id, folder, .gguf file, builtin:tiny-chat (default) or builtin:echo",
        metavar="ID_OR_PATH",
    )
    _add(model, "--served-model-name", "model id clients send (default: derived from the model)", metavar="NAME")
    _add(
        model,
        "--revision",
        "hub revision of the model: branch, tag or commit (default: the default branch)",
        metavar="REV",
    )
    _add(
        model, "--tokenizer", "hub id or folder of the tokenizer, when it is not the model's own", metavar="ID_OR_PATH"
    )
    _add(
        model, "--gguf-file", "the GGUF file to load from a hub repository or folder given as the model", metavar="FILE"
    )
    _add(
        model,
        "--trust-remote-code",
        "run Python code that the model's hub repository ships (custom architectures). Off by default: that "
        "code runs with this server's rights, so enable it only for repositories you trust",
        action=argparse.BooleanOptionalAction,
    )
    _add(model, "--device", "where the model runs; auto: cuda, then mps, then cpu", choices=_choices("device"))
    _add(model, "--dtype", "weights' dtype; auto: bfloat16 where supported, else float32", choices=_choices("dtype"))
    _add(model, "--max-model-len", "context window used to validate requests (default: the model's)", type=int)
    _add(model, "--models-file", "TOML file of served models, local and remote (replaces --model)", metavar="FILE")
    _add(
        model,
        "--task",
        "generate (chat, completions) or embed (/v1/embeddings); auto: embed for a sentence-transformers folder",
        choices=_choices("task"),
    )
    _add(
        model,
        "--pooling",
        "an embedding model's pooling; auto: its sentence-transformers configuration, else the last token",
        choices=_choices("pooling"),
    )
    _add(
        model,
        "--normalize",
        "scale embeddings to unit length (default: as the model's configuration says)",
        action=argparse.BooleanOptionalAction,
    )

    chat = serve.add_argument_group("chat format")
    _add(
        chat,
        "--chat-template",
        "a Jinja chat template, as a file path or inline, used instead of the model's own",
        metavar="TEMPLATE",
    )
    _add(
        chat,
        "--tool-call-parser",
        "format of the model's tool calls (auto: the one its chat template uses)",
        choices=_choices("tool_call_parser"),
    )
    _add(
        chat,
        "--reasoning-parser",
        "think: text between <think> and </think> goes to reasoning_content (auto: when the template uses them)",
        choices=_choices("reasoning_parser"),
    )

    batching = serve.add_argument_group("batching and queueing")
    _add(batching, "--max-batch-size", "most sequences decoded together (default 32)", type=int)
    _add(batching, "--max-batch-tokens", "KV budget of the running batch, rows x cache width (default 65536)", type=int)
    _add(batching, "--prefill-chunk-tokens", "most prompt tokens prefilled per engine step (default 256)", type=int)
    _add(batching, "--prefix-cache-mb", "memory for reusing prompt prefixes' KV, MiB; 0: off (default 1024)", type=int)
    _add(
        batching,
        "--prefix-cache-scope",
        "who shares cached prefixes: key, role or global (default key)",
        choices=_choices("prefix_cache_scope"),
    )
    _add(batching, "--max-queue-size", "requests waiting for a batch slot; past it 503 (default 256)", type=int)
    _add(
        batching,
        "--max-sequences-per-key",
        "most sequences one key may have running or queued (default: a quarter of the queue)",
        type=int,
    )

    gateway = serve.add_argument_group("gateway and auth")
    gateway.add_argument(
        "--api-key",
        dest="api_key",
        action="append",
        type=_api_key,
        metavar="KEY",
        help="a static API key with admin rights, no `keys create` needed (repeatable; at least 16 characters; "
        "never stored or logged). Flags are visible in the process list: LLM_SERVER_API_KEYS (comma-separated) "
        "keeps the keys out of it [LLM_SERVER_API_KEYS]",
    )

    server = serve.add_argument_group("network and state")
    _add(server, "--host", "interface to bind (default 127.0.0.1)", metavar="HOST")
    _add(server, "--port", "port (default 8000)", type=int)
    _add(server, "--data-dir", "local state folder (default ./.llm-server)", metavar="DIR")

    logging_ = serve.add_argument_group("logging")
    _add(logging_, "--log-level", "minimum level logged (default INFO)", type=str.upper, choices=_choices("log_level"))
    _add(logging_, "--log-format", "console for people, json for one object per line", choices=_choices("log_format"))
    return serve


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that ``serve``'s flags set (``None``: not given, the environment's value stands).

    Raises:
        FlagError: ``MODEL`` and ``--model`` disagree.
    """
    overrides = {name: value for name, value in vars(args).items() if name in _FIELDS}
    positional = args.model_positional
    if positional is not None:
        if args.model is not None and args.model != positional:
            raise FlagError(f"the model is given twice, as MODEL ({positional!r}) and --model ({args.model!r})")
        overrides["model"] = positional
    overrides["api_keys"] = ",".join(args.api_key) if args.api_key else None
    return overrides
