"""Soak: N concurrent clients for M minutes against a real `llm-server serve`, then check that nothing leaked.

Each model given runs in its own fresh server (SQLite in a temporary data dir unless --database-url is given).
The clients mix streaming and non-streaming chat and completions, deterministic requests repeated (cache hits,
`x-cache: HIT`), requests with a key whose role has a low RPM (429 expected), `/v1/models`, and random
disconnects mid-stream. Every request carries its own `x-request-id`, so the request log can be checked row by
row. At the end it reports, as a table and one JSON line: requests by outcome, 5xx (goal 0), request-log rows
versus requests that reached the app (goal: exactly one each, after the writer has flushed), the
`llm_server_num_requests_running` / `_waiting` gauges (goal 0), the database connections (SQLite: descriptors
of the DB file in /proc/PID/fd; PostgreSQL: `pg_stat_activity` of the database) and the server's RSS (from
/proc/PID/status) after the warm-up (the first 20% of the run: allocator and cache growth settle there) and at the
end, with a sample every 10 s in the JSON. It exits non-zero if any goal fails.

    uv run python -m benchmarks.soak                          # builtin:echo, then builtin:tiny-chat, 10 min each
    uv run python -m benchmarks.soak --model builtin:echo --minutes 1     # a quick check of the harness
    uv run python -m benchmarks.soak --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/soak
        --set RATELIMIT_STORAGE_URI=async+redis://127.0.0.1:6379/0   (one line; a database of its own)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.common import cli, create_key, serve_process, server_env

KINDS = {  # kind -> weight
    "chat": 3.0,
    "chat_stream": 3.0,
    "completion": 2.0,
    "completion_stream": 2.0,
    "cached": 2.0,  # temperature 0, one of a few fixed prompts: served from the cache after the first
    "limited": 1.0,  # the low-RPM key: 429 expected
    "models": 0.5,
}
OUTCOMES = ("200", "429", "4xx", "5xx", "disconnected", "stream_error", "error")
REACHED = {"200", "429", "4xx", "5xx", "disconnected", "stream_error"}  # "error": the client got no status
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
    "seven", "wizards", "quietly", "box", "jolly", "zebras", "at", "dawn",
]  # fmt: skip
CACHED_PROMPTS = ["soak cached one", "soak cached two", "soak cached three", "soak cached four"]
PEPPER = "soak-pepper-0123456789abcdef0123"


@dataclass
class Tally:
    """What the clients saw."""

    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)
    ids: dict[str, str] = field(default_factory=dict)  # request id -> outcome
    cache_hits: int = 0
    unexpected: list[str] = field(default_factory=list)  # a few examples of unexpected answers

    def add(self, kind: str, rid: str, outcome: str, detail: str = "") -> None:
        self.by_kind[(kind, outcome)] += 1
        self.ids[rid] = outcome
        bad = outcome in ("5xx", "stream_error", "error", "4xx") or (outcome == "429" and kind != "limited")
        if bad and len(self.unexpected) < 10:
            self.unexpected.append(f"{kind} {rid}: {outcome} {detail[:200]}")

    def count(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.by_kind.items() if o == outcome)


def body_for(kind: str, model: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
    max_tokens = rng.randint(8, 32)
    if kind.startswith("completion"):
        body: dict[str, Any] = {"model": model, "prompt": words, "max_tokens": max_tokens, "temperature": 0.8}
        path = "/v1/completions"
    else:
        content = rng.choice(CACHED_PROMPTS) if kind == "cached" else words
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        body["temperature"] = 0.0 if kind == "cached" else 0.8
        if kind == "cached":
            body["max_tokens"] = 16
        path = "/v1/chat/completions"
    if kind.endswith("_stream"):
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    return path, body


async def one_request(
    http: httpx.AsyncClient, kind: str, rid: str, model: str, keys: dict[str, str], rng: random.Random,
    disconnect_rate: float, tally: Tally,
) -> None:  # fmt: skip
    key = keys["limited"] if kind == "limited" else keys["main"]
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid}
    try:
        if kind == "models":
            r = await http.get("/v1/models", headers=headers)
            tally.add(kind, rid, classify(r.status_code), r.text)
            return
        path, body = body_for(kind, model, rng)
        if not body.get("stream"):
            r = await http.post(path, json=body, headers=headers)
            if r.headers.get("x-cache") == "HIT":
                tally.cache_hits += 1
            tally.add(kind, rid, classify(r.status_code), r.text)
            return
        disconnect = rng.random() < disconnect_rate
        async with http.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                tally.add(kind, rid, classify(r.status_code), r.text)
                return
            last = ""
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                last = line[6:]
                if disconnect:  # leave mid-stream: the server must abort, release and log it
                    tally.add(kind, rid, "disconnected")
                    return
                if last != "[DONE]" and "error" in json.loads(last):
                    tally.add(kind, rid, "stream_error", last)
                    return
            tally.add(kind, rid, "200" if last == "[DONE]" else "stream_error", f"stream ended with {last!r}")
    except httpx.HTTPError as exc:
        tally.add(kind, rid, "error", repr(exc))


def classify(status: int) -> str:
    if status == 200:
        return "200"
    if status == 429:
        return "429"
    return "5xx" if status >= 500 else "4xx"


async def drive(base: str, model: str, keys: dict[str, str], args: argparse.Namespace, run: str, tally: Tally) -> None:
    deadline = time.monotonic() + args.minutes * 60
    kinds, weights = list(KINDS), list(KINDS.values())

    async def client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with httpx.AsyncClient(base_url=base, timeout=args.timeout_s, limits=limits) as http:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                kind = rng.choices(kinds, weights)[0]
                await one_request(http, kind, f"{run}-{i}-{n}", model, keys, rng, args.disconnect_rate, tally)
                if args.think_ms:
                    await asyncio.sleep(rng.uniform(0, 2 * args.think_ms) / 1000)

    await asyncio.gather(*(client(i) for i in range(args.clients)))


# ---- what the server holds ----------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sqlite_fds(pid: int, db_file: Path) -> int:
    """Open descriptors of the SQLite file (-wal/-shm not counted).

    One per open connection; SQLite also keeps a closed connection's descriptor while other connections of the
    process hold locks on the file (POSIX lock semantics) and reuses it for the next one, so under WAL this stays
    at the pool's peak (at most pool_size + max_overflow = 15) rather than dropping at once. A leak grows past it.
    """
    target, n = str(db_file.resolve()), 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == target:
                n += 1
        except OSError:
            continue
    return n


PG_CONNECTIONS = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"


async def db_state(url: str, run: str | None, pid: int, db_file: Path | None) -> tuple[dict[str, int], int]:
    """Request-log rows of ``run`` (request id -> rows; none for ``None``) and the server's database connections."""
    engine = create_async_engine(url)
    counts: dict[str, int] = {}
    try:
        async with engine.connect() as conn:
            if run is not None:
                rows = await conn.execute(
                    text("SELECT request_id, count(*) FROM request_logs WHERE request_id LIKE :p GROUP BY request_id"),
                    {"p": f"{run}-%"},
                )
                counts = {str(r[0]): int(r[1]) for r in rows}
            if db_file is not None:
                conns = sqlite_fds(pid, db_file)
            else:
                conns = int((await conn.execute(text(PG_CONNECTIONS))).scalar_one())
    finally:
        await engine.dispose()
    return counts, conns


