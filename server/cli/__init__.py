"""The ``llm-server`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from server.cli.flags import FlagError, add_serve_command, package_version, serve_overrides
from server.settings import Settings, SettingsError, load_settings

log = logging.getLogger("server")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-server", description="Self-hosted, OpenAI-compatible LLM server.")
    parser.add_argument("--version", action="version", version=f"llm-server {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_serve_command(sub)

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
    try:
        overrides = serve_overrides(args)
    except FlagError as exc:
        _fail(f"{exc} (see --help)", 2)
    serve(load_settings(overrides))


def serve(settings: Settings) -> None:
    """Run uvicorn with one worker: the model lives in this process (see README, "one worker per model")."""
    from server.app import create_app
    from server.auth.static import StaticKeys
    from server.cli.runner import ServeError, run
    from server.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    static = StaticKeys.from_settings(settings)  # before anything loads: a too-short key stops start-up at once
    if static:
        log.info("accepting %d static API key(s) with admin rights: %s", len(static), ", ".join(static.ids))
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
