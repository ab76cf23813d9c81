"""Automatic prefix caching for the Transformers engine: the KV of prompt prefixes kept in fixed-size blocks.

A prompt is cut into blocks of ``block_tokens`` tokens. Each full block is named by a digest chained over the
blocks before it (BLAKE2b over the parent's digest and the block's token ids), so a name stands for the whole prefix
up to that block, and the root is salted with the request's *scope*: requests of one scope (the gateway makes it the
API key) share prefixes, other scopes never see them. A block holds the keys and values of its tokens for every
layer, ``[2, layers, kv_heads, block_tokens, head_dim]``, copied out of the batch that computed them, and its token
ids, compared on every hit so that even a digest collision cannot hand one prompt another's KV.

A lookup walks the chain from the root and stops at the first block it lacks; the request is then prefilled only
from there. Cached keys carry rotary positions ``0..n-1`` of the prefix, the positions the prefix has in any prompt
that starts with it, which is why a hit is exact: the model sees the numbers it would have computed itself.

The store is bounded by a byte budget and evicts the least recently used block first. A chain is touched from its
deepest block up to its root, so a parent is always more recent than its children and a shared system prompt
outlives the conversations that branch off it. Only the engine's worker thread calls into it; the counters are plain
integers that other threads may read.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("server.engine")

BLOCK_TOKENS = 16
"""Tokens per cached block: a prefix is reused in whole blocks (vLLM's default size)."""


@dataclass(slots=True)
class Block:
    """The KV of one block of tokens and the token ids it stands for."""

    tokens: tuple[int, ...]
    kv: torch.Tensor  # [2, layers, kv_heads, block_tokens, head_dim]: keys, then values

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True, slots=True)
class Hit:
    """A cached prefix: its blocks in order (``length`` tokens in all)."""

    blocks: tuple[Block, ...]

    @property
    def length(self) -> int:
        return sum(len(b.tokens) for b in self.blocks)

    def kv(self) -> torch.Tensor:
        """``[2, layers, kv_heads, length, head_dim]``: the blocks joined (for tests; the engine copies them one by
        one into the batch)."""
        return torch.cat([b.kv for b in self.blocks], dim=3)


class PrefixCache:
    """Blocks of prompt KV by chained digest, least recently used first out, within ``budget_bytes``.

    Args:
        budget_bytes: Most memory the blocks may hold (on the model's device).
        block_tokens: Tokens per block.
    """

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if budget_bytes <= 0 or block_tokens <= 0:
            raise ValueError("the prefix cache needs a positive budget and block size")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, tokens found
        self.disabled: str | None = None  # why caching stopped (a model whose layers cannot share one block shape)

    def __len__(self) -> int:
        return len(self._blocks)

    def digests(self, scope: str, tokens: Sequence[int], blocks: int) -> list[bytes]:
        """The chained names of the first ``blocks`` full blocks of ``tokens`` in ``scope``."""
        size, out = self.block_tokens, []
        parent = hashlib.blake2b(scope.encode(), digest_size=16, person=b"llm-server-pfx").digest()
        for b in range(blocks):
            chunk = array("q", tokens[b * size : (b + 1) * size]).tobytes()
            parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
            out.append(parent)
        return out

    def match(
        self, scope: str, tokens: Sequence[int], limit: int, digests: Sequence[bytes] | None = None
    ) -> Hit | None:
        """The longest cached prefix of ``tokens`` within its first ``limit`` tokens (whole blocks), or ``None``.

        ``digests`` are the names of those blocks when the caller kept them from an earlier lookup (a request waiting
        at the head of the queue is looked up every step). Matching touches the blocks it returns (they become the
        most recently used). It does not count a query: the scheduler calls :meth:`count` once the request is
        actually prefilled.
        """
        if self.disabled is not None or not self._blocks:
            return None
        size, found = self.block_tokens, []
        if digests is None:
            digests = self.digests(scope, tokens, max(0, limit) // size)
        for b, digest in enumerate(digests):
            block = self._blocks.get(digest)
            if block is None or block.tokens != tuple(tokens[b * size : (b + 1) * size]):
                break
            found.append((digest, block))
        if not found:
            return None
        for digest, _ in reversed(found):
            self._blocks.move_to_end(digest)
        return Hit(tuple(block for _, block in found))

    def count(self, queried: int, hit: int) -> None:
        """Record one prefill's lookup: ``queried`` prompt tokens, ``hit`` of them from the cache."""
        self.queries += queried
        self.hits += hit

    def missing_from(self, scope: str, tokens: Sequence[int]) -> tuple[list[bytes], int]:
        """The digests of every full block of ``tokens`` and the index of the first one not stored."""
        digests = self.digests(scope, tokens, len(tokens) // self.block_tokens)
        first = next((i for i, d in enumerate(digests) if d not in self._blocks), len(digests))
        return digests, first

    def store(
        self, tokens: Sequence[int], digests: Sequence[bytes], first: int, block_kv: Callable[[int], torch.Tensor]
    ) -> int:
        """Keep the blocks of ``tokens`` named ``digests`` from block ``first`` on; return how many new blocks were
        kept. ``block_kv(b)`` gives block ``b``'s KV as a tensor of its own (it is called only for blocks kept).

        Blocks already stored are touched instead of copied. The chain is cut where it would no longer fit the
        budget whole, and eviction never takes a block of the chain being stored (a chain whose root made room for
        its own tail would be unreachable).
        """
        size = self.block_tokens
        chain: list[bytes] = []  # the chain as it will be stored, root first
        new: dict[bytes, Block] = {}
        held = 0
        for b, digest in enumerate(digests):
            old = self._blocks.get(digest)
            if old is not None:
                held += old.nbytes
            elif b < first:
                break  # evicted since the caller looked: the rest would hang off a missing parent
            else:
                block = Block(tuple(tokens[b * size : (b + 1) * size]), block_kv(b))
                if held + block.nbytes > self.budget_bytes:
                    break
                held += block.nbytes
                new[digest] = block
            chain.append(digest)
        need = sum(block.nbytes for block in new.values())
        keep, victims, freed = set(chain), [], 0
        for digest, block in self._blocks.items():
            if self.bytes - freed + need <= self.budget_bytes:
                break
            if digest not in keep:
                victims.append(digest)
                freed += block.nbytes
        for digest in victims:
            self.bytes -= self._blocks.pop(digest).nbytes
        for digest in reversed(chain):
            if digest in new:
                self._blocks[digest] = new[digest]
                self.bytes += new[digest].nbytes
            else:
                self._blocks.move_to_end(digest)
        return len(new)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
