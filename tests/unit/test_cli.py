"""The command line: help for every subcommand, serve's flags and their settings, demo-model output, one-line
failures."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from server.cli import build_parser, main
from server.cli.flags import add_serve_command, serve_overrides
from server.settings import Settings, load_settings


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["demo-model", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: llm-server" in capsys.readouterr().out


def test_serve_flags_parse() -> None:
    args = build_parser().parse_args(["serve", "--port", "9", "--model", "builtin:echo", "--device", "cpu"])
    assert (args.port, args.model, args.device) == (9, "builtin:echo", "cpu")


def test_demo_model_writes_a_loadable_folder(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "demo-model", str(tmp_path / "m"), "--preset", "tiny"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "random weights" in out.stdout
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors"):
        assert (tmp_path / "m" / name).is_file()


def test_missing_subcommand_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "server"], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0


# ---- serve's flags: vllm-style names, each one a setting ---------------------------------------------------------

SERVE_FLAGS = [
    (["--model", "org/m"], "model", "org/m"),
    (["--served-model-name", "m"], "served_model_name", "m"),
    (["--revision", "v1.0"], "revision", "v1.0"),
    (["--tokenizer", "org/tok"], "tokenizer", "org/tok"),
    (["--gguf-file", "m.Q4_1.gguf"], "gguf_file", "m.Q4_1.gguf"),
    (["--trust-remote-code"], "trust_remote_code", True),
    (["--no-trust-remote-code"], "trust_remote_code", False),
    (["--chat-template", "{{ messages }}"], "chat_template", "{{ messages }}"),
    (["--device", "cpu"], "device", "cpu"),
    (["--dtype", "float16"], "dtype", "float16"),
    (["--max-model-len", "2048"], "max_model_len", 2048),
    (["--models-file", "models.toml"], "models_file", Path("models.toml")),
    (["--task", "embed"], "task", "embed"),
    (["--pooling", "mean"], "pooling", "mean"),
    (["--normalize"], "normalize", True),
    (["--no-normalize"], "normalize", False),
    (["--tool-call-parser", "mistral"], "tool_call_parser", "mistral"),
    (["--reasoning-parser", "think"], "reasoning_parser", "think"),
    (["--max-batch-size", "4"], "max_batch_size", 4),
    (["--max-batch-tokens", "4096"], "max_batch_tokens", 4096),
    (["--prefill-chunk-tokens", "64"], "prefill_chunk_tokens", 64),
    (["--prefix-cache-mb", "0"], "prefix_cache_mb", 0),
    (["--prefix-cache-scope", "global"], "prefix_cache_scope", "global"),
    (["--max-queue-size", "9"], "max_queue_size", 9),
    (["--max-sequences-per-key", "3"], "max_sequences_per_key", 3),
    (["--api-key", "k" * 16], "api_keys", "k" * 16),
    (["--api-key", "a" * 16, "--api-key", "b" * 16], "api_keys", f"{'a' * 16},{'b' * 16}"),
    (["--host", "0.0.0.0"], "host", "0.0.0.0"),
    (["--port", "9"], "port", 9),
    (["--data-dir", "state"], "data_dir", Path("state")),
    (["--log-level", "debug"], "log_level", "DEBUG"),
    (["--log-format", "json"], "log_format", "json"),
]


def serve_settings(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    args = build_parser().parse_args(["serve", *argv])
    return load_settings(serve_overrides(args), environ=environ or {}, dotenv=None)


@pytest.mark.parametrize(("argv", "field", "value"), SERVE_FLAGS, ids=[" ".join(f[0])[:40] for f in SERVE_FLAGS])
def test_each_flag_sets_its_setting(argv: list[str], field: str, value: object) -> None:
    assert getattr(serve_settings(argv), field) == value
    assert getattr(serve_settings([]), field) != value or field == "trust_remote_code"  # the flag changed it


def test_every_serve_flag_is_a_setting_and_covered_above() -> None:
    serve = add_serve_command(argparse.ArgumentParser().add_subparsers())
    flags = {a.option_strings[0] for a in serve._actions if a.option_strings} - {"-h", "--version"}
    assert flags == {f[0][0] for f in SERVE_FLAGS} - {"--no-trust-remote-code", "--no-normalize"}
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    dests = {a.dest for a in serve._actions if a.option_strings and a.dest not in ("help", "version")}
    assert dests - fields == {"api_key"}  # the one list flag, joined into API_KEYS


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(command path, long option) of every option of ``parser`` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path, name
                yield from _options(sub, (*path, name))
        else:
            yield from ((path, s) for s in action.option_strings if s.startswith("--") and s != "--help")


def test_the_reference_lists_every_command_and_option() -> None:
    reference = (Path(__file__).resolve().parents[2] / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    commands = reference[reference.index("\n## Commands\n") : reference.index("\n## Settings\n")]
    words = set(re.findall(r"--?[a-z][a-z0-9-]*|\b[a-z][a-z-]*\b", commands))
    listed = list(_options(build_parser()))
    assert {"--version", "--prefix-cache-mb", "keys", "generate"} <= {name for _, name in listed}
    assert [f"{' '.join(path)} {name}" for path, name in listed if name not in words] == []


def test_flags_override_the_environment_and_absent_flags_do_not() -> None:
    env = {"LLM_SERVER_MAX_BATCH_SIZE": "4", "LLM_SERVER_TRUST_REMOTE_CODE": "true", "LLM_SERVER_API_KEYS": "e" * 16}
    assert serve_settings(["--max-batch-size", "8"], env).max_batch_size == 8
    kept = serve_settings([], env)
    assert (kept.max_batch_size, kept.trust_remote_code, kept.api_keys) == (4, True, "e" * 16)
    assert serve_settings(["--no-trust-remote-code"], env).trust_remote_code is False
    assert serve_settings(["--api-key", "f" * 16], env).api_keys == "f" * 16  # flags replace, as for every setting


def test_trust_remote_code_is_off_by_default() -> None:
    assert serve_settings([]).trust_remote_code is False


@pytest.mark.parametrize(
    "argv",
    [
        ["org/m"],
        ["--model", "org/m"],
        ["org/m", "--model", "org/m"],
        ["--port", "9", "org/m"],
        ["org/m", "--port", "9"],
    ],
)
def test_the_model_is_positional_or_a_flag(argv: list[str]) -> None:
    assert serve_settings(argv).model == "org/m"


def test_a_model_given_twice_differently_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "org/a", "--model", "org/b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'org/a'" in err and "'org/b'" in err


@pytest.mark.parametrize("bad", [["--api-key", "a,b" * 8], ["--api-key", " "], ["--tool-call-parser", "nope"]])
def test_bad_flag_values_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *bad])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"]])
def test_version_is_the_installed_package_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"llm-server {importlib.metadata.version('llm-server')}"


def test_help_groups_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    groups = ["model:", "chat format:", "batching and queueing:", "gateway and auth:", "network and state:", "logging:"]
    at = [out.index(f"\n{g}\n") for g in groups]
    assert at == sorted(at)
    sections = dict(zip(groups, [out[a:b] for a, b in zip(at, [*at[1:], len(out)], strict=True)], strict=True))
    assert "--gguf-file" in sections["model:"] and "--trust-remote-code" in sections["model:"]
    assert "--reasoning-parser" in sections["chat format:"]
    assert "--max-batch-tokens" in sections["batching and queueing:"]
    assert "--api-key" in sections["gateway and auth:"]
    assert "--log-level" in sections["logging:"]
    assert "runs with this server's rights" in " ".join(out.split())  # why --trust-remote-code is off
    assert "[LLM_SERVER_MAX_BATCH_SIZE]" in out


def test_a_short_static_key_stops_serve_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "LLM_SERVER_DATA_DIR": str(tmp_path), "LLM_SERVER_API_KEYS": "0123456789abcdef,tiny-secret"}
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "builtin:echo"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "at least 16" in out.stderr and "tiny-secret" not in out.stderr
