"""The prefix cache's store on its own: chained block names, scopes, token checks, LRU order and the byte budget."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from server.engine.batch import RowBlocks
from server.engine.prefix_cache import PrefixCache

LAYERS, HEADS, DIM, BLOCK = 2, 2, 4, 4
BLOCK_BYTES = LAYERS * 2 * HEADS * BLOCK * DIM * 4  # float32


def kv_for(tokens: list[int]) -> torch.Tensor:
    """Fake KV ``[2, layers, heads, tokens, dim]`` whose values encode each token, its position, layer and side, so
    a wrong block shows up in the numbers."""
    out = torch.zeros(2, LAYERS, HEADS, len(tokens), DIM)
    for pos, tok in enumerate(tokens):
        out[:, :, :, pos, 0] = tok
        out[:, :, :, pos, 1] = pos
    for layer in range(LAYERS):
        out[:, layer, :, :, 2] = layer
    out[1, :, :, :, 3] = 1
    return out


def cache_of(kv: torch.Tensor, columns: list[int], width: int) -> tuple[DynamicCache, torch.Tensor]:
    """A one-row cache ``width`` wide holding ``kv``'s tokens at ``columns`` (padding elsewhere) and its mask."""
    keys = torch.full((2, LAYERS, 1, HEADS, width, DIM), -1.0)
    keys[:, :, 0, :, columns] = kv
    mask = torch.zeros(1, width, dtype=torch.long)
    mask[0, columns] = 1
    return DynamicCache([(keys[0, layer], keys[1, layer]) for layer in range(LAYERS)]), mask


def put(cache: PrefixCache, tokens: list[int], scope: str = "a") -> int:
    digests, first = cache.missing_from(scope, tokens)
    kv = kv_for(tokens)
    return cache.store(tokens, digests, first, lambda b: kv[:, :, :, b * BLOCK : (b + 1) * BLOCK].clone())


def test_a_stored_prefix_is_found_in_whole_blocks_and_its_kv_is_the_stored_one() -> None:
    cache = PrefixCache(10 * BLOCK_BYTES, block_tokens=BLOCK)
    prompt = list(range(100, 111))  # 11 tokens: two full blocks and three left over
    assert put(cache, prompt) == 2
    assert len(cache) == 2 and cache.bytes == 2 * BLOCK_BYTES
    hit = cache.match("a", [*prompt[:9], 7, 7, 7], limit=11)
    assert hit is not None and hit.length == 8
    assert torch.equal(hit.kv(), kv_for(prompt)[:, :, :, :8])
    assert cache.match("a", [*prompt[:5], 1, 2, 3, 4], limit=8).length == 4  # type: ignore[union-attr]
    assert cache.match("a", [1, *prompt], limit=12) is None  # a prefix, not any substring


def test_the_limit_keeps_at_least_the_last_prompt_token_to_compute() -> None:
    cache = PrefixCache(10 * BLOCK_BYTES, block_tokens=BLOCK)
    prompt = list(range(8))
    put(cache, prompt)
    hit = cache.match("a", prompt, limit=len(prompt) - 1)
    assert hit is not None and hit.length == 4


def test_scopes_never_share_blocks() -> None:
    cache = PrefixCache(10 * BLOCK_BYTES, block_tokens=BLOCK)
    prompt = list(range(9))
    put(cache, prompt, scope="key:one")
    assert cache.match("key:two", prompt, limit=8) is None
    assert cache.match("", prompt, limit=8) is None
    assert cache.match("key:one", prompt, limit=8) is not None


def test_a_block_under_a_colliding_name_with_other_tokens_is_not_a_hit() -> None:
    cache = PrefixCache(10 * BLOCK_BYTES, block_tokens=BLOCK)
    prompt = list(range(8))
    put(cache, prompt)
    other = [9, 9, 9, 9, 4, 5, 6, 7, 1]
    forged = cache.digests("a", prompt, 2)
    assert cache.digests("a", other, 2) != forged
    # Forge a collision: the other prompt's first block filed under the stored prompt's name.
    cache._blocks[forged[0]].tokens = tuple(other[:4])
    assert cache.match("a", prompt, limit=8) is None  # the stored tokens differ from the prompt's: no hit


