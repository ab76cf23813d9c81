"""Seconds from `uv run llm-server serve` to the first `/readyz` 200.

Runs the real command several times: first with an empty data dir (the demo model is built), then with the
model already built. Prints a table and one JSON line.

    uv run python -m benchmarks.startup [--runs 3] [--model builtin:tiny-chat]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.common import free_port

ROOT = Path(__file__).resolve().parents[1]


def time_to_ready(data_dir: Path, model: str, timeout_s: float = 180.0) -> float:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVER_")}
    env |= {"LLM_SERVER_DATA_DIR": str(data_dir), "LLM_SERVER_MODEL": model, "LLM_SERVER_LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["uv", "run", "llm-server", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise TimeoutError("not ready in time")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="builtin:tiny-chat")
    args = parser.parse_args()
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            cold.append(time_to_ready(Path(tmp), args.model))
            warm.append(time_to_ready(Path(tmp), args.model))
    print(f"{'case':<28}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, xs in (("empty data dir (builds)", cold), ("model already built", warm)):
        print(f"{name:<28}{statistics.median(xs):>10.2f}{min(xs):>8.2f}{max(xs):>8.2f}")
    print(json.dumps({"benchmark": "startup", "model": args.model, "cold_s": cold, "warm_s": warm}))


if __name__ == "__main__":
    main()
