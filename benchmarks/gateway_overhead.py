"""The gateway's own overhead: `/v1/chat/completions` on `builtin:echo` versus `/health`, same server, same run.

Starts `llm-server serve --model builtin:echo` and creates a key whose role has every limit on (requests and tokens
per minute, concurrency, monthly tokens and monthly requests), all high enough never to refuse, so every check runs
on every request: the quota reservation, the rate-limit windows, the concurrency slot, the request log. Both routes
are driven by CONCURRENCY keep-alive clients, interleaved round by round so that drift in the machine's load
affects both alike:

- closed loop: each client sends its next request as soon as the last one is answered; the requests/s of each route
  and their ratio (chat / health: the share of a request's CPU that HTTP itself takes);
- paced: each client sends RATE requests/s (staggered, as independent users would); the latency chat adds over
  `/health` at p50 and p99.

The closed loop also prints the CPU each request costs the server process and this client process (Linux: the
server's from `/proc/PID/stat`). Those say who the loop waits for: when the client's CPU per request is the larger,
the requests/s (and so the ratio) are the client's, and the server's own figures are the ones that say what a chat
request costs beyond HTTP (`server ratio`: /health's server CPU over chat's, what the ratio would be against a
client that costs nothing).

`/health` measures HTTP + uvicorn + the client itself; the difference is what auth, admission, the chat template,
the echo engine, JSON rendering and the request log add. Storage: SQLite and in-memory limits by default;
`--database-url` and `--ratelimit-storage-uri` select PostgreSQL and Redis (the settings `DATABASE_URL` and
`RATELIMIT_STORAGE_URI`; give the benchmark a database of its own and a Redis db number of its own).

`--baseline DIR` serves a second checkout (e.g. `git worktree add /tmp/gw-baseline REV` and `uv sync` there) side by
side with this one, interleaved pass by pass, and prints both: before and after in the same run. The figures are
medians over `--rounds` rounds.

    uv run python -m benchmarks.gateway_overhead [--requests 1000] [--rounds 3] [--concurrency 8] [--paced-rate 25]
        [--database-url postgresql+asyncpg://...] [--ratelimit-storage-uri async+redis://...] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import ROOT, percentile, serve_process, server_env

PEPPER = "bench-pepper-0123456789abcdef"
HUGE = "1000000000"
CHAT = "/v1/chat/completions"


@dataclass
class Server:
    """One checkout served for the benchmark."""

    name: str
    root: Path
    env: dict[str, str]
    key: str = ""
    base: str = ""
    pid: int = 0

    @property
    def python(self) -> str:
        venv = self.root / ".venv" / "bin" / "python"
        return str(venv) if venv.exists() else "python3"

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [self.python, "-m", "server", *args], env=self.env, cwd=self.root, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"{self.name}: llm-server {' '.join(args)}: {out.stderr[-2000:]}")
        return out.stdout


async def drive(
    base: str, key: str, path: str, total: int, concurrency: int, rate_per_client: float | None = None
) -> tuple[list[float], float]:
    """Send ``total`` requests to ``path`` from ``concurrency`` clients; their latencies (ms) and the wall time (s)."""
    # Encoded once: the client's own JSON work would otherwise count against chat on these shared cores.
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16})
    content = body.encode()
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        # Open every connection first, so the timed part measures requests, not connection set-up.
        await asyncio.gather(*(client.get("/health") for _ in range(concurrency)))
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
                    r = await client.post(path, content=content)
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
                if rate_per_client:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    return latencies, elapsed


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; 0.0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def closed_loop(server: Server, n: int, concurrency: int) -> dict[str, float]:
    """Requests/s of /health and chat, back to back, their latencies, and the CPU (µs) each request cost the
    server and this client."""
    out: dict[str, float] = {}
    latencies: dict[str, list[float]] = {}
    for name, path in (("health", "/health"), ("chat", CHAT)):
        server_began, client_began = process_cpu_s(server.pid), own_cpu_s()
        latencies[name], elapsed = asyncio.run(drive(server.base, server.key, path, n, concurrency))
        out[f"{name}_rps"] = n / elapsed
        out[f"{name}_server_cpu_us"] = (process_cpu_s(server.pid) - server_began) * 1e6 / n
        out[f"{name}_client_cpu_us"] = (own_cpu_s() - client_began) * 1e6 / n
    out["ratio"] = out["chat_rps"] / out["health_rps"]
    chat_cpu = out["chat_server_cpu_us"]
    out["server_ratio"] = out["health_server_cpu_us"] / chat_cpu if chat_cpu else 0.0
    return out | latency_figures(latencies["health"], latencies["chat"])


def paced(server: Server, n: int, concurrency: int, rate: float) -> dict[str, float]:
    """The latency chat adds over /health at ``concurrency`` x ``rate`` requests/s."""
    health, _ = asyncio.run(drive(server.base, server.key, "/health", n, concurrency, rate))
    chat, _ = asyncio.run(drive(server.base, server.key, CHAT, n, concurrency, rate))
    return latency_figures(health, chat)


def latency_figures(health: list[float], chat: list[float]) -> dict[str, float]:
    out = {
        "health_p50_ms": percentile(health, 50),
        "health_p99_ms": percentile(health, 99),
        "chat_p50_ms": percentile(chat, 50),
        "chat_p99_ms": percentile(chat, 99),
    }
    out["added_p50_ms"] = out["chat_p50_ms"] - out["health_p50_ms"]
    out["added_p99_ms"] = out["chat_p99_ms"] - out["health_p99_ms"]
    return out


def prepare(server: Server) -> None:
    """Create the role with every limit on (names unique to this run: servers may share one database) and its key."""
    role = f"bench-all-{uuid.uuid4().hex[:8]}"
    limits = ("--rpm", HUGE, "--tpm", HUGE, "--max-concurrency", "64")
    quotas = ("--monthly-tokens", "1000000000000", "--monthly-requests", HUGE)
    server.cli("roles", "create", role, *limits, *quotas)
    created = server.cli("keys", "create", "--name", role, "--role", role, "--json")
    server.key = str(json.loads(created)["key"])


@contextmanager
def serving(server: Server, timeout_s: float = 300.0) -> Iterator[Server]:
    """Serve ``server`` on a free port until the block ends."""
    with serve_process(server.env, timeout_s, python=server.python, root=server.root) as (base, proc):
        server.base, server.pid = base, proc.pid
        yield server


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per route in each pass")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of passes; the figures are their medians")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--paced-rate", type=float, default=25.0, help="requests/s per client in the paced passes (0: skip them)"
    )
    parser.add_argument("--database-url", help="DATABASE_URL of the servers (default: a SQLite file each)")
    parser.add_argument("--ratelimit-storage-uri", help="RATELIMIT_STORAGE_URI (default: async+memory://)")
    parser.add_argument("--baseline", type=Path, help="a second checkout to serve side by side (before / after)")
    parser.add_argument("--pids", action="store_true", help="print the servers' process ids (to attach a profiler)")
    args = parser.parse_args()
    settings = {"model": "builtin:echo", "key_pepper": PEPPER}
    if args.database_url:
        settings["database_url"] = args.database_url
    if args.ratelimit_storage_uri:
        settings["ratelimit_storage_uri"] = args.ratelimit_storage_uri
    roots = {"after": ROOT} if args.baseline is None else {"before": args.baseline.resolve(), "after": ROOT}
    rounds: dict[str, dict[str, list[dict[str, float]]]] = {name: {"closed": [], "paced": []} for name in roots}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = []
        for name, root in roots.items():
            env = server_env(Path(tmp) / name, **settings)
            env.pop("VIRTUAL_ENV", None)
            env["PYTHONPATH"] = str(root)  # each checkout runs its own code
            server = Server(name, root, env)
            prepare(server)
            servers.append(stack.enter_context(serving(server)))
            if args.pids:
                print(f"{name}: pid {server.pid} {server.base}", flush=True)
        for server in servers:  # warm-up: imports, caches, the first quota row
            closed_loop(server, 200, args.concurrency)
        for i in range(args.rounds):
            order = servers if i % 2 == 0 else servers[::-1]  # neither always goes first
            for server in order:
                rounds[server.name]["closed"].append(closed_loop(server, args.requests, args.concurrency))
            if args.paced_rate:
                for server in order:
                    rounds[server.name]["paced"].append(paced(server, args.requests, args.concurrency, args.paced_rate))
    results = {name: {kind: median_of(rs) for kind, rs in passes.items() if rs} for name, passes in rounds.items()}
    print_table(results, args)
    print(
        json.dumps(
            {
                "benchmark": "gateway_overhead",
                "database": "postgresql" if args.database_url else "sqlite",
                "ratelimit_storage": (args.ratelimit_storage_uri or "async+memory://").split("://")[0],
                "concurrency": args.concurrency,
                "requests_per_pass": args.requests,
                "rounds": args.rounds,
                "paced_rate_per_client": args.paced_rate,
                "cpus": os.cpu_count(),
                "medians": results,
                "per_round": rounds,
            }
        )
    )


def print_table(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    storage = f"{args.database_url or 'sqlite'} + {args.ratelimit_storage_uri or 'async+memory://'}"
    print(f"gateway overhead, {storage}; medians of {args.rounds} rounds of {args.requests} requests per route")
    cpu = ("server µs", "client µs")
    head = f"{'closed loop, ' + str(args.concurrency) + ' clients':<28}{'health/s':>10}{'chat/s':>10}{'ratio':>8}"
    print(head + "".join(f"{'health ' + c:>17}{'chat ' + c:>15}" for c in cpu) + f"{'server ratio':>14}")
    for name, r in results.items():
        c = r["closed"]
        print(
            f"{name:<28}{c['health_rps']:>10.0f}{c['chat_rps']:>10.0f}{c['ratio']:>8.2f}"
            f"{c['health_server_cpu_us']:>17.0f}{c['chat_server_cpu_us']:>15.0f}"
            f"{c['health_client_cpu_us']:>17.0f}{c['chat_client_cpu_us']:>15.0f}{c['server_ratio']:>14.2f}"
        )
    if args.paced_rate:
        rate = f"paced {args.concurrency}x{args.paced_rate:g}/s (ms)"
        header = ("health p50", "health p99", "chat p50", "chat p99", "added p50", "added p99")
        print(f"{rate:<28}" + "".join(f"{h:>11}" for h in header))
        for name, r in results.items():
            p = r["paced"]
            print(
                f"{name:<28}{p['health_p50_ms']:>11.2f}{p['health_p99_ms']:>11.2f}{p['chat_p50_ms']:>11.2f}"
                f"{p['chat_p99_ms']:>11.2f}{p['added_p50_ms']:>11.2f}{p['added_p99_ms']:>11.2f}"
            )


if __name__ == "__main__":
    main()
