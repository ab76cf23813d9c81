"""The scheduler's side of automatic prefix caching: what a prefill may skip, and what to keep for later requests.

:class:`Reuse` sits between the step loop and the :class:`~server.engine.prefix_cache.PrefixCache`. It keeps

- the prompt of every finished prefill (prompt rows, forks share theirs),
- a preempted row's prompt and output so far, so that its recomputation is mostly a cache hit,
- a finished row's prompt and output, so that a conversation's next turn (which repeats them) starts from them,

and looks a request up before it is prefilled, except a request that reports prompt logprobs: those need the logits
of every prompt position, so it is prefilled whole (its KV is still kept for others). A request's own ``cache_scope``
salts every name, so requests of different scopes never share a block.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from server.engine.batch import PaddedBatch, RowBlocks
from server.engine.pending import Pending
from server.engine.prefix_cache import Hit, PrefixCache

logger = logging.getLogger("server.engine")


class Reuse:
    """Lookups and stores of one scheduler's prefix cache (``None``: caching is off and every call does nothing)."""

    def __init__(self, cache: PrefixCache | None) -> None:
        self.cache = cache

    def lookup(self, pending: Pending, context: list[int]) -> Hit | None:
        """The cached prefix ``pending``'s prefill of ``context`` may skip (its last token is always computed)."""
        cache = self.cache
        if cache is None:
            return None
        if pending.request.params.prompt_logprobs is not None and not pending.prompt_reported:
            return None  # prompt logprobs need the logits of every prompt position: prefill it whole
        scope, limit = pending.request.cache_scope, len(context) - 1
        if pending.digests is None or pending.digests[0] != limit:  # hashed once per context, not once per step
            pending.digests = (limit, cache.digests(scope, context, limit // cache.block_tokens))
        return cache.match(scope, context, limit, pending.digests[1])

    def count(self, contexts: Sequence[Sequence[int]], hits: Sequence[Hit | None]) -> None:
        """Count the lookups of a prefill that starts: every prompt row's tokens, and those found."""
        if self.cache is not None:
            for context, hit in zip(contexts, hits, strict=True):
                self.cache.count(len(context), 0 if hit is None else hit.length)

    def keep_rows(self, batch: PaddedBatch, rows: Sequence[Pending], indexes: Sequence[int]) -> None:
        """Keep what rows ``indexes`` of the running ``batch`` hold: their prompt and the tokens fed so far."""
        if self.cache is None or batch.cache is None:
            return
        for i in indexes:
            row = rows[i]
            held = int(batch.mask[i].sum())  # the last sampled token is not in the cache yet
            self.keep(row.request.cache_scope, row.context()[:held], batch.cache, batch.mask, i)

    def keep(self, scope: str, tokens: list[int], cache: Any, mask: torch.Tensor, row: int) -> None:
        """Keep the full blocks of ``tokens``, whose KV is row ``row`` of ``cache`` (masked by ``mask``).

        Caching is an optimisation: if storing fails (a model whose layers do not share one KV shape), caching is
        turned off with a warning and the request goes on.
        """
        store = self.cache
        if store is None or store.disabled is not None:
            return
        digests, first = store.missing_from(scope, tokens)
        try:
            store.store(tokens, digests, first, RowBlocks(cache, mask, row, store.block_tokens))
        except Exception as exc:
            logger.warning("prefix caching is off for this model: its KV could not be stored (%s)", exc)
            store.disabled = str(exc)
            store.clear()
