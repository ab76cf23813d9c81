"""Model-loading settings reach the engine; a failed load reads as one actionable line (no network: fakes, folders)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from server.engine.factory import build_engine
from server.engine.hf import HFEngine
from server.engine.hf_load import load_pretrained, quiet_hub_output
from server.engine.loading import LoadOptions, load_failure_reason, read_chat_template, resolve_source
from server.settings import Settings
from server.wiring.lifespans import load_failure_reason as wiring_reason
from server.wiring.models import build_models


def hub_error(cls: type[Exception], message: str) -> Exception:
    """A hub exception without the HTTP response its constructor wants (only its type matters here)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def wrapped(err: Exception) -> OSError:
    """What Transformers raises: an ``OSError`` from the hub's exception."""
    try:
        raise OSError("org/model is not a local folder and is not a valid model identifier") from err
    except OSError as exc:
        return exc


def test_gated_missing_and_unknown_revision_read_as_one_line() -> None:
    gated = load_failure_reason("meta-llama/Llama-3.2-1B", wrapped(hub_error(GatedRepoError, "401")))
    assert "gated" in gated and "HF_TOKEN" in gated
    missing = wiring_reason("org/no-such-model", wrapped(hub_error(RepositoryNotFoundError, "404")))
    assert missing.startswith("no model 'org/no-such-model' on the Hugging Face hub")
    revision = load_failure_reason("org/model", hub_error(RevisionNotFoundError, "404"), revision="v9")
    assert revision == "'org/model' has no revision 'v9' on the Hugging Face hub"
    for reason in (gated, missing, revision):
        assert "\n" not in reason


def test_missing_local_paths_name_what_is_missing(tmp_path: Path) -> None:
    assert load_failure_reason(str(tmp_path / "gone"), OSError("x")) == f"no such folder {str(tmp_path / 'gone')!r}"
    gguf = str(tmp_path / "model.Q4_0.gguf")
    assert load_failure_reason(gguf, OSError("x")) == f"no such file {gguf!r}"


def test_an_unknown_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nosucharch"}))
    options = LoadOptions(progress_bars=True)
    with pytest.raises(ValueError) as info:
        load_pretrained(tmp_path, options, name="x", device=torch.device("cpu"), dtype=torch.float32)
    reason = load_failure_reason(str(tmp_path), info.value)
    assert reason.startswith("unsupported architecture 'nosucharch'")
    assert "--trust-remote-code" in reason


def test_a_gguf_file_that_is_not_there(tmp_path: Path) -> None:
    options = LoadOptions(gguf_file="absent.Q4_0.gguf")
    with pytest.raises(OSError) as info:
        load_pretrained(tmp_path, options, name="x", device=torch.device("cpu"), dtype=torch.float32)
    assert load_failure_reason(str(tmp_path), info.value) == f"no GGUF file 'absent.Q4_0.gguf' in {str(tmp_path)!r}"


def test_a_gguf_path_loads_from_its_folder_and_serves_as_its_stem(tmp_path: Path) -> None:
    path = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_source(str(path), None) == (str(tmp_path), path.name)
    assert resolve_source("org/repo-GGUF", "model.Q8_0.gguf") == ("org/repo-GGUF", "model.Q8_0.gguf")
    assert resolve_source("org/repo", None) == ("org/repo", None)
    assert Settings(model=str(path)).model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert Settings(model=str(path), served_model_name="smol").model_name == "smol"


def test_chat_template_is_a_file_or_inline(tmp_path: Path) -> None:
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert read_chat_template(inline) == inline
    file = tmp_path / "template.jinja"
    file.write_text(inline)
    assert read_chat_template(str(file)) == inline
    with pytest.raises(ValueError, match="cannot read the chat template file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_settings_reach_the_engine_and_json_logs_turn_progress_bars_off(tmp_path: Path) -> None:
    settings = Settings(
        model="org/model",
        revision="v2",
        tokenizer="org/tokenizer",
        trust_remote_code=True,
        chat_template="{{ messages }}",
        gguf_file="model.Q4_K_M.gguf",
        log_format="json",
        data_dir=tmp_path,
    )
    engine = build_engine(settings)
    assert isinstance(engine, HFEngine)
    assert engine._load_options == LoadOptions(
        revision="v2",
        tokenizer="org/tokenizer",
        trust_remote_code=True,
        chat_template="{{ messages }}",
        gguf_file="model.Q4_K_M.gguf",
        progress_bars=False,
    )
    console = build_engine(Settings(model="org/model", data_dir=tmp_path))
    assert isinstance(console, HFEngine)
    assert console._load_options == LoadOptions()


def test_models_file_entries_carry_their_own_load_options(tmp_path: Path) -> None:
    file = tmp_path / "models.toml"
    file.write_text(
        '[[models]]\nbackend = "hf"\nname = "smol"\nmodel = "org/smol-GGUF"\ngguf_file = "smol.Q4_1.gguf"\n'
        'revision = "v1"\ntrust_remote_code = true\nchat_template = "t.jinja"\ntokenizer = "org/smol"\n'
        '[[models]]\nbackend = "hf"\nname = "plain"\nmodel = "org/plain"\n'
    )
    models = build_models(Settings(models_file=file, data_dir=tmp_path, revision="ignored"))
    smol, plain = models.engines["smol"], models.engines["plain"]
    assert isinstance(smol, HFEngine) and isinstance(plain, HFEngine)
    assert smol._load_options == LoadOptions(
        revision="v1", tokenizer="org/smol", trust_remote_code=True, chat_template="t.jinja", gguf_file="smol.Q4_1.gguf"
    )
    assert plain._load_options == LoadOptions()


@pytest.fixture
def restore_hub_output() -> Iterator[None]:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    import transformers.utils.logging as hf_logging
    from huggingface_hub.utils.tqdm import enable_progress_bars

    bar = gguf_utils.tqdm
    yield
    gguf_utils.tqdm = bar
    enable_progress_bars()
    hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.disable_propagation()
    hf_logging.enable_default_handler()


def test_quiet_hub_output_leaves_no_bar_and_routes_transformers_logs(restore_hub_output: None) -> None:
    import logging

    import transformers.utils.logging as hf_logging
    from huggingface_hub.utils.tqdm import are_progress_bars_disabled

    quiet_hub_output()
    assert are_progress_bars_disabled()
    assert not hf_logging.is_progress_bar_enabled()  # type: ignore[no-untyped-call]
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    assert gguf_utils.tqdm([1], desc="x").disable  # the GGUF converter's own bar
    root = logging.getLogger("transformers")
    assert root.propagate  # through the root handler's formatter: JSON lines in json mode
    assert not any(type(h) is logging.StreamHandler for h in root.handlers)  # its own raw-text stderr handler


def test_the_chat_template_override_replaces_the_models(tiny_model_dir: Path, tmp_path: Path) -> None:
    inline = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    options = LoadOptions(chat_template=inline)
    loaded = load_pretrained(tiny_model_dir, options, name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    assert loaded.tokenizer.chat_template == inline
