"""The cost of grammar-constrained decoding: tokens/s with and without a JSON schema, batch 1 and 8, one run.

Writes the ``bench-0.5b`` demo model (Qwen2.5-0.5B's shape, random weights) and, by default, replaces its small
demo tokenizer with a byte-level BPE of ``--vocab`` tokens trained offline on the standard library's sources, so
that the grammar masks cover a vocabulary the size of a real model's (mask cost grows with the vocabulary). Then,
in process on the Transformers engine (no HTTP), for batch 1 and 8 it runs the same seeded sampled requests
(``max_tokens`` 64) twice: unconstrained (``ignore_eos``, so exactly 64 tokens) and with a strict JSON schema
(which ends each row when its JSON is complete). It also times building the grammar compiler for the tokenizer,
which happens once, on the first constrained request.

Prints a table and one JSON line.

    uv run python -m benchmarks.constrained [--vocab 65536] [--dtype float32] [--max-tokens 64] [--preset tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "rating": {"enum": ["low", "mid", "high"]},
        "notes": {"type": "array", "items": {"type": "object", "properties": {"text": {"type": "string"}}}},
    },
    "required": ["title", "year", "tags", "rating", "notes"],
    "additionalProperties": False,
}


def big_tokenizer(folder: Path, vocab: int) -> float:
    """Retrain the folder's tokenizer with ``vocab`` tokens on stdlib sources (same special tokens, same ids)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from server.engine.demo_model import ENDOFTEXT, IM_END, train_byte_level_bpe

    started = time.perf_counter()
    texts, size = [], 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        size += len(texts[-1])
        if size > 20_000_000:
            break
    tok = train_byte_level_bpe(texts, vocab)
    old = AutoTokenizer.from_pretrained(folder)
    new: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=old.model_max_length,
    )
    new.chat_template = old.chat_template
    new.save_pretrained(folder)
    return time.perf_counter() - started


async def run_batch(engine: Any, batch: int, max_tokens: int, constrained: bool) -> dict[str, Any]:
    from server.engine.base import Constraint, EngineRequest, SamplingParams

    constraint = Constraint(json_schema=json.dumps(SCHEMA)) if constrained else None
    prompt = engine.tokenizer.render_chat(
        [{"role": "user", "content": "Describe a film as JSON."}],
        add_generation_prompt=True,
        continue_final_message=False,
    )

    async def one(i: int) -> tuple[int, str, str | None]:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=not constrained, constraint=constraint
        )
        stream = engine.generate(EngineRequest(f"r{i}", prompt, params))
        tokens, text, finish = 0, "", None
        try:
            async for delta in stream:
                tokens += len(delta.token_ids)
                text += delta.text
                finish = delta.finish_reason
        finally:
            await stream.aclose()
        return tokens, text, finish

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(batch)))
    wall = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    valid = 0
    for _, text, finish in results:
        if finish == "stop":
            try:
                json.loads(text)
                valid += 1
            except ValueError:
                pass
    return {
        "batch": batch,
        "constrained": constrained,
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "finished_json": valid if constrained else None,
        "finish": sorted({str(r[2]) for r in results}),
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Two runs of one mode as one row: tokens and seconds summed."""
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    valid = None if runs[0]["finished_json"] is None else sum(r["finished_json"] for r in runs)
    return {
        "batch": runs[0]["batch"],
        "runs": len(runs),
        "constrained": runs[0]["constrained"],
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "finished_json": valid,
        "finish": sorted({f for r in runs for f in r["finish"]}),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=65536, help="tokenizer size (0 keeps the 1.5k demo tokenizer)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--preset", default="bench-0.5b", choices=["bench-0.5b", "tiny"])
    args = parser.parse_args()

    from server.engine.demo_model import write_demo_model
    from server.engine.hf import HFEngine

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_demo_model(Path(tmp) / "model", args.preset)
        train_s = big_tokenizer(folder, args.vocab) if args.vocab else 0.0
        engine = HFEngine(str(folder), served_model_name="bench", data_dir=Path(tmp), dtype=args.dtype)
        await engine.start()
        try:
            vocab = engine.tokenizer.vocab_size
            # The first constrained request builds the grammar compiler for this tokenizer: time it on its own.
            started = time.perf_counter()
            await run_batch(engine, 1, 2, constrained=True)
            first_s = time.perf_counter() - started
            await run_batch(engine, 1, 4, constrained=False)  # warm-up
            rows = []
            for batch in (1, 8):
                for constrained in (False, True):  # warm up this batch size's shapes in both modes
                    await run_batch(engine, batch, 8, constrained)
                # Alternate the modes, twice each, so drift (thermal, allocator) hits both alike.
                runs = [await run_batch(engine, batch, args.max_tokens, c) for c in (False, True, True, False)]
                for constrained in (False, True):
                    pair = [r for r in runs if r["constrained"] == constrained]
                    rows.append(merge(pair))
        finally:
            await engine.stop()

    print(f"model {args.preset} ({args.dtype}), tokenizer vocab {vocab} (trained in {train_s:.1f}s)")
    print(f"first constrained request (builds the grammar compiler): {first_s:.2f}s")
    print("each row: two runs of the batch, alternating with the other mode")
    print(f"{'batch':>5} {'schema':>6} {'tokens':>6} {'seconds':>8} {'tok/s':>8} {'valid JSON':>10}")
    for r in rows:
        valid = "" if r["finished_json"] is None else f"{r['finished_json']}/{r['batch'] * r['runs']}"
        schema = "yes" if r["constrained"] else "no"
        print(
            f"{r['batch']:>5} {schema:>6} {r['tokens']:>6} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.2f} {valid:>10}"
        )
    for batch in (1, 8):
        free, con = (r for r in rows if r["batch"] == batch)
        ratio = con["tokens_per_s"] / free["tokens_per_s"]
        print(f"batch {batch}: constrained / unconstrained tokens/s = {ratio:.3f}")
    summary = {"vocab": vocab, "dtype": args.dtype, "preset": args.preset, "first_constrained_s": round(first_s, 3)}
    print(json.dumps({**summary, "rows": rows}))


if __name__ == "__main__":
    asyncio.run(main())
