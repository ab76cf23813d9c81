"""The gateway's own overhead: `/v1/chat/completions` on `builtin:echo` versus `/health`, same server, same run.

Starts `llm-server serve --model builtin:echo` (SQLite, in-memory rate limits), creates a key whose role has
RPM/TPM/concurrency limits high enough never to refuse (so every limit is checked on every request), and drives
both routes with CONCURRENCY keep-alive clients. `/health` measures HTTP + uvicorn + the client itself;
the difference is what auth, admission, the chat template, the echo engine, SSE-free JSON rendering and the
request log add. A second pass adds a monthly quota, so each request also makes its reservation in the database.

    uv run python -m benchmarks.gateway_overhead [--requests 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import cli, percentile, serve, server_env


async def drive(
    base: str,
    key: str,
    path: str,
    total: int,
    concurrency: int,
    rate_per_client: float | None = None,
    model: str = "echo",
) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        remaining = total

        async def worker(i: int) -> None:
            nonlocal remaining
            # Paced clients start staggered, as independent users would, not in lock-step bursts.
            next_at = time.perf_counter() + (i / (concurrency * rate_per_client) if rate_per_client else 0.0)
            if rate_per_client:
                await asyncio.sleep(next_at - time.perf_counter())
            while remaining > 0:
                remaining -= 1
                if rate_per_client:
                    next_at += 1 / rate_per_client
                t = time.perf_counter()
                if path == "/health":
                    r = await client.get(path)
                else:
                    r = await client.post(path, json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
                if rate_per_client:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies


def measure(base: str, key: str, total: int, concurrency: int, rate: float | None) -> dict[str, float]:
    asyncio.run(drive(base, key, "/health", 200, concurrency))  # warm-up
    asyncio.run(drive(base, key, "/v1/chat/completions", 200, concurrency))
    health: list[float] = []
    chat: list[float] = []
    for _ in range(2):  # interleave, so drift in machine load affects both alike
        health += asyncio.run(drive(base, key, "/health", total // 2, concurrency, rate))
        chat += asyncio.run(drive(base, key, "/v1/chat/completions", total // 2, concurrency, rate))
    out = {
        "health_p50_ms": percentile(health, 50),
        "health_p99_ms": percentile(health, 99),
        "chat_p50_ms": percentile(chat, 50),
        "chat_p99_ms": percentile(chat, 99),
        "chat_mean_ms": statistics.fmean(chat),
    }
    out["added_p50_ms"] = out["chat_p50_ms"] - out["health_p50_ms"]
    out["added_p99_ms"] = out["chat_p99_ms"] - out["health_p99_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--paced-rate", type=float, default=25.0, help="requests/s per client in the paced passes (0: skip them)"
    )
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = server_env(Path(tmp), model="builtin:echo", key_pepper="bench-pepper-0123456789abcdef")
        cli(env, "roles", "create", "limited", "--rpm", "1000000", "--tpm", "1000000000", "--max-concurrency", "64")
        cli(
            env,
            "roles",
            "create",
            "metered",
            "--rpm",
            "1000000",
            "--tpm",
            "1000000000",
            "--max-concurrency",
            "64",
            "--monthly-tokens",
            "1000000000",
        )
        keys = {"limits": create_key_for(env, "limited"), "limits+quota": create_key_for(env, "metered")}
        with serve(env) as base:
            for name, key in keys.items():
                results[f"{name}, closed loop"] = measure(base, key, args.requests, args.concurrency, None)
                if args.paced_rate:
                    label = f"{name}, {args.concurrency}x{args.paced_rate:g}/s"
                    results[label] = measure(base, key, args.requests, args.concurrency, args.paced_rate)
    header = ("health p50", "health p99", "chat p50", "chat p99", "added p50", "added p99")
    print(f"{'pass (ms)':<30}" + "".join(f"{h:>11}" for h in header))
    for name, r in results.items():
        print(
            f"{name:<30}{r['health_p50_ms']:>11.2f}{r['health_p99_ms']:>11.2f}{r['chat_p50_ms']:>11.2f}"
            f"{r['chat_p99_ms']:>11.2f}{r['added_p50_ms']:>11.2f}{r['added_p99_ms']:>11.2f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "gateway_overhead",
                "concurrency": args.concurrency,
                "requests": args.requests,
                "paced_rate_per_client": args.paced_rate,
                "results": results,
            }
        )
    )


def create_key_for(env: dict[str, str], role: str) -> str:
    return str(json.loads(cli(env, "keys", "create", "--name", f"bench-{role}", "--role", role, "--json"))["key"])


if __name__ == "__main__":
    main()