def test_least_recently_used_goes_first_and_a_shared_root_outlives_its_branches() -> None:
    cache = PrefixCache(4 * BLOCK_BYTES, block_tokens=BLOCK)
    system = [1, 2, 3, 4]
    put(cache, [*system, 10, 11, 12, 13])  # root + branch A
    put(cache, [*system, 20, 21, 22, 23])  # + branch B
    put(cache, [*system, 30, 31, 32, 33])  # + branch C: 4 blocks, full
    assert cache.bytes == 4 * BLOCK_BYTES
    put(cache, [*system, 40, 41, 42, 43])  # evicts branch A (the oldest leaf), never the root
    assert cache.bytes <= cache.budget_bytes and len(cache) == 4
    assert cache.match("a", [*system, 10, 11, 12, 13, 0], limit=8).length == 4  # type: ignore[union-attr]
    assert cache.match("a", [*system, 40, 41, 42, 43, 0], limit=8).length == 8  # type: ignore[union-attr]
    cache.match("a", [*system, 20, 21, 22, 23, 0], limit=8)  # B used again: C is now the oldest leaf
    put(cache, [*system, 50, 51, 52, 53])
    assert cache.match("a", [*system, 20, 21, 22, 23, 0], limit=8).length == 8  # type: ignore[union-attr]
    assert cache.match("a", [*system, 30, 31, 32, 33, 0], limit=8).length == 4  # type: ignore[union-attr]


def test_a_chain_longer_than_the_budget_is_cut_to_fit_and_memory_never_exceeds_it() -> None:
    cache = PrefixCache(3 * BLOCK_BYTES, block_tokens=BLOCK)
    long = list(range(40))  # 10 blocks
    assert put(cache, long) == 3
    assert cache.bytes == 3 * BLOCK_BYTES
    assert cache.match("a", long, limit=39).length == 12  # type: ignore[union-attr]
    for start in range(100, 400, 8):
        put(cache, list(range(start, start + 9)))
        assert cache.bytes <= cache.budget_bytes
        assert cache.bytes == sum(b.nbytes for b in cache._blocks.values())


def test_storing_again_touches_instead_of_copying() -> None:
    cache = PrefixCache(10 * BLOCK_BYTES, block_tokens=BLOCK)
    prompt = list(range(12))
    assert put(cache, prompt) == 3
    assert put(cache, prompt) == 0
    assert cache.bytes == 3 * BLOCK_BYTES
    assert put(cache, [*prompt, 50, 51, 52, 53]) == 1  # only the new block is copied
    assert cache.bytes == 4 * BLOCK_BYTES


def test_stored_blocks_own_their_memory() -> None:
    cache = PrefixCache(10 * BLOCK_BYTES, block_tokens=BLOCK)
    tokens = list(range(8))
    kv = kv_for(tokens)
    digests, first = cache.missing_from("a", tokens)
    batch, mask = cache_of(kv, list(range(len(tokens))), len(tokens))
    cache.store(tokens, digests, first, RowBlocks(batch, mask, 0, BLOCK))
    for layer in batch.layers:  # the batch's tensors are reused or freed after the prefill
        assert layer.keys is not None and layer.values is not None
        layer.keys.zero_()
        layer.values.zero_()  # the batch's tensors are reused or freed after the prefill
    hit = cache.match("a", [*tokens, 1], limit=8)
    assert hit is not None and torch.equal(hit.kv(), kv_for(tokens))


def test_a_rows_blocks_skip_its_padding_wherever_it_is() -> None:
    tokens = list(range(50, 60))
    kv = kv_for(tokens)
    # Left padding, a cached part of 4 tokens, a hole of 3 columns, then the rest: as a group prefill lays rows out.
    columns = [2, 3, 4, 5, 9, 10, 11, 12, 13, 14]
    batch, mask = cache_of(kv, columns, 15)
    blocks = RowBlocks(batch, mask, 0, BLOCK)
    assert torch.equal(blocks(0), kv[:, :, :, 0:4])
    assert torch.equal(blocks(1), kv[:, :, :, 4:8])  # across the hole
    assert blocks(0).is_contiguous() and blocks(0).untyped_storage().nbytes() == BLOCK_BYTES


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(0)
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(1024, block_tokens=0)
