"""Built-in demo models, built offline and deterministically.

The server must run (and its tests must pass) with no model hub. ``builtin:tiny-chat`` is a 2-layer Llama with
random weights and a byte-level BPE tokenizer trained on the stdlib's ``pydoc_data.topics`` text: it produces
noise, but shapes, EOS, stopping and streaming behave as with a real model. ``bench-0.5b`` has Qwen2.5-0.5B's
dimensions for throughput measurements. Llama is used for both because a Qwen2 config makes ``AutoTokenizer``
pick ``Qwen2Tokenizer``, which rebuilds the pre-tokenizer and changes the trained tokenizer's ids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

logger = logging.getLogger("server.engine")

Preset = Literal["tiny", "bench-0.5b"]

BUILTIN_MODELS: Final[dict[str, Preset]] = {"builtin:tiny-chat": "tiny"}

ENDOFTEXT: Final = "<|endoftext|>"
IM_START: Final = "<|im_start|>"
IM_END: Final = "<|im_end|>"
SPECIAL_TOKENS: Final = (ENDOFTEXT, IM_START, IM_END)

# Qwen-style ChatML. Content may be a string, null, or a list of {"type": "text", "text": ...} parts (OpenAI's
# shape); other part types are rejected rather than silently dropped. With ``tools`` it renders them the way
# Qwen2.5 (Hermes format) does: a system block listing them inside <tools></tools> (after the first system
# message's text, which it absorbs), assistant tool calls as <tool_call> blocks and tool results as
# <tool_response> blocks in one user turn per run of tool messages. Without tools the output is plain ChatML.
CHAT_TEMPLATE: Final = (
    "{%- macro render_content(content) -%}\n"
    "{%- if content is string -%}\n"
    "{{- content -}}\n"
    "{%- elif content is not none -%}\n"
    "{%- for part in content -%}\n"
    "{%- if part['type'] != 'text' -%}\n"
    "{{- raise_exception('only text content parts are supported, got ' ~ part['type']) -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{{- content | map(attribute='text') | join('') -}}\n"
    "{%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- if tools -%}\n"
    "{{- '<|im_start|>system\\n' -}}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{{- render_content(messages[0]['content']) + '\\n\\n' -}}\n"
    "{%- endif -%}\n"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' -}}\n"
    "{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}\n"
    "{%- for tool in tools -%}\n"
    "{{- '\\n' + (tool | tojson) -}}\n"
    "{%- endfor -%}\n"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    ' + \'{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' -}}\n'
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if tools and loop.first and message['role'] == 'system' -%}\n"
    "{%- elif message['role'] == 'tool' -%}\n"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}\n"
    "{{- '<|im_start|>user' -}}\n"
    "{%- endif -%}\n"
    "{{- '\\n<tool_response>\\n' + render_content(message['content']) + '\\n</tool_response>' -}}\n"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] -%}\n"
    "{{- '<|im_start|>assistant' -}}\n"
    "{%- set content = render_content(message['content']) -%}\n"
    "{%- if content -%}\n"
    "{{- '\\n' + content -}}\n"
    "{%- endif -%}\n"
    "{%- for call in message['tool_calls'] -%}\n"
    "{%- set function = call['function'] if call['function'] is defined else call -%}\n"
    "{%- set arguments = function['arguments'] -%}\n"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' -}}\n"
    "{{- (arguments if arguments is string else arguments | tojson) + '}\\n</tool_call>' -}}\n"
    "{%- endfor -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render_content(message['content']) + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

_MARKER: Final = "llm_server_demo.json"
# Bump when the build changes, so stale folders in data dirs are rebuilt instead of reused.
_FORMAT: Final = 2
_REQUIRED_FILES: Final = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    _MARKER,
)
_SEED: Final = 1234
_TOKENIZER_VOCAB: Final = 1536

_PRESETS: Final[dict[str, dict[str, Any]]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "dtype": "float32",
    },
    "bench-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "rope_theta": 1_000_000.0,
        "vocab_size": 151936,
        "dtype": "bfloat16",
    },
}


def demo_preset(path: str | Path) -> str | None:
    """The preset of a folder written by :func:`write_demo_model`, or ``None`` for any other model."""
    try:
        marker = json.loads((Path(path) / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(marker.get("preset")) if isinstance(marker, dict) else None


def is_complete(path: Path, preset: Preset | None = None) -> bool:
    """Whether ``path`` holds a finished demo model (of ``preset``, when given) of the current build format."""
    if not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(marker.get("format") == _FORMAT and (preset is None or marker.get("preset") == preset))


def write_demo_model(path: str | Path, preset: Preset = "tiny") -> Path:
    """Build a demo model folder loadable with ``AutoTokenizer``/``AutoModelForCausalLM``.

    The folder is built in a temporary directory beside ``path`` and renamed into place, so readers never see a
    half-written model and two processes racing to build it both end up with one complete folder (the build is
    deterministic, so either copy is the same). An existing complete folder of the same preset is kept.

    Args:
        path: Destination folder.
        preset: ``"tiny"`` (2 layers, hidden 64; builds in a few seconds the first time in a process, well under
            one after) or ``"bench-0.5b"`` (Qwen2.5-0.5B dimensions, bfloat16, ~1 GB, several seconds).

    Returns:
        The destination path.
    """
    if preset not in _PRESETS:
        raise ValueError(f"unknown demo model preset {preset!r}; expected one of {sorted(_PRESETS)}")
    dest = Path(path)
    if is_complete(dest, preset):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _build(tmp, preset)
        _install(tmp, dest, preset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo model %s written to %s in %.2fs", preset, dest, time.perf_counter() - started)
    return dest


def resolve_builtin(model: str, data_dir: Path) -> Path:
    """Return the folder of built-in model ``model``, building it on first use.

    Args:
        model: A ``builtin:`` name, e.g. ``"builtin:tiny-chat"``.
        data_dir: The server's data directory; models live in ``data_dir/models/<name>``.

    Raises:
        ValueError: ``model`` is not a known built-in model.
    """
    preset = BUILTIN_MODELS.get(model)
    if preset is None:
        raise ValueError(f"unknown built-in model {model!r}; known: {sorted(BUILTIN_MODELS)}")
    return write_demo_model(Path(data_dir) / "models" / model.removeprefix("builtin:"), preset)


def _install(tmp: Path, dest: Path, preset: Preset) -> None:
    """Rename ``tmp`` to ``dest``; a complete ``dest`` wins, an incomplete or other-preset one is replaced."""
    error: OSError | None = None
    for _ in range(5):
        try:
            tmp.rename(dest)  # atomic; replaces only a missing or empty directory
            return
        except OSError as exc:
            error = exc
            if not dest.exists():
                continue  # it vanished meanwhile (another process moving a stale copy aside): try again
            if is_complete(dest, preset):
                return  # another process won the race with an identical build
            # Move the stale folder aside first so the swap itself stays a single rename.
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            try:
                dest.rename(trash / dest.name)
            except FileNotFoundError:
                pass  # someone else moved it already
            finally:
                shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not install the demo model at {dest}") from error


def _build(folder: Path, preset: Preset) -> None:
    # Imported here: the CLI and the fake engine import this module's names without paying for torch.
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.initialization import no_init_weights

    spec = dict(_PRESETS[preset])
    dtype = getattr(torch, spec.pop("dtype"))
    tokenizer: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_tokenizer(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=spec["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    eos_id: int = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id: int = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    rope_theta = spec.pop("rope_theta", 10_000.0)
    spec.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(
        **spec,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # Skip transformers' own init (it draws from the global RNG) and fill the weights from a local generator.
    with no_init_weights():
        model = LlamaForCausalLM._from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.tie_weights()  # skipped along with the init; ties lm_head to the embeddings when the config asks
    generator = torch.Generator().manual_seed(_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, config.initializer_range, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)  # RMSNorm weights
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    model.save_pretrained(folder)
    (folder / _MARKER).write_text(json.dumps({"format": _FORMAT, "preset": preset}) + "\n", encoding="utf-8")
    # mkdtemp makes a 0700 folder (and some files come out 0600): give everything the user's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _train_tokenizer() -> Any:
    import pydoc_data.topics

    topics: dict[str, str] = pydoc_data.topics.topics
    # Sorted keys: a fixed corpus order keeps the trained merges (and so tokenizer.json) byte-identical.
    return train_byte_level_bpe([topics[key] for key in sorted(topics)], _TOKENIZER_VOCAB)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, with the demo's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
