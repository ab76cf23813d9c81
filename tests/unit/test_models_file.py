"""The models file: a valid file with both backends, and every invalid one refused in one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.models.file import LocalModel, RemoteModel, api_key, load_models_file
from server.settings import SettingsError
from tests.process import run_cli

GOOD = """
[[models]]
name = "tiny"
backend = "hf"
model = "builtin:tiny-chat"
dtype = "float32"

[[models]]
name = "big"
backend = "openai"
base_url = "http://gpu-node-1:8000/v1"
api_key_env = "UPSTREAM_KEY"
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
timeout_s = 600
max_concurrency = 64

[[models]]
name = "minimal"
backend = "openai"
base_url = "https://api.example.com/v1"
"""

REMOTE = '[[models]]\nname = "big"\nbackend = "openai"\nbase_url = "http://gpu:8000/v1"\n'
LOCAL = '[[models]]\nname = "tiny"\nbackend = "hf"\nmodel = "builtin:echo"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as err:
        load_models_file(path, {} if environ is None else environ)
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message  # every message names the file
    return message


def test_valid_file_with_both_backends(tmp_path: Path) -> None:
    entries = load_models_file(write(tmp_path, GOOD), {"UPSTREAM_KEY": "sk-upstream"})
    assert [e.name for e in entries] == ["tiny", "big", "minimal"]
    tiny, big, minimal = entries
    assert isinstance(tiny, LocalModel) and tiny.model == "builtin:tiny-chat" and tiny.dtype == "float32"
    assert tiny.device is None and tiny.max_model_len is None
    assert isinstance(big, RemoteModel)
    assert big.base_url == "http://gpu-node-1:8000/v1"
    assert big.target_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (big.timeout_s, big.max_concurrency, big.retries) == (600.0, 64, 2)
    assert api_key(big, {"UPSTREAM_KEY": "sk-upstream"}) == "sk-upstream"
    assert isinstance(minimal, RemoteModel)
    assert minimal.target_model == "minimal"  # upstream_model defaults to the served name
    assert minimal.api_key_env is None and api_key(minimal, {"UPSTREAM_KEY": "x"}) is None


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="does not exist") as err:
        load_models_file(path, {})
    assert str(path) in str(err.value)


def test_bad_toml(tmp_path: Path) -> None:
    message = refused(tmp_path, '[[models]\nname = "x"\n')
    assert "not valid TOML" in message and "line 1" in message


@pytest.mark.parametrize(
    ("text", "entry", "needles"),
    [
        pytest.param(
            '[[models]]\nname = "x"\nbackend = "vllm"\nmodel = "a"\n',
            "models[0] ('x')",
            ["backend", "'vllm'", "'hf' or 'openai'"],
            id="unknown-backend",
        ),
        pytest.param(
            '[[models]]\nname = "x"\nmodel = "a"\n',
            "models[0] ('x')",
            ["backend", "'hf' or 'openai'"],
            id="no-backend",
        ),
        pytest.param(
            LOCAL + REMOTE + "timeout = 5\n",
            "models[1] ('big')",
            ["unknown field", "`timeout`"],
            id="unknown-field-typo",
        ),
        pytest.param(
            LOCAL.replace('backend = "hf"', 'backend = "hf"\nmodle = "x"'),
            "models[0] ('tiny')",
            ["unknown field", "`modle`"],
            id="typo-in-local-entry",
        ),
        pytest.param(
            '[[models]]\nname = "big"\nbackend = "openai"\n',
            "models[0] ('big')",
            ["missing required field", "`base_url`"],
            id="missing-base-url",
        ),
        pytest.param(
            '[[models]]\nname = "tiny"\nbackend = "hf"\n',
            "models[0] ('tiny')",
            ["missing required field", "`model`"],
            id="missing-model",
        ),
        pytest.param(
            '[[models]]\nbackend = "hf"\nmodel = "a"\n',
            "models[0]",
            ["missing required field", "`name`"],
            id="missing-name",
        ),
        pytest.param(
            LOCAL + REMOTE.replace('"big"', '"tiny"'),
            "models[1] ('tiny')",
            ["name", "earlier entry"],
            id="duplicate-name",
        ),
        pytest.param(
            REMOTE.replace("http://gpu:8000/v1", "ftp://gpu/v1"),
            "models[0] ('big')",
            ["base_url", "http://", "https://"],
            id="non-http-base-url",
        ),
        pytest.param(
            REMOTE.replace("http://gpu:8000/v1", "gpu:8000/v1"),
            "models[0] ('big')",
            ["base_url"],
            id="base-url-without-scheme",
        ),
        pytest.param(
            REMOTE + "timeout_s = 0\n",
            "models[0] ('big')",
            ["timeout_s", "> 0"],
            id="timeout-zero",
        ),
        pytest.param(
            LOCAL + REMOTE + "timeout_s = -3\n",
            "models[1] ('big')",
            ["timeout_s", "> 0"],
            id="timeout-negative",
        ),
        pytest.param(
            REMOTE + "max_concurrency = 0\n",
            "models[0] ('big')",
            ["max_concurrency"],
            id="max-concurrency-zero",
        ),
        pytest.param(
            REMOTE + 'timeout_s = "fast"\n',
            "models[0] ('big')",
            ["timeout_s", "Expected `float`"],
            id="timeout-wrong-type",
        ),
    ],
)
def test_invalid_entries_name_the_entry_and_field(tmp_path: Path, text: str, entry: str, needles: list[str]) -> None:
    message = refused(tmp_path, text)
    assert entry in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_backend_hint_only_for_the_backend_field(tmp_path: Path) -> None:
    message = refused(tmp_path, REMOTE.replace("base_url", "backend_url"))
    assert "unknown field `backend_url`" in message and "'hf' or 'openai'" not in message
    assert "'hf' or 'openai'" in refused(tmp_path, REMOTE.replace('"openai"', "3"))


def test_empty_file_and_unknown_top_level_key(tmp_path: Path) -> None:
    assert "`models`" in refused(tmp_path, "")
    assert "unknown field `model`" in refused(tmp_path, 'model = "x"\n')
    assert "models" in refused(tmp_path, "models = []\n")  # at least one entry


@pytest.mark.parametrize(
    "url", ["http://user:pw@gpu:8000/v1", "https://sk-secret@gpu/v1", "ftp://u:pw@gpu/v1", "user:pw@gpu:8000/v1"]
)
def test_credentials_in_base_url_are_refused_without_echoing_them(tmp_path: Path, url: str) -> None:
    message = refused(tmp_path, REMOTE.replace("http://gpu:8000/v1", url))
    assert "models[0] ('big')" in message and "base_url" in message
    assert "pw" not in message and "sk-secret" not in message, message


def test_api_key_env_must_be_set(tmp_path: Path) -> None:
    text = REMOTE + 'api_key_env = "UPSTREAM_KEY"\n'
    message = refused(tmp_path, text, {})
    assert "models[0] ('big')" in message and "api_key_env" in message and "UPSTREAM_KEY" in message
    assert "not set" in message
    # Set but empty counts as unset; set and non-empty is accepted.
    assert "not set" in refused(tmp_path, text, {"UPSTREAM_KEY": ""})
    (entry,) = load_models_file(write(tmp_path, text), {"UPSTREAM_KEY": "sk-x"})
    assert isinstance(entry, RemoteModel) and entry.api_key_env == "UPSTREAM_KEY"


@pytest.mark.parametrize("value", ["sk-live-0123456789abcdef", "MY KEY", "1ABC", "$UPSTREAM_KEY"])
def test_api_key_env_must_be_a_variable_name_and_is_not_echoed(tmp_path: Path, value: str) -> None:
    message = refused(tmp_path, REMOTE + f'api_key_env = "{value}"\n', {value: "x"})
    assert "models[0] ('big')" in message and "api_key_env" in message and "NAME" in message
    assert value not in message  # someone who pasted the key itself must not see it printed


def test_serve_with_a_bad_models_file_exits_with_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path, REMOTE + "timeout = 5\n")
    data = tmp_path / "data"
    for path, needle in ((bad, "unknown field `timeout`"), (tmp_path / "missing.toml", "does not exist")):
        out = run_cli(
            tmp_path,
            *("serve", "--models-file", str(path), "--port", "1"),
            LLM_SERVER_DATA_DIR=str(data),
            HF_HUB_OFFLINE="1",
        )
        assert out.returncode != 0
        err = out.stderr.strip()
        assert err.count("\n") == 0, err
        assert "Traceback" not in err
        assert needle in err and str(path) in err, err
        assert out.stdout == ""
