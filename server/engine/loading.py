"""What to load and how (hub id, folder or GGUF file; revision, tokenizer, chat template), and why a load failed.

No torch here: the wiring reads :func:`load_failure_reason` without importing the Transformers stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_UNKNOWN_ARCH = re.compile(r"has model type `([^`]*)` but Transformers does not recognize this architecture")
_MISSING_FILE = re.compile(r"does not appear to have a file named (\S+?)\.?(?:\s|$)")


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How to load a Transformers model beyond its id.

    Args:
        revision: Hub branch, tag or commit; the default branch when ``None``.
        tokenizer: Hub id or folder of the tokenizer when it is not the model's own.
        trust_remote_code: Run code a hub repository ships (custom architectures).
        chat_template: A Jinja template, or the path of a file holding one, used instead of the model's.
        gguf_file: The GGUF file inside the model's repository or folder.
        progress_bars: Show download and conversion progress bars (tqdm, on stderr); off for JSON logs.
    """

    revision: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    gguf_file: str | None = None
    progress_bars: bool = True


def resolve_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(repository or folder, GGUF file name or None)``: a ``model`` ending in ``.gguf`` is a file path, loaded from
    its folder; otherwise ``gguf_file`` names the file inside ``model``."""
    if gguf_file is None and model.lower().endswith(".gguf"):
        path = Path(model).expanduser()
        return str(path.parent), path.name
    return model, gguf_file


def read_chat_template(value: str) -> str:
    """The template text: the file ``value`` names when it is one, else ``value`` itself (an inline template)."""
    if "{" not in value:  # every Jinja template has a tag or an expression; a path has none
        path = Path(value).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the chat template file {str(path)!r}: {exc.strerror or exc}") from None
    return value


def load_failure_reason(model: str, exc: BaseException, *, revision: str | None = None) -> str:
    """One line saying why ``model`` did not load, in words a user can act on.

    Hub errors are often wrapped by Transformers (an ``OSError`` raised from them), so the whole cause chain is read.
    """
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) and not path.exists():
        kind = "file" if model.lower().endswith(".gguf") else "folder"
        return f"no such {kind} {str(path)!r}"
    reason = _hub_reason(model, exc, revision)
    if reason is not None:
        return reason
    text = " ".join(str(exc).split()) or type(exc).__name__
    arch = _UNKNOWN_ARCH.search(text)
    if arch:
        return (
            f"unsupported architecture {arch.group(1)!r}: this Transformers version does not know it (a repository "
            "that ships its own modelling code needs --trust-remote-code)"
        )
    missing = _MISSING_FILE.search(text)
    if missing and missing.group(1).lower().endswith(".gguf"):
        return f"no GGUF file {missing.group(1)!r} in {model!r}"
    return text if len(text) <= 300 else text[:297] + "..."


def _hub_reason(model: str, exc: BaseException, revision: str | None) -> str | None:
    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return None
    for err in _chain(exc):
        # GatedRepoError is a RepositoryNotFoundError: test it first.
        if isinstance(err, GatedRepoError):
            return (
                f"{model!r} is a gated model: accept its terms on huggingface.co and set HF_TOKEN to a token of that "
                "account"
            )
        if isinstance(err, RevisionNotFoundError):
            return f"{model!r} has no revision {revision or 'main'!r} on the Hugging Face hub"
        if isinstance(err, RepositoryNotFoundError):
            return (
                f"no model {model!r} on the Hugging Face hub (a private one needs HF_TOKEN); a local folder must "
                "exist and start with / or ./"
            )
        if isinstance(err, LocalEntryNotFoundError):
            return f"{model!r} is not in the local hub cache and downloads are off (HF_HUB_OFFLINE) or unreachable"
        if isinstance(err, EntryNotFoundError):
            first = " ".join(str(err).split("\n")[0].split())
            return f"a file of {model!r} is missing on the Hugging Face hub: {first}"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def embeds(model: str, task: str) -> bool:
    """Whether ``model`` is served as an embedding model: ``task`` says so, or (``auto``) it is a local
    sentence-transformers folder (one with a ``modules.json``). A hub id under ``auto`` is a generative model: telling
    would need a download before the server has even started."""
    if task != "auto":
        return task == "embed"
    if model.startswith("builtin:") or model.lower().endswith(".gguf"):
        return False
    try:
        return (Path(model).expanduser() / "modules.json").is_file()
    except OSError:
        return False
