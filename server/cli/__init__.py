"""The ``llm-server`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from server.settings import Settings, SettingsError, load_settings

log = logging.getLogger("server")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-server", description="Self-hosted, OpenAI-compatible LLM server.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the server (settings from LLM_SERVER_* env vars and .env)")
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--model", help="HF model id or folder, builtin:tiny-chat (default) or builtin:echo")
    serve.add_argument("--served-model-name", help="model id clients send (default: derived from --model)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--max-model-len", type=int, help="context window used for validation")
    serve.add_argument("--data-dir", help="local state folder (default ./.llm-server)")
    serve.add_argument("--models-file", help="TOML file of served models, local and remote (replaces --model)")

    from server.cli.admin import add_admin_commands

    add_admin_commands(sub)

    demo = sub.add_parser("demo-model", help="write a built-in random-weight demo model to a folder")
    demo.add_argument("path", help="folder to write")
    demo.add_argument("--preset", choices=["tiny", "bench-0.5b"], default="tiny")
    return parser


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"llm-server: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def cmd_serve(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "model": args.model,
        "served_model_name": args.served_model_name,
        "device": args.device,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "data_dir": args.data_dir,
        "models_file": args.models_file,
    }
    settings = load_settings(overrides)
    serve(settings)


def serve(settings: Settings) -> None:
    """Run uvicorn with one worker: the model lives in this process (see README, "one worker per model")."""
    from server.app import create_app
    from server.cli.runner import ServeError, run
    from server.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    # The HF engine warns about random-weight demo models (builtin:tiny-chat, demo-model folders) when it loads.
    if settings.model == "builtin:echo" and settings.models_file is None:
        log.warning("Serving builtin:echo: it repeats the last user message (for load-testing the gateway).")
    app = create_app(settings)
    try:
        run(app, settings)  # returns after SIGTERM/SIGINT and a drained shutdown: exit status 0
    except ServeError as exc:
        _fail(str(exc))


def cmd_demo_model(args: argparse.Namespace) -> None:
    from server.engine.demo_model import write_demo_model

    path = write_demo_model(Path(args.path), args.preset)
    print(f"wrote the {args.preset} demo model (random weights) to {path}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            cmd_serve(args)
        elif args.command == "demo-model":
            cmd_demo_model(args)
        else:
            from server.cli.admin import CommandError, run_admin

            try:
                run_admin(args, load_settings())
            except CommandError as exc:
                _fail(str(exc))
    except SettingsError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
