"""Huge prompts must not stall other tenants: `/health` latency with and without 10 MB prompts arriving.

Starts `llm-server serve` on the built-in tiny model (its real byte-level BPE tokenizer, a 2,048-token context),
then measures `/health` (paced, one keep-alive client) alone and while other processes keep sending 10 MB chat
prompts:

- from a role that may not use the model (refused with 403 before the prompt is looked at);
- from a role that may (refused with 400 `context_length_exceeded` from the prompt's byte length, untokenized);
- 150 kB prompts from that role: small enough that they might fit, so they are tokenized (in worker threads)
  before the 400.

Each line prints /health p50 / p99 / max and the hostile requests answered per second with their status codes.

    uv run python -m benchmarks.hostile_prompts [--seconds 10] [--senders 4] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.common import cli, create_key, percentile, serve, server_env

HUGE = 9_990_000
"""Prompt bytes of a "10 MB" request: the body stays just under the default 10,000,000-byte limit (else 413)."""


def send_forever(base: str, key: str, size: int, stop_at: float, counts: dict[int, int]) -> None:
    """One sender process: post ``size``-byte chat prompts back to back until ``stop_at`` (``time.time()``)."""
    content = "lorem ipsum dolor sit amet " * (size // 27 + 1)
    body = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": content[:size]}]}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        while time.time() < stop_at:
            r = client.post("/v1/chat/completions", content=body)
            counts[r.status_code] = counts.get(r.status_code, 0) + 1


async def probe(base: str, seconds: float, rate: float) -> list[float]:
    """``/health`` latencies (ms), one request due every ``1 / rate`` seconds for ``seconds``.

    Each latency runs from when the request was due, not from when it could be sent: a server that stalls for a
    second delays every request due in that second, and each of them counts (no coordinated omission).
    """
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await client.get("/health")
        due = time.perf_counter()
        end = due + seconds
        while due < end:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            r = await client.get("/health")
            done = time.perf_counter()
            if r.status_code != 200:
                raise RuntimeError(f"/health answered {r.status_code}")
            while due <= done and due < end:  # every request that fell due while this one was under way
                latencies.append((done - due) * 1000)
                due += 1 / rate
    return latencies


def phase(base: str, label: str, key: str | None, size: int, args: argparse.Namespace) -> None:
    manager = multiprocessing.Manager()
    counts = manager.dict()
    stop_at = time.time() + args.seconds + 1.0
    senders = [
        multiprocessing.Process(target=send_forever, args=(base, key, size, stop_at, counts))
        for _ in range(args.senders if key else 0)
    ]
    for p in senders:
        p.start()
    if senders:
        time.sleep(1.0)  # let the senders get going
    latencies = asyncio.run(probe(base, args.seconds, args.rate))
    for p in senders:
        p.join()
    answered = Counter({int(k): int(v) for k, v in counts.items()})
    per_s = sum(answered.values()) / (args.seconds + 1)
    print(
        f"{label:<44} /health p50 {percentile(latencies, 50):6.2f} ms  p99 {percentile(latencies, 99):7.2f} ms  "
        f"max {max(latencies):7.2f} ms  | hostile {per_s:5.1f}/s {dict(sorted(answered.items()))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--senders", type=int, default=4, help="processes sending huge prompts")
    parser.add_argument("--rate", type=float, default=100.0, help="/health requests per second")
    args = parser.parse_args()
    print(f"CPU: {os.cpu_count()} cores; {args.senders} senders; /health at {args.rate:g}/s for {args.seconds:g} s")
    with tempfile.TemporaryDirectory() as tmp:
        env = server_env(Path(tmp), model="builtin:tiny-chat", default_role_rpm="unlimited")
        env["LLM_SERVER_DEFAULT_ROLE_TPM"] = "unlimited"
        env["LLM_SERVER_DEFAULT_ROLE_MAX_CONCURRENCY"] = "unlimited"
        cli(env, "roles", "create", "refused", "--models", "some-other-model")
        refused, allowed = create_key(env, "refused"), create_key(env, "default")
        with serve(env) as base:
            phase(base, "alone", None, 0, args)
            phase(base, "+ 10 MB prompts, role without the model", refused, HUGE, args)
            phase(base, "+ 10 MB prompts, role with the model", allowed, HUGE, args)
            phase(base, "+ 150 kB prompts (tokenized), role with it", allowed, 150_000, args)


if __name__ == "__main__":
    main()
