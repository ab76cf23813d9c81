"""Automatic prefix caching on a multi-turn chat workload, cache on vs off, same run, over HTTP.

Starts ``python -m server serve`` twice on the same model (default: SmolLM2-135M-Instruct's GGUF file, float32), once
with ``PREFIX_CACHE_MB=0`` and once with ``--cache-mb`` (the completion cache off in both), and on each:

1. **Probe** (one request at a time): a new ~1,000-token system prompt (a fresh nonce at its start, so nothing of it
   is cached) with a question, then the same system prompt with another question. Time to first token of the new
   prefix vs the repeated one; ``--probes`` pairs, medians.
2. **Workload**: ``--conversations`` conversations at once, each ``--turns`` turns, all sharing one ~1,000-token system
   prompt; each turn sends the whole conversation so far (streamed, greedy, ``--tokens`` new tokens) and appends the
   answer. Time to first token p50 / p95 (all turns, and turns after the first), generated tokens/s over the
   workload's wall time, and the share of prompt tokens reported as ``cached_tokens``.

    uv run python -m benchmarks.prefix_cache [--model PATH] [--conversations 16] [--turns 3] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import cli, percentile, serve, server_env
from benchmarks.real_model import default_model
from benchmarks.throughput import PEPPER

TOPICS = ["luggage", "refunds", "trains", "ferries", "visas", "insurance", "hotels", "guides", "meals", "weather"]
QUESTIONS = [
    "Which trip would you suggest for a family in July?",
    "Can you tell me more about the train option?",
    "How much luggage may I bring?",
    "Is travel insurance included?",
    "What happens if my flight is cancelled?",
    "Do you organise guided tours in Kyoto?",
]


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    text: str


def system_prompt(target_tokens: int, nonce: str = "") -> str:
    """A travel agency's policy, about ``target_tokens`` tokens of ordinary English (SmolLM2's tokenizer: ~1.3/word)."""
    rules = []
    for i in range(target_tokens // 24):
        topic = TOPICS[i % len(TOPICS)]
        rules.append(f"Rule {i + 1}: when a customer asks about {topic}, answer politely and check the booking first.")
    return f"{nonce}You are the assistant of a travel agency. Follow these rules.\n" + "\n".join(rules)


async def ask(
    client: httpx.AsyncClient, messages: list[dict[str, str]], tokens: int
) -> tuple[float, dict[str, Any], str]:
    """Stream one chat turn; return (seconds to the first content, usage, text)."""
    body = {"model": "bench", "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start, first, usage, parts = time.perf_counter(), None, {}, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    parts.append(content)
                if (content or choice.get("finish_reason")) and first is None:
                    first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start, usage, "".join(parts)


def cached_of(usage: dict[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))


async def probe(base: str, key: str, size: int, pairs: int, tokens: int) -> dict[str, Any]:
    cold, warm, shares = [], [], []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        for i in range(pairs):
            system = system_prompt(size, nonce=f"Session {size}-{i}. ")  # new to this server, the same in both passes
            t_cold, _, _ = await ask(
                client, [{"role": "system", "content": system}, {"role": "user", "content": "Hi!"}], tokens
            )
            messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % 6]}]
            t_warm, usage, _ = await ask(client, messages, tokens)
            cold.append(t_cold)
            warm.append(t_warm)
            shares.append(cached_of(usage) / usage["prompt_tokens"])
            prompt_tokens = usage["prompt_tokens"]
    return {
        "prompt_tokens": prompt_tokens,
        "ttft_new_prefix_s": statistics.median(cold),
        "ttft_repeated_prefix_s": statistics.median(warm),
        "speedup": statistics.median(cold) / statistics.median(warm),
        "cached_share": statistics.median(shares),
    }


async def workload(base: str, key: str, size: int, conversations: int, turns: int, tokens: int) -> dict[str, Any]:
    system = system_prompt(size, nonce="Workload. ")  # the same in both passes, so their answers compare
    done: list[Turn] = []
    limits = httpx.Limits(max_connections=conversations, max_keepalive_connections=conversations)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=900, limits=limits) as client:

        async def converse(c: int) -> None:
            messages = [{"role": "system", "content": system}]
            for t in range(turns):
                messages.append({"role": "user", "content": f"{QUESTIONS[(c + t) % 6]} (customer {c})"})
                ttft, usage, text = await ask(client, messages, tokens)
                done.append(
                    Turn(c, t, ttft, usage["prompt_tokens"], cached_of(usage), usage["completion_tokens"], text)
                )
                messages.append({"role": "assistant", "content": text})

        start = time.perf_counter()
        await asyncio.gather(*(converse(c) for c in range(conversations)))
        wall = time.perf_counter() - start
    later = [d.ttft for d in done if d.turn > 0]
    return {
        "requests": len(done),
        "wall_s": wall,
        "ttft_p50_s": percentile([d.ttft for d in done], 50),
        "ttft_p95_s": percentile([d.ttft for d in done], 95),
        "ttft_later_turns_p50_s": percentile(later, 50),
        "ttft_later_turns_p95_s": percentile(later, 95),
        "tokens_per_s": sum(d.completion_tokens for d in done) / wall,
        "prompt_tokens": sum(d.prompt_tokens for d in done),
        "cached_share": sum(d.cached_tokens for d in done) / sum(d.prompt_tokens for d in done),
        "mean_prompt_tokens": statistics.fmean(d.prompt_tokens for d in done),
        "texts": {f"{d.conversation}.{d.turn}": d.text for d in done},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf path, a folder or a hub id (default: SmolLM2-135M)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--system-tokens", type=int, default=1000, help="about this many tokens of system prompt")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each answer")
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--cache-mb", type=int, default=1024, help="PREFIX_CACHE_MB of the cached pass")
    args = parser.parse_args()
    model = args.model or default_model()
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    results: dict[str, Any] = {
        "model": model,
        "dtype": args.dtype,
        "cpu_threads": os.cpu_count(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }
    for label, mb in (("off", 0), ("on", args.cache_mb)):
        with tempfile.TemporaryDirectory() as tmp:
            env = server_env(Path(tmp), model=model, dtype=args.dtype, key_pepper=PEPPER, served_model_name="bench")
            env |= {"LLM_SERVER_CACHE_ENABLED": "false", "LLM_SERVER_PREFIX_CACHE_MB": str(mb)}
            key = str(json.loads(cli(env, "keys", "create", "--name", "b", "--role", "admin", "--json"))["key"])
            with serve(env, timeout_s=900.0) as base:
                asyncio.run(probe(base, key, 64, 1, 2))  # warm-up: the first forward passes are slow
                results[label] = {
                    "probe": asyncio.run(probe(base, key, args.system_tokens, args.probes, args.tokens)),
                    "workload": asyncio.run(
                        workload(base, key, args.system_tokens, args.conversations, args.turns, args.tokens)
                    ),
                }
        print(f"{label}: {json.dumps({k: v for k, v in results[label]['probe'].items()})}", flush=True)
    on_texts, off_texts = results["on"]["workload"].pop("texts"), results["off"]["workload"].pop("texts")
    results["answers_differing"] = sum(on_texts[k] != off_texts.get(k) for k in on_texts)
    report(results, args)
    print(json.dumps({"benchmark": "prefix_cache", **results}))


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    off, on = results["off"], results["on"]
    print(f"\nprobe: one request at a time, ~{off['probe']['prompt_tokens']}-token prompts")
    print(f"{'prefix cache':<14}{'TTFT new prefix':>18}{'TTFT repeated':>16}{'speed-up':>10}{'cached':>9}")
    for label, r in (("off", off["probe"]), ("on", on["probe"])):
        print(
            f"{label:<14}{r['ttft_new_prefix_s']:>17.3f}s{r['ttft_repeated_prefix_s']:>15.3f}s"
            f"{r['speedup']:>9.1f}x{100 * r['cached_share']:>8.1f}%"
        )
    print(f"\nworkload: {args.conversations} conversations x {args.turns} turns, {args.tokens} tokens per answer")
    header = ("TTFT p50", "TTFT p95", "later p50", "later p95", "tok/s", "cached")
    print(f"{'prefix cache':<14}" + "".join(f"{h:>11}" for h in header))
    for label, r in (("off", off["workload"]), ("on", on["workload"])):
        print(
            f"{label:<14}{r['ttft_p50_s']:>10.3f}s{r['ttft_p95_s']:>10.3f}s{r['ttft_later_turns_p50_s']:>10.3f}s"
            f"{r['ttft_later_turns_p95_s']:>10.3f}s{r['tokens_per_s']:>11.1f}{100 * r['cached_share']:>10.1f}%"
        )
    print(
        f"answers that differ with and without the cache: {results['answers_differing']} of "
        f"{off['workload']['requests']}"
        " (greedy; under concurrency the batch's composition, and so float rounding, differs between the two passes)"
    )


if __name__ == "__main__":
    main()
