"""``llm-server serve`` as a real subprocess for tests: started on a free port, always stopped (killed if need be)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import DB_NAME, TEST_PEPPER
from tests.live import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServeProcess:
    """A running ``serve`` process and where to find its state."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def db_rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query against the process's SQLite database (read after it has exited)."""
        with sqlite3.connect(self.data_dir / DB_NAME) as conn:
            return list(conn.execute(sql, args))


def serve_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a ``serve`` over ``data_dir``: no inherited ``LLM_SERVER_*``, the tests' pepper."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVER_")}
    env |= {"LLM_SERVER_DATA_DIR": str(data_dir), "LLM_SERVER_KEY_PEPPER": TEST_PEPPER, "HF_HUB_OFFLINE": "1"}
    return env | {f"LLM_SERVER_{k.upper()}": v for k, v in settings.items()}


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``llm-server ARGS`` in a bare environment (no inherited settings) plus ``env``; never raises on failure."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=60,
    )


def prepare_data_dir(folder: Path, template_db: Path) -> Path:
    """A data dir holding a copy of the migrated template database (which has the tests' admin key)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db, folder / DB_NAME)
    return folder


def start(
    data_dir: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None, **settings: str
) -> ServeProcess:
    """Start ``serve`` (not waiting for it); stderr and stdout go to ``data_dir/serve.log``.

    ``port`` defaults to a free one; ``env`` adds variables that are not settings (an upstream's key).
    """
    port = port or free_port()
    log_path = data_dir / "serve.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(port), *args],
            env=serve_env(data_dir, **settings) | (env or {}),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServeProcess(proc, port, data_dir, log_path)


def wait_ready(srv: ServeProcess, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert srv.proc.poll() is None, f"serve exited with {srv.proc.returncode}:\n{srv.log()}"
        assert time.monotonic() < deadline, f"serve not ready in {timeout_s}s:\n{srv.log()}"
        try:
            if httpx.get(f"{srv.base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def stop(srv: ServeProcess, timeout_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited in ``timeout_s`` (never leaves a process behind)."""
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=10)


@contextmanager
def serving(data_dir: Path, *args: str, **settings: str) -> Iterator[ServeProcess]:
    """A ready ``serve`` process, stopped on exit whatever happened."""
    srv = start(data_dir, *args, **settings)
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(srv)


def raw_exchange(port: int, data: bytes, *, timeout_s: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``timeout_s``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        return read_until_closed(sock, timeout_s)


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
