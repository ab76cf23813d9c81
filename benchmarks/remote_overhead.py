"""What the remote path adds: a chat completion through the gateway to a `builtin:echo` upstream versus the
same request sent to that upstream directly, same run.

Starts two `llm-server serve` processes: the upstream (`--model builtin:echo`) and a gateway whose models file
routes `remote-echo` to it. The gateway's key has a role with RPM/TPM/concurrency limits and a monthly quota
that never refuse, so every request also passes admission, the quota reservation, the request log and the
upstream's pooled connection. Direct and gateway requests are interleaved in rounds, so drift in machine load
affects both alike. On a 2-core machine the client, the gateway and the upstream share the cores.

    uv run python -m benchmarks.remote_overhead [--requests 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from benchmarks.common import cli, create_key, percentile, serve, server_env
from benchmarks.gateway_overhead import drive

PEPPER = "bench-pepper-0123456789abcdef"
PATH = "/v1/chat/completions"


def measure(
    upstream: str, up_key: str, gateway: str, gw_key: str, total: int, concurrency: int, rate: float | None
) -> dict[str, float]:
    asyncio.run(drive(upstream, up_key, PATH, 200, concurrency, model="echo"))  # warm-up: connections, caches
    asyncio.run(drive(gateway, gw_key, PATH, 200, concurrency, model="remote-echo"))
    direct: list[float] = []
    remote: list[float] = []
    rounds = 4
    for _ in range(rounds):
        direct += asyncio.run(drive(upstream, up_key, PATH, total // rounds, concurrency, rate, model="echo"))
        remote += asyncio.run(drive(gateway, gw_key, PATH, total // rounds, concurrency, rate, model="remote-echo"))
    out = {
        "direct_p50_ms": percentile(direct, 50),
        "direct_p99_ms": percentile(direct, 99),
        "remote_p50_ms": percentile(remote, 50),
        "remote_p99_ms": percentile(remote, 99),
    }
    out["added_p50_ms"] = out["remote_p50_ms"] - out["direct_p50_ms"]
    out["added_p99_ms"] = out["remote_p99_ms"] - out["direct_p99_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--paced-rate", type=float, default=25.0, help="requests/s per client in the paced pass")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        up_env = server_env(Path(tmp) / "upstream", model="builtin:echo", key_pepper=PEPPER)
        up_key = create_key(up_env)
        with serve(up_env) as upstream:
            models = Path(tmp) / "models.toml"
            models.write_text(
                f'[[models]]\nname = "remote-echo"\nbackend = "openai"\nbase_url = "{upstream}/v1"\n'
                'api_key_env = "BENCH_UPSTREAM_KEY"\nupstream_model = "echo"\n'
            )
            gw_env = server_env(Path(tmp) / "gateway", models_file=str(models), key_pepper=PEPPER)
            gw_env["BENCH_UPSTREAM_KEY"] = up_key
            limits = ["--rpm", "1000000", "--tpm", "1000000000", "--max-concurrency", "64"]
            cli(gw_env, "roles", "create", "metered", *limits, "--monthly-tokens", "1000000000")
            gw_key = create_key(gw_env, "metered")
            with serve(gw_env) as gateway:
                for concurrency, rate in ((1, None), (args.concurrency, None), (args.concurrency, args.paced_rate)):
                    label = f"{concurrency} client(s), " + (f"{rate:g}/s each" if rate else "closed loop")
                    results[label] = measure(upstream, up_key, gateway, gw_key, args.requests, concurrency, rate)
    header = ("direct p50", "direct p99", "remote p50", "remote p99", "added p50", "added p99")
    print(f"{'pass (ms)':<30}" + "".join(f"{h:>11}" for h in header))
    for name, r in results.items():
        print(
            f"{name:<30}{r['direct_p50_ms']:>11.2f}{r['direct_p99_ms']:>11.2f}{r['remote_p50_ms']:>11.2f}"
            f"{r['remote_p99_ms']:>11.2f}{r['added_p50_ms']:>11.2f}{r['added_p99_ms']:>11.2f}"
        )
    print(json.dumps({"benchmark": "remote_overhead", "requests": args.requests, "results": results}))


if __name__ == "__main__":
    main()
