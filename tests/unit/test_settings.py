"""Settings: env, .env, CLI overrides, and one-line errors naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings, SettingsError, load_settings


def test_defaults_match_the_spec(tmp_path: Path) -> None:
    s = load_settings(environ={}, dotenv=tmp_path / "missing.env")
    assert (s.host, s.port, s.model, s.device, s.dtype) == ("127.0.0.1", 8000, "builtin:tiny-chat", "auto", "auto")
    assert s.model_name == "tiny-chat"
    assert s.data_dir == Path(".llm-server")


def test_precedence_dotenv_env_flags(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        'LLM_SERVER_PORT=7000\nexport LLM_SERVER_HOST="0.0.0.0"  \n# comment\nLLM_SERVER_DTYPE=float32 # x\n'
    )
    s = load_settings(environ={}, dotenv=dotenv)
    assert (s.port, s.host, s.dtype) == (7000, "0.0.0.0", "float32")
    s = load_settings(environ={"LLM_SERVER_PORT": "7100"}, dotenv=dotenv)
    assert s.port == 7100
    s = load_settings({"port": 7200, "host": None}, environ={"LLM_SERVER_PORT": "7100"}, dotenv=dotenv)
    assert (s.port, s.host) == (7200, "0.0.0.0")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LLM_SERVER_PORT": "eighty"}, "LLM_SERVER_PORT"),
        ({"LLM_SERVER_PORT": "70000"}, "LLM_SERVER_PORT"),
        ({"LLM_SERVER_DEVICE": "tpu"}, "LLM_SERVER_DEVICE"),
        ({"LLM_SERVER_MAX_QUEUE_SIZE": "0"}, "LLM_SERVER_MAX_QUEUE_SIZE"),
        ({"LLM_SERVER_LOG_FORMAT": "xml"}, "LLM_SERVER_LOG_FORMAT"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], needle: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as exc:
        load_settings(environ=env, dotenv=None)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_flag_error_names_the_flag() -> None:
    with pytest.raises(SettingsError, match="--port"):
        load_settings({"port": -5}, environ={}, dotenv=None)


def test_served_model_name_derivation(tmp_path: Path) -> None:
    assert Settings(model="Qwen/Qwen2.5-0.5B-Instruct").model_name == "Qwen/Qwen2.5-0.5B-Instruct"
    assert Settings(model=str(tmp_path)).model_name == tmp_path.name
    assert Settings(model="builtin:echo", served_model_name="x").model_name == "x"


def test_cli_reports_bad_setting_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve"],
        env={"LLM_SERVER_PORT": "nope", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "LLM_SERVER_PORT" in out.stderr and "Traceback" not in out.stderr


def test_cli_bad_flag_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--device", "tpu"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "--device" in out.stderr
