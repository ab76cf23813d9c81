"""The server-side cost of one request, in-process: no sockets, no uvicorn, no client of its own to share cores with.

Builds the app on `builtin:echo` over a migrated SQLite file, runs its lifespan, and sends `/v1/chat/completions`
(16 tokens, a role with every limit on: RPM, TPM, concurrency, monthly tokens and requests) and `/health` one at a
time through `httpx.ASGITransport`. The difference is what auth, admission, the chat template, the exchange, the echo
engine and the request log cost per request; much steadier than `gateway_overhead`, which measures it over real sockets.

    uv run python -m benchmarks.request_path [--requests 4000] [--database-url postgresql+asyncpg://...]
        [--ratelimit-storage-uri async+redis://...]
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

from benchmarks.common import percentile
from persistence import migrate, store
from server.app import create_app
from server.auth import manage
from server.engine.echo import EchoEngine
from server.records.database import Database
from server.settings import Settings

PEPPER = "bench-pepper-0123456789abcdef"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}


async def make_key(settings: Settings) -> str:
    db = Database(settings.database)
    try:
        await db.run(
            lambda s: store.create_role(
                s,
                "bench",
                rpm=10**9,
                tpm=2 * 10**9,
                max_concurrency=64,
                monthly_tokens=10**15,
                monthly_requests=2 * 10**9,
            )
        )
        _, secret = await db.run(
            lambda s: manage.create_key(s, PEPPER.encode(), name="bench", role="bench", expires_in_days=None)
        )
    finally:
        await db.close()
    return secret


async def timed(
    client: httpx.AsyncClient, path: str, n: int, cpu: list[float] | None = None, **kwargs: object
) -> list[float]:
    """Latencies (ms) of ``n`` requests one at a time; ``cpu`` receives this process's CPU ms per request."""
    out = []
    cpu_began = time.process_time()
    for _ in range(n):
        began = time.perf_counter()
        r = await client.request("POST" if "json" in kwargs else "GET", path, **kwargs)  # type: ignore[arg-type]
        out.append((time.perf_counter() - began) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")
    if cpu is not None:
        cpu.append((time.process_time() - cpu_began) * 1000 / n)
    return out


async def run(requests: int, database_url: str | None = None, ratelimit_uri: str | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, str] = {}
        if database_url:
            stores["database_url"] = database_url
        if ratelimit_uri:
            stores["ratelimit_storage_uri"] = ratelimit_uri
        settings = Settings(data_dir=Path(tmp), key_pepper=PEPPER, log_level="WARNING", **stores)  # type: ignore[arg-type]
        await migrate.upgrade(settings.database)
        key = await make_key(settings)
        app = create_app(settings, engine=EchoEngine())
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"}
        async with app.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            await timed(client, "/v1/chat/completions", 200, json=BODY, headers=headers)  # warm-up
            cpu: list[float] = []
            health = await timed(client, "/health", requests, cpu)
            chat = await timed(client, "/v1/chat/completions", requests, cpu, json=BODY, headers=headers)
    return {
        "health_p50_ms": percentile(health, 50),
        "chat_p50_ms": percentile(chat, 50),
        "chat_p99_ms": percentile(chat, 99),
        "chat_mean_ms": statistics.fmean(chat),
        "added_p50_ms": percentile(chat, 50) - percentile(health, 50),
        # CPU time per request (client and server, one process): steadier than wall time on a busy machine.
        "health_cpu_ms": cpu[0],
        "chat_cpu_ms": cpu[1],
        "added_cpu_ms": cpu[1] - cpu[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--database-url", help="DATABASE_URL (default: a SQLite file; give it a database of its own)")
    parser.add_argument("--ratelimit-storage-uri", help="RATELIMIT_STORAGE_URI (default: async+memory://)")
    args = parser.parse_args()
    r = asyncio.run(run(args.requests, args.database_url, args.ratelimit_storage_uri))
    print(
        f"/health p50 {r['health_p50_ms']:.3f} ms; /v1/chat/completions p50 {r['chat_p50_ms']:.3f} ms, "
        f"p99 {r['chat_p99_ms']:.3f} ms, mean {r['chat_mean_ms']:.3f} ms; added p50 {r['added_p50_ms']:.3f} ms; "
        f"CPU per request /health {r['health_cpu_ms']:.3f} ms, chat {r['chat_cpu_ms']:.3f} ms, "
        f"added {r['added_cpu_ms']:.3f} ms"
    )
    print(json.dumps({"benchmark": "request_path", "requests": args.requests, "results": r}))


if __name__ == "__main__":
    main()
