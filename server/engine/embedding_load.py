"""Load an embedding model: a sentence-transformers folder read from its own module configs, or a bare encoder/decoder.

The ``sentence-transformers`` library is not used at run time: of its pipeline the server needs only the
transformer, pooling and normalize steps, and the library would bring scikit-learn and SciPy into the server. A
folder's ``modules.json`` names its steps; any step beyond those three (Dense, LayerNorm, ...) would change the
vectors, so it is a load failure that names it rather than vectors the model was never trained to give.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils.hub import cached_file

from server.engine.hf_load import quiet_hub_output
from server.engine.hf_tokenizer import HFTokenizer
from server.engine.loading import LoadOptions

logger = logging.getLogger("server.engine")

Pooling = Literal["mean", "cls", "last", "max"]

_ST_PREFIX = "sentence_transformers."
# Both the 2.x names (sentence_transformers.models.Pooling) and the module paths newer releases save
# (sentence_transformers.sentence_transformer.modules.pooling.Pooling) end in the class name.
_ST_STEPS = ("Transformer", "Pooling", "Normalize")
_POOLING_MODES: dict[str, Pooling] = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last"}
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}


class EmbeddingLoadError(ValueError):
    """The folder describes an embedding pipeline this server cannot reproduce exactly."""


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    """How token states become a vector, as the model's files (and the settings over them) say.

    Attributes:
        subfolder: Where the transformer's weights live inside the repository or folder (``""``: at its root).
        pooling: How the token states of one input become one vector.
        normalize: Scale each vector to unit length.
        max_seq_length: The most tokens per input the model was trained with, when its files say.
        do_lower_case: Lower-case text before tokenizing (sentence-transformers' own switch).
        truncatable: The model declares Matryoshka dimensions.
        sentence_transformers: It is a sentence-transformers folder (``modules.json``).
    """

    subfolder: str
    pooling: Pooling
    normalize: bool
    max_seq_length: int | None = None
    do_lower_case: bool = False
    truncatable: bool = False
    sentence_transformers: bool = False


@dataclass(frozen=True, slots=True)
class LoadedEmbedder:
    """A loaded encoder (its base model, no head) in eval mode on its device, and what to do with its states."""

    model: Any
    tokenizer: HFTokenizer
    spec: EmbeddingSpec
    max_model_len: int
    dimensions: int
    seconds: float


class LowerCasingTokenizer(HFTokenizer):
    """A tokenizer whose ``encode`` lower-cases text first (a sentence-transformers ``do_lower_case`` model)."""

    def encode(self, text: str) -> list[int]:
        return super().encode(text.lower())


def read_spec(
    source: str, options: LoadOptions, *, pooling: str = "auto", normalize: bool | None = None
) -> EmbeddingSpec:
    """The embedding pipeline of ``source`` (a hub id or folder); ``pooling``/``normalize`` other than auto/None win.

    Without ``modules.json`` the model is taken as a decoder embedding model: last-token pooling, normalized.

    Raises:
        EmbeddingLoadError: a step or pooling mode this server does not implement.
    """
    modules = _read_json(source, "modules.json", options)
    if modules is None:
        spec = EmbeddingSpec(subfolder="", pooling="last", normalize=True, truncatable=_truncatable(source, options))
    else:
        spec = _read_sentence_transformers(source, modules, options)
    return EmbeddingSpec(
        subfolder=spec.subfolder,
        pooling=spec.pooling if pooling == "auto" else _setting_pooling(pooling),
        normalize=spec.normalize if normalize is None else normalize,
        max_seq_length=spec.max_seq_length,
        do_lower_case=spec.do_lower_case,
        truncatable=spec.truncatable,
        sentence_transformers=spec.sentence_transformers,
    )


def load_embedder(
    source: str,
    options: LoadOptions,
    *,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    pooling: str = "auto",
    normalize: bool | None = None,
    max_model_len: int | None = None,
) -> LoadedEmbedder:
    """Load ``source``'s transformer (``AutoModel``: the base model, no head) and tokenizer as ``options`` say."""
    if not options.progress_bars:
        quiet_hub_output()
    started = time.perf_counter()
    spec = read_spec(source, options, pooling=pooling, normalize=normalize)
    logger.info(
        "loading embedding model %s from %s (revision %s) on %s as %s: %s pooling%s",
        *(name, source, options.revision or "default", device, str(dtype).removeprefix("torch.")),
        *(spec.pooling, ", normalized" if spec.normalize else ""),
    )
    common: dict[str, Any] = {"revision": options.revision, "trust_remote_code": options.trust_remote_code}
    where: dict[str, Any] = {"subfolder": spec.subfolder} if spec.subfolder else {}
    model: Any = AutoModel.from_pretrained(source, dtype=dtype, **common, **where)
    tokenizer_source = options.tokenizer or source
    hf_tokenizer: Any = AutoTokenizer.from_pretrained(
        tokenizer_source, **common, **({} if options.tokenizer else where)
    )
    model = model.to(device)
    model.eval()
    config = model.config.get_text_config()
    positions = getattr(config, "max_position_embeddings", None)
    limit = max_model_len or spec.max_seq_length or positions
    if not limit:
        raise EmbeddingLoadError(f"{source}: neither its files nor the config say how long an input may be")
    if positions and limit > positions and getattr(config, "position_embedding_type", None) == "absolute":
        raise EmbeddingLoadError(f"{source}: max_model_len {limit} exceeds the model's {positions} positions")
    wrapper = LowerCasingTokenizer(hf_tokenizer) if spec.do_lower_case else HFTokenizer(hf_tokenizer)
    return LoadedEmbedder(
        model=model,
        tokenizer=wrapper,
        spec=spec,
        max_model_len=int(limit),
        dimensions=int(config.hidden_size),
        seconds=time.perf_counter() - started,
    )


def _read_sentence_transformers(source: str, modules: Any, options: LoadOptions) -> EmbeddingSpec:
    if not isinstance(modules, list):
        raise EmbeddingLoadError(f"{source}: modules.json is not a list of modules")
    kinds = [_step(source, module) for module in modules]
    if kinds.count("Transformer") != 1 or kinds[0] != "Transformer":
        raise EmbeddingLoadError(f"{source}: modules.json must start with its one Transformer module")
    subfolder = str(modules[0].get("path") or "")
    pooling: Pooling = "cls"  # sentence-transformers' own choice when a Transformer has no Pooling module
    for module, kind in zip(modules, kinds, strict=True):
        if kind == "Pooling":
            path = str(module.get("path") or "")
            pooling = _pooling_mode(
                source, _read_json(source, f"{path}/config.json" if path else "config.json", options)
            )
    bert_config = _read_json(source, _join(subfolder, "sentence_bert_config.json"), options) or {}
    max_seq_length = bert_config.get("max_seq_length")
    return EmbeddingSpec(
        subfolder=subfolder,
        pooling=pooling,
        normalize="Normalize" in kinds,
        max_seq_length=int(max_seq_length) if isinstance(max_seq_length, int) else None,
        do_lower_case=bool(bert_config.get("do_lower_case", False)),
        truncatable=_truncatable(source, options, subfolder),
        sentence_transformers=True,
    )


def _step(source: str, module: Any) -> str:
    kind = module.get("type") if isinstance(module, dict) else None
    name = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else ""
    if not isinstance(kind, str) or not kind.startswith(_ST_PREFIX) or name not in _ST_STEPS:
        raise EmbeddingLoadError(
            f"{source}: unsupported sentence-transformers module {kind!r} in modules.json (this server runs only "
            "Transformer, Pooling and Normalize)"
        )
    return name


def _pooling_mode(source: str, config: Any) -> Pooling:
    if not isinstance(config, dict):
        raise EmbeddingLoadError(f"{source}: the Pooling module has no config.json")
    mode = config.get("pooling_mode")
    modes: Sequence[Any]
    if mode is None:
        modes = [value for key, value in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        modes = modes or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise EmbeddingLoadError(f"{source}: pooling modes {list(modes)} at once (concatenated) are not supported")
    if modes[0] not in _POOLING_MODES:
        raise EmbeddingLoadError(
            f"{source}: unsupported pooling mode {modes[0]!r} (supported: {', '.join(_POOLING_MODES)})"
        )
    return _POOLING_MODES[modes[0]]


def _setting_pooling(value: str) -> Pooling:
    if value not in ("mean", "cls", "last", "max"):
        raise EmbeddingLoadError(f"unknown pooling {value!r}; expected auto, mean, cls, last or max")
    return value  # type: ignore[return-value]


def _truncatable(source: str, options: LoadOptions, subfolder: str = "") -> bool:
    """Whether the model declares Matryoshka dimensions (``matryoshka_dimensions``, as e.g. Jina's configs do)."""
    names = ("config_sentence_transformers.json", _join(subfolder, "config.json"))
    for name in names:
        config = _read_json(source, name, options)
        if isinstance(config, dict) and config.get("matryoshka_dimensions"):
            return True
    return False


def _join(subfolder: str, name: str) -> str:
    return f"{subfolder.rstrip('/')}/{name}" if subfolder else name


def _read_json(source: str, name: str, options: LoadOptions) -> Any:
    """``name`` inside ``source`` parsed, or ``None`` when it has no such file (read locally or from the hub)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / name
        if not path.is_file():
            return None
    else:
        found = cached_file(
            source,
            name,
            revision=options.revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if found is None:
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingLoadError(f"{source}: cannot read {name}: {exc}") from None
