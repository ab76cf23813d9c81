"""Throughput of the continuously batched HF engine over HTTP, against one-at-a-time and static batching.

Writes the ``bench-0.5b`` demo model (Qwen2.5-0.5B's shape, random weights), then in one run:

* static ceiling, in-process: one padded ``model.generate`` batch of the 32 prompts, 64 new tokens each
  (``min_new_tokens=64``), same folder and dtype;
* static batching of a mixed workload, in-process: 32 requests with max_tokens 8..128 arriving staggered; whenever
  the model is free, everything that has arrived (up to 32) runs as one padded ``generate`` batch until its longest
  request is done (timeline simulated from measured ``generate`` times, so no idle sleeping);
* the real server (``python -m server serve``) driven by streaming ``/v1/completions`` clients (``stream: true,
  ignore_eos: true, max_tokens: 64, temperature: 0``) at concurrency 1 (the same requests one after another), 8
  and 32, then the mixed workload with the same arrival times;
* the server's RSS (current and peak) before and after many short requests (some cancelled mid-stream).

Prints a table and one JSON line.

    uv run python -m benchmarks.throughput [--dtype bfloat16|float32] [--quick] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import cli, percentile, serve_process, server_env

PEPPER = "bench-pepper-0123456789abcdef"
TOPICS = ["the for statement", "tuples", "exceptions", "the import system", "generators", "slicing", "classes"]


@dataclass
class Stream:
    """Timings of one streamed request (seconds on the client's clock)."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    end: float = 0.0
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Distinct prompts of ~15-30 tokens, so rows are padded differently."""
    rng = random.Random(seed)
    return [
        f"Request {i}: explain {rng.choice(TOPICS)} and {rng.choice(TOPICS)}" + " in detail" * rng.randrange(0, 5)
        for i in range(n)
    ]


# -- static batching, in-process ----------------------------------------------------------------------------


class Static:
    """The same model folder and dtype loaded in this process, run with padded ``generate`` batches."""

    def __init__(self, folder: Path, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
        self.model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def generate(self, prompts: list[str], new_tokens: int) -> float:
        """Seconds for one padded batch of ``prompts`` generating exactly ``new_tokens`` each."""
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        started = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return time.perf_counter() - started

    def mixed(self, prompts: list[str], max_tokens: list[int], arrivals: list[float], cap: int) -> dict[str, float]:
        """Static batching of a staggered workload: when free, run everything arrived (<= cap) to its longest."""
        clock, i, done = 0.0, 0, [0.0] * len(prompts)
        while i < len(prompts):
            clock = max(clock, arrivals[i])
            j = i
            while j < len(prompts) and j - i < cap and arrivals[j] <= clock:
                j += 1
            clock += self.generate(prompts[i:j], max(max_tokens[i:j]))
            done[i:j] = [clock] * (j - i)
            i = j
        latency = [d - a for d, a in zip(done, arrivals, strict=True)]
        return {
            "tokens_per_s": sum(max_tokens) / (clock - arrivals[0]),
            "wall_s": clock - arrivals[0],
            "latency_mean_s": sum(latency) / len(latency),
        }


# -- the server over HTTP -----------------------------------------------------------------------------------


def rss_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": fields["VmRSS"], "peak_mib": fields["VmHWM"]}


async def stream_one(
    client: httpx.AsyncClient, prompt: str, max_tokens: int, at: float = 0.0, cancel_after: int | None = None
) -> Stream:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    record = Stream(sent=time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                record.chunks.append(time.perf_counter())
                if cancel_after is not None and len(record.chunks) >= cancel_after:
                    break  # leaving the block closes the connection: the server aborts the request
            if chunk.get("usage"):
                record.tokens = int(chunk["usage"]["completion_tokens"])
    record.end = time.perf_counter()
    return record


async def drive(base: str, key: str, jobs: list[tuple[str, int, float]], concurrency: int) -> list[Stream]:
    """Run ``(prompt, max_tokens, arrival offset)`` jobs with at most ``concurrency`` in flight."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=3600) as client:
        gate = asyncio.Semaphore(concurrency)
        start = time.perf_counter()

        async def one(prompt: str, max_tokens: int, offset: float) -> Stream:
            async with gate:
                return await stream_one(client, prompt, max_tokens, start + offset)

        return list(await asyncio.gather(*(one(*job) for job in jobs)))


def summarize(streams: list[Stream]) -> dict[str, float]:
    wall = max(s.end for s in streams) - min(s.sent for s in streams)
    gaps = [g for s in streams for g in s.gaps]
    # Per-stream time per output token after the first: exact even where detokenization holds text back (the
    # server sends no chunk for a token whose text is still incomplete, which merges chunk gaps).
    tpot = [(s.chunks[-1] - s.chunks[0]) / (s.tokens - 1) for s in streams if s.tokens > 1]
    return {
        "tokens_per_s": sum(s.tokens for s in streams) / wall,
        "wall_s": wall,
        "ttft_p50_s": percentile([s.ttft for s in streams], 50),
        "ttft_p95_s": percentile([s.ttft for s in streams], 95),
        "itl_p50_ms": percentile(gaps, 50) * 1000,
        "tpot_p50_ms": percentile(tpot, 50) * 1000,
        # Not an engine stall measure: a greedy random model often loops on byte tokens whose text stays incomplete.
        "chunk_gap_max_ms": max(gaps, default=float("nan")) * 1000,
        "latency_mean_s": sum(s.end - s.sent for s in streams) / len(streams),
    }


async def churn(base: str, key: str, total: int, concurrency: int) -> None:
    """Many short requests; every tenth is cancelled after its first chunk."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=3600
    ) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                await stream_one(client, f"short {i} {TOPICS[i % len(TOPICS)]}", 4, cancel_after=1 if i % 10 else None)

        await asyncio.gather(*(one(i) for i in range(total)))


# -- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "llm-server-bench-0.5b")
    parser.add_argument("--quick", action="store_true", help="fewer requests: 2 sequential, 16 mixed, 200 short")
    parser.add_argument("--sequential", type=int, default=None, help="requests run one after another (default 4)")
    parser.add_argument("--mixed", type=int, default=None, help="requests in the mixed workload (default 32)")
    parser.add_argument(
        "--gap", type=float, default=1.0, help="seconds between mixed arrivals (sustained load, not one burst)"
    )
    parser.add_argument("--short", type=int, default=None, help="short requests for the RSS check (default 1000)")
    args = parser.parse_args()
    sequential = args.sequential or (2 if args.quick else 4)
    mixed_n = args.mixed or (16 if args.quick else 32)
    short_n = args.short or (200 if args.quick else 1000)

    from server.engine.demo_model import write_demo_model

    folder = write_demo_model(args.model_dir, "bench-0.5b")
    prompts = make_prompts(32)
    rng = random.Random(1)
    mixed_prompts = make_prompts(mixed_n, seed=2)
    mixed_tokens = [rng.randrange(8, 129) for _ in range(mixed_n)]
    arrivals = [i * args.gap for i in range(mixed_n)]
    results: dict[str, Any] = {"dtype": args.dtype, "cpu_threads": os.cpu_count()}

    static = Static(folder, args.dtype)
    static.generate(prompts[:2], 4)  # warm-up
    seconds = static.generate(prompts, 64)
    results["static_32"] = {"tokens_per_s": 32 * 64 / seconds, "wall_s": seconds}
    results["static_mixed"] = static.mixed(mixed_prompts, mixed_tokens, arrivals, cap=32)
    print(f"static: {results['static_32']}, mixed {results['static_mixed']}", flush=True)
    del static
    gc.collect()

    with tempfile.TemporaryDirectory() as tmp:
        env = server_env(
            Path(tmp), model=str(folder), dtype=args.dtype, key_pepper=PEPPER, served_model_name="bench"
        ) | {"LLM_SERVER_CACHE_ENABLED": "false"}
        key = str(json.loads(cli(env, "keys", "create", "--name", "b", "--role", "admin", "--json"))["key"])
        with serve_process(env, timeout_s=900.0) as (base, proc):
            asyncio.run(drive(base, key, [(prompts[0], 8, 0.0), (prompts[1], 8, 0.0)], 2))  # warm-up
            for concurrency, n in ((1, sequential), (8, 8), (32, 32)):
                streams = asyncio.run(drive(base, key, [(p, 64, 0.0) for p in prompts[:n]], concurrency))
                results[f"c{concurrency}"] = summarize(streams)
                print(f"concurrency {concurrency}: {results[f'c{concurrency}']}", flush=True)
            jobs = list(zip(mixed_prompts, mixed_tokens, arrivals, strict=True))
            results["mixed"] = summarize(asyncio.run(drive(base, key, jobs, mixed_n)))
            print(f"mixed: {results['mixed']}", flush=True)
            before = rss_mib(proc.pid)
            asyncio.run(churn(base, key, short_n, 32))
            time.sleep(1.0)
            after = rss_mib(proc.pid)
            results["rss"] = {"requests": short_n, "before": before, "after": after}
            results["rss"]["growth"] = after["rss_mib"] / before["rss_mib"] - 1

    report(results)


def report(r: dict[str, Any]) -> None:
    c1, c32, static = r["c1"]["tokens_per_s"], r["c32"]["tokens_per_s"], r["static_32"]["tokens_per_s"]
    r["ratios"] = {
        "c32_vs_static": c32 / static,
        "c32_vs_sequential": c32 / c1,
        "mixed_vs_static": r["mixed"]["tokens_per_s"] / r["static_mixed"]["tokens_per_s"],
    }
    print(f"\nthroughput, bench-0.5b, {r['dtype']}, {r['cpu_threads']} CPUs")
    header = ("tok/s", "wall s", "TTFT p50", "TTFT p95", "ITL p50 ms", "TPOT p50 ms")
    print(f"{'run':<22}" + "".join(f"{h:>12}" for h in header))
    for name in ("c1", "c8", "c32", "mixed"):
        x = r[name]
        print(
            f"{name:<22}{x['tokens_per_s']:>12.2f}{x['wall_s']:>12.1f}{x['ttft_p50_s']:>12.2f}{x['ttft_p95_s']:>12.2f}"
            f"{x['itl_p50_ms']:>12.0f}{x['tpot_p50_ms']:>12.0f}"
        )
    for name in ("static_32", "static_mixed"):
        print(f"{name:<22}{r[name]['tokens_per_s']:>12.2f}{r[name]['wall_s']:>12.1f}")
    targets = {"c32_vs_static": 0.8, "c32_vs_sequential": 8.0, "mixed_vs_static": 1.3}
    for name, value in r["ratios"].items():
        print(f"{name:<22}{value:>12.2f}  (target >= {targets[name]})")
    print(f"{'TTFT p50 at 32':<22}{r['c32']['ttft_p50_s']:>12.2f}  (target < 3 s)")
    rss = r["rss"]
    print(
        f"RSS over {rss['requests']} short requests: {rss['before']['rss_mib']:.0f} -> {rss['after']['rss_mib']:.0f} "
        f"MiB ({rss['growth']:+.1%}); peak {rss['before']['peak_mib']:.0f} -> {rss['after']['peak_mib']:.0f} MiB"
    )
    print(json.dumps({"benchmark": "throughput", **r}))


if __name__ == "__main__":
    main()