def gauges(metrics_text: str) -> dict[str, float]:
    out = {"running": 0.0, "waiting": 0.0, "server_5xx": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "llm_server_num_requests_running":
                out["running"] += s.value
            elif s.name == "llm_server_num_requests_waiting":
                out["waiting"] += s.value
            elif s.name == "llm_server_requests_total" and s.labels.get("status") == "5xx":
                out["server_5xx"] += s.value
    return out


async def settle(
    base: str, admin_key: str, url: str, run: str, pid: int, db_file: Path | None, tally: Tally
) -> tuple[dict[str, int], int, dict[str, float]]:
    """Wait (up to a minute) until every reached request has its row and the gauges are back to 0."""
    reached = {rid for rid, o in tally.ids.items() if o in REACHED}
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while True:
            # /admin/usage flushes the request-log writer before it answers.
            await http.get("/admin/usage", headers={"Authorization": f"Bearer {admin_key}"})
            counts, conns = await db_state(url, run, pid, db_file)
            g = gauges((await http.get("/metrics")).text)
            done = reached <= counts.keys() and g["running"] == 0 and g["waiting"] == 0
            if done or time.monotonic() > deadline:
                return counts, conns, g
            await asyncio.sleep(1.0)


# ---- one model --------------------------------------------------------------------------------------------


async def sample(
    warm_s: float, every_s: float, pid: int, warm: dict[str, float], series: list[float], url: str, db_file: Path | None
) -> None:
    """After the warm-up: RSS and connections once (the baseline), then RSS every ``every_s`` until cancelled."""
    await asyncio.sleep(warm_s)
    warm["rss_mib"] = rss_mib(pid)
    warm["db_connections"] = (await db_state(url, None, pid, db_file))[1]
    while True:
        series.append(round(rss_mib(pid), 1))
        await asyncio.sleep(every_s)


def soak_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    run = f"soak{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"model": model, "key_pepper": PEPPER}
        if args.database_url:
            settings["database_url"] = args.database_url
        for item in args.set:
            name, _, value = item.partition("=")
            settings[name.lower()] = value
        env = server_env(Path(tmp), **settings)
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'llm_server.db'}"
        db_file = None if args.database_url else Path(tmp) / "llm_server.db"
        cli(env, "db", "upgrade")
        main_role, limited_role = f"{run}-main", f"{run}-limited"
        cli(env, "roles", "create", main_role, "--rpm", "1000000", "--tpm", "1000000000", "--max-concurrency", "64")
        cli(env, "roles", "create", limited_role, "--rpm", str(args.limited_rpm))
        keys = {"main": create_key(env, main_role), "limited": create_key(env, limited_role)}
        admin_key = create_key(env, "admin")
        with serve_process(env) as (base, proc):
            served = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {admin_key}"}).json()
            model_name = served["data"][0]["id"]
            ready_rss = rss_mib(proc.pid)
            before = gauges(httpx.get(f"{base}/metrics").text)  # /readyz answered 503 while the model loaded
            warm: dict[str, float] = {}
            series: list[float] = []
            tally = Tally()

            async def go() -> tuple[dict[str, int], int, dict[str, float]]:
                warm_s = args.minutes * 60 * args.warmup
                sampler = asyncio.create_task(sample(warm_s, 10.0, proc.pid, warm, series, url, db_file))
                await drive(base, model_name, keys, args, run, tally)
                sampler.cancel()
                return await settle(base, admin_key, url, run, proc.pid, db_file, tally)

            started = time.monotonic()
            counts, conns, g = asyncio.run(go())
            elapsed = time.monotonic() - started
            g["server_5xx"] -= before["server_5xx"]
            end_rss = rss_mib(proc.pid)
    result = report(model, args, tally, counts, conns, g, ready_rss, warm, end_rss, elapsed)
    result["rss_mib"]["series_every_10s"] = series
    return result


