"""Helpers for benchmarks that drive a real `llm-server serve` process over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(env: dict[str, str], *args: str) -> str:
    """Run ``llm-server ARGS`` with ``env``; return stdout."""
    out = subprocess.run(
        [sys.executable, "-m", "server", *args], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout


def server_env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVER_")}
    env |= {"LLM_SERVER_DATA_DIR": str(data_dir), "LLM_SERVER_LOG_LEVEL": "WARNING"}
    env |= {f"LLM_SERVER_{k.upper()}": v for k, v in settings.items()}
    return env


def create_key(env: dict[str, str], role: str = "admin") -> str:
    return str(json.loads(cli(env, "keys", "create", "--name", f"bench-{role}", "--role", role, "--json"))["key"])


@contextmanager
def serve(env: dict[str, str], timeout_s: float = 600.0) -> Iterator[str]:
    """Start ``llm-server serve`` on a free port; yield its base URL once /readyz is 200."""
    with serve_process(env, timeout_s) as (base, _):
        yield base


@contextmanager
def serve_process(
    env: dict[str, str], timeout_s: float = 600.0, *, python: str = sys.executable, root: Path = ROOT
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like :func:`serve`, also yielding the process (for its memory); ``python`` and ``root`` may name another
    checkout's interpreter and folder (a baseline served side by side)."""
    port = free_port()
    proc = subprocess.Popen(
        [python, "-m", "server", "serve", "--port", str(port)],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:  # refused, reset, or no answer within the second while the model loads
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready")
            time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]
