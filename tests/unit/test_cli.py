"""The command line: help for every subcommand, demo-model output, one-line failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, main


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