def report(
    model: str, args: argparse.Namespace, tally: Tally, counts: dict[str, int], conns: int, g: dict[str, float],
    ready_rss: float, warm: dict[str, float], end_rss: float, elapsed: float,
) -> dict[str, Any]:  # fmt: skip
    reached = {rid for rid, o in tally.ids.items() if o in REACHED}
    missing = len(reached - counts.keys())
    duplicates = sum(1 for n in counts.values() if n > 1)
    unknown = len(counts.keys() - tally.ids.keys())
    by_outcome = {o: tally.count(o) for o in OUTCOMES}
    limited_429 = tally.by_kind[("limited", "429")]
    unexpected_4xx = by_outcome["4xx"] + by_outcome["429"] - limited_429
    growth = end_rss - warm.get("rss_mib", ready_rss)
    goals = {
        "no 5xx (client and server side) and no stream error frames": by_outcome["5xx"] == 0
        and g["server_5xx"] == 0
        and by_outcome["stream_error"] == 0,
        "no transport errors or timeouts": by_outcome["error"] == 0,
        "no unexpected 4xx (429 only for the low-RPM key)": unexpected_4xx == 0,
        "the low-RPM key was rate-limited": limited_429 > 0,
        "deterministic requests hit the cache": tally.cache_hits > 0,
        "exactly one request-log row per request that reached the app": missing == 0
        and duplicates == 0
        and unknown == 0,
        "running/waiting gauges back to 0": g["running"] == 0 and g["waiting"] == 0,
        f"database connections at the end <= {args.max_db_connections}": conns <= args.max_db_connections,
        f"RSS growth after warm-up <= {args.max_rss_growth_mib:g} MiB": growth <= args.max_rss_growth_mib,
    }
    return {
        "model": model,
        "clients": args.clients,
        "minutes": args.minutes,
        "elapsed_s": round(elapsed, 1),
        "requests": len(tally.ids),
        "requests_per_s": round(len(tally.ids) / max(elapsed, 1e-9), 1),
        "by_outcome": by_outcome,
        "by_kind": {k: {o: tally.by_kind[(k, o)] for o in OUTCOMES if tally.by_kind[(k, o)]} for k in KINDS},
        "five_xx": by_outcome["5xx"],
        "server_5xx": g["server_5xx"],
        "cache_hits": tally.cache_hits,
        "request_log": {
            "reached": len(reached),
            "rows": sum(counts.values()),
            "missing": missing,
            "duplicates": duplicates,
            "unknown": unknown,
        },
        "gauges": {"running": g["running"], "waiting": g["waiting"]},
        "db_connections": {
            "kind": "sqlite fds" if not args.database_url else "pg_stat_activity",
            "after_warmup": warm.get("db_connections"),
            "end": conns,
        },
        "rss_mib": {
            "ready": round(ready_rss, 1),
            "after_warmup": round(warm.get("rss_mib", ready_rss), 1),
            "end": round(end_rss, 1),
            "growth": round(growth, 1),
        },
        "unexpected_examples": tally.unexpected,
        "goals": goals,
        "ok": all(goals.values()),
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\n== soak {r['model']}: {r['clients']} clients x {r['minutes']:g} min, {r['requests']} requests "
          f"({r['requests_per_s']}/s) ==")  # fmt: skip
    print(f"{'kind':<20}" + "".join(f"{o:>14}" for o in OUTCOMES))
    for kind, row in r["by_kind"].items():
        print(f"{kind:<20}" + "".join(f"{row.get(o, 0):>14}" for o in OUTCOMES))
    print(f"{'total':<20}" + "".join(f"{r['by_outcome'][o]:>14}" for o in OUTCOMES))
    log, rss, db = r["request_log"], r["rss_mib"], r["db_connections"]
    print(f"cache hits (x-cache: HIT): {r['cache_hits']}; server-side 5xx: {r['server_5xx']:g}")
    print(f"request log: {log['rows']} rows for {log['reached']} requests that reached the app "
          f"(missing {log['missing']}, duplicated {log['duplicates']}, unknown {log['unknown']})")  # fmt: skip
    print(f"gauges at the end: running {r['gauges']['running']:g}, waiting {r['gauges']['waiting']:g}")
    print(f"database connections ({db['kind']}): after warm-up {db['after_warmup']}, end {db['end']}")
    print(f"RSS MiB: ready {rss['ready']}, after warm-up {rss['after_warmup']}, end {rss['end']} "
          f"(growth {rss['growth']:+.1f}; every 10 s after warm-up: {rss['series_every_10s']})")  # fmt: skip
    for name, ok in r["goals"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for line in r["unexpected_examples"]:
        print(f"  unexpected: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="repeat for several, run in sequence "
                        "(default: builtin:echo then builtin:tiny-chat)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0, help="per model")
    parser.add_argument("--database-url", help="PostgreSQL URL (default: SQLite in a temporary data dir)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="extra LLM_SERVER_ setting")
    parser.add_argument("--limited-rpm", type=int, default=5, help="RPM of the rate-limited key's role")
    parser.add_argument("--disconnect-rate", type=float, default=0.15, help="share of streams dropped mid-way")
    parser.add_argument("--think-ms", type=float, default=0.0, help="mean pause between a client's requests")
    parser.add_argument(
        "--warmup", type=float, default=0.2, help="share of the run after which the RSS/connection baseline is taken"
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    parser.add_argument(
        "--max-db-connections", type=int, default=15, help="the pool's bound: pool_size 5 + max_overflow 10"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = [soak_model(m, args) for m in (args.model or ["builtin:echo", "builtin:tiny-chat"])]
    for r in results:
        print_table(r)
    ok = all(r["ok"] for r in results)
    print(json.dumps({"benchmark": "soak", "ok": ok, "runs": results}))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
