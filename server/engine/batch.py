"""The running batch of the Transformers engine: left-padded rows over one ``DynamicCache`` that grows and shrinks.

The idea is TGI's ``CausalLMBatch.concatenate`` / ``filter`` over plain Transformers: every row ends at the same
column (left padding), so one decode step feeds one token per row. A 2-D attention mask ``[rows, width]`` marks the
real tokens; it is always exactly as wide as the cache plus the new tokens (a shorter mask is silently padded on the
right and hides the newest tokens). Position ids are each row's count of real tokens (``cumsum(mask) - 1``), never
the column, so a row sees the same positions, and so the same numbers, as when it runs alone.

New rows are prefilled in a :class:`PrefillJob` with their own cache, at most a token budget per engine step, then
merged: the narrower side is padded on the left with zeros (keys, values and mask) and the rows are stacked.
Leaving rows are dropped with an index select, and columns that became padding in every remaining row are trimmed.
Transformers 5.24 has no helper for either, so this is tensor work on ``cache.layers[i].keys/.values``
(``[rows, kv_heads, seq, head_dim]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, DynamicLayer

from server.engine.base import TokenLogprob
from server.engine.prefix_cache import Hit
from server.engine.sampling import token_logprobs

_SEQ = -2  # the sequence dimension of cached keys and values


def supports_merging(config: Any) -> bool:
    """Whether caches of ``config``'s model survive left-pad merging (only plain full-attention layers do).

    Sliding-window layers keep a rolling window whose padding cannot be realigned, and linear-attention layers keep
    recurrent state that padding tokens have already changed. Dummy layers (KV sharing, attention-free layers) hold
    nothing and are fine.
    """
    cache = DynamicCache(config=config)
    return all(type(layer) in (DynamicLayer, DummyLayer) for layer in cache.layers)


class PaddedBatch:
    """Rows decoding together: a left-padded KV cache and its 2-D attention mask.

    Args:
        cache: The rows' cache (``None`` while the batch is empty).
        mask: ``[rows, width]`` int64, 1 for real tokens; ``width`` equals the cache length.
    """

    def __init__(self, cache: DynamicCache | None, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    @classmethod
    def empty(cls, device: torch.device) -> PaddedBatch:
        return cls(None, torch.zeros((0, 0), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        """Columns of the cache (the longest row; shorter rows are padded on the left)."""
        return int(self.mask.shape[1])

    @property
    def footprint(self) -> int:
        """Cached token slots, padding included: what the batch holds in KV memory."""
        return self.size * self.width

    def decode(self, model: Any, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row (the row's last sampled token); return the next token's ``[rows, vocab]`` logits."""
        device = self.mask.device
        positions = self.mask.sum(dim=1, keepdim=True)  # real tokens so far = the position of the new one
        mask = torch.cat([self.mask, torch.ones((self.size, 1), dtype=torch.long, device=device)], dim=1)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.mask = mask
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def extend(self, other: PaddedBatch) -> None:
        """Append ``other``'s rows (after this batch's rows), left-padding whichever side is narrower."""
        if other.size == 0:
            return
        if self.size == 0 or self.cache is None:
            self.cache, self.mask = other.cache, other.mask
            return
        assert other.cache is not None
        width = max(self.width, other.width)
        for mine, theirs in zip(_kv_layers(self.cache), _kv_layers(other.cache), strict=True):
            assert mine.keys is not None
            assert mine.values is not None
            assert theirs.keys is not None
            assert theirs.values is not None
            mine.keys = _stack_right_aligned(mine.keys, theirs.keys, width, _SEQ)
            mine.values = _stack_right_aligned(mine.values, theirs.values, width, _SEQ)
        self.mask = _stack_right_aligned(self.mask, other.mask, width, -1)

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order; a row listed twice is copied) and trim all-padding columns."""
        if list(keep) == list(range(self.size)):
            return
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).int().argmax())  # the first column some kept row uses
        self.mask = mask[:, start:]
        if self.cache is None:
            return
        for layer in _kv_layers(self.cache):
            assert layer.keys is not None
            assert layer.values is not None
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]


class PrefillJob:
    """Prompts being prefilled into their own cache, in chunks, before their rows join the running batch.

    The prompts are left-padded into one ``[rows, width]`` matrix; :meth:`step` feeds the next columns, at most
    ``max_tokens`` padded tokens per call, and returns the next-token logits once the last column is in.

    Args:
        prompts: Token ids of each row's prompt (non-empty).
        config: The model config (for the cache's layer types).
        device: Where the tensors live.
        prompt_logprobs: Per row, ``None`` or the number of alternatives to report with the log probability of each
            prompt token after the first (:attr:`prompt_entries` holds them once the job is finished). Any such row
            makes every chunk keep the logits of all positions, not only the last.
        vocab_limit: Ids the tokenizer can decode (the logits may be wider).
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        config: Any,
        device: torch.device,
        *,
        prompt_logprobs: Sequence[int | None] = (),
        vocab_limit: int | None = None,
        cached: Sequence[Hit | None] = (),
    ) -> None:
        rows = len(prompts)
        hits = list(cached) or [None] * rows
        skip = [0 if h is None else h.length for h in hits]
        if any(s >= len(p) for s, p in zip(skip, prompts, strict=True)):
            raise ValueError("a cached prefix must leave at least one prompt token to prefill")
        if any(s and w is not None for s, w in zip(skip, prompt_logprobs, strict=False)):
            raise ValueError("a row that reports prompt logprobs must be prefilled whole")
        # Cached prefixes end at column ``head``; the tokens still to feed are right-aligned after it. A row with a
        # shorter (or no) cached prefix has padding inside it: the mask hides it and positions count real tokens.
        head = max(skip)
        width = head + max(len(p) - s for p, s in zip(prompts, skip, strict=True))
        self.want = list(prompt_logprobs) or [None] * rows
        self.vocab_limit = vocab_limit
        self.prompt_entries: list[list[TokenLogprob] | None] = [None if w is None else [] for w in self.want]
        self.ids = torch.zeros((rows, width), dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, width), dtype=torch.long, device=device)
        for i, (prompt, s) in enumerate(zip(prompts, skip, strict=True)):
            rest = len(prompt) - s
            self.ids[i, head - s : head] = torch.tensor(list(prompt[:s]), dtype=torch.long)
            self.ids[i, width - rest :] = torch.tensor(list(prompt[s:]), dtype=torch.long)
            self.mask[i, head - s : head] = 1
            self.mask[i, width - rest :] = 1
        # Padding columns get position 0; they are masked out, so the value only has to be a valid index.
        self.positions = (self.mask.cumsum(dim=1) - 1).clamp_(min=0)
        self.cache = DynamicCache(config=config)
        if head:
            _fill(self.cache, hits, head)
        self.done = head  # columns already in the cache
        self.cached = skip
        """Per row, the prompt tokens that came from the prefix cache."""
        self.prompts = [list(p) for p in prompts]
        self.fed = 0  # real (unpadded) prompt tokens fed so far

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def finished(self) -> bool:
        return self.done >= self.width

    @property
    def footprint(self) -> int:
        """Cached token slots so far, padding included."""
        return self.rows * self.done

    def chunks_left(self, max_tokens: int) -> int:
        """Steps still needed at ``max_tokens`` padded tokens per step."""
        columns = max(1, max_tokens // self.rows)
        return -(-(self.width - self.done) // columns)

    def step(self, model: Any, max_tokens: int) -> torch.Tensor | None:
        """Prefill the next chunk; return ``[rows, vocab]`` next-token logits after the last one, else ``None``."""
        start, end = self.done, min(self.width, self.done + max(1, max_tokens // self.rows))
        every = any(w is not None for w in self.want)
        out = model(
            input_ids=self.ids[:, start:end],
            attention_mask=self.mask[:, :end],
            position_ids=self.positions[:, start:end],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=0 if every else 1,
        )
        self.done = end
        self.fed += int(self.mask[:, start:end].sum())
        if every:
            self._score_prompts(out.logits, start, end)
        if not self.finished:
            return None
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _score_prompts(self, logits: torch.Tensor, start: int, end: int) -> None:
        """Log probabilities of the prompt tokens that columns ``start..end`` predict (column c predicts c + 1)."""
        for row, want in enumerate(self.want):
            entries = self.prompt_entries[row]
            if want is None or entries is None:
                continue
            # Column c predicts column c + 1; only real (unpadded) columns that have a successor count.
            cols = [c for c in range(start, min(end, self.width - 1)) if self.mask[row, c]]
            if not cols:
                continue
            scores = logits[row, [c - start for c in cols], : self.vocab_limit]
            targets = self.ids[row, [c + 1 for c in cols]].tolist()
            entries += token_logprobs(scores, targets, [want] * len(cols))

    def into_batch(self, keep: Sequence[int]) -> PaddedBatch:
        """The finished job's rows ``keep`` as a batch ready to merge (the job is spent afterwards).

        A row listed more than once is copied: the forks of one prompt start from the same cache.
        """
        batch = PaddedBatch(self.cache, self.mask)
        batch.select(keep)
        return batch


class RowBlocks:
    """Cuts the KV of one row of a cache into prefix-cache blocks ``[2, layers, kv_heads, block, head_dim]``.

    Each block is one fresh tensor, filled by one ``stack`` per keys and values straight from the cache's layers, so
    storing a block copies its bytes once (copies are what a long prompt's store costs).

    Args:
        cache: The cache holding the row.
        mask: Its ``[rows, width]`` mask: the row's real columns are where it is 1 (padding may sit anywhere).
        row: Which row.
        block: Tokens per block.
    """

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, row: int, block: int) -> None:
        self._layers = _kv_layers(cache)
        self._row, self._block = row, block
        self._columns = mask[row].nonzero().squeeze(1)  # the row's real columns, in order

    def __call__(self, index: int) -> torch.Tensor:
        """Block ``index`` of the row's real tokens (its tokens ``index * block`` to ``(index + 1) * block``)."""
        columns = self._columns[index * self._block : (index + 1) * self._block]
        start, size = int(columns[0]), len(columns)
        contiguous = int(columns[-1]) - start + 1 == size  # true but where a cached prefix and the rest meet
        first = self._layers[0].keys
        assert first is not None
        out = first.new_empty((2, len(self._layers), first.shape[1], size, first.shape[3]))
        for side in (0, 1):
            parts = []
            for layer in self._layers:
                t = layer.keys if side == 0 else layer.values
                assert t is not None
                parts.append(t[self._row, :, start : start + size] if contiguous else t[self._row][:, columns])
            torch.stack(parts, out=out[side])
        return out


def _fill(cache: DynamicCache, hits: Sequence[Hit | None], head: int) -> None:
    """Put each row's cached prefix into ``cache``, right-aligned at column ``head`` (zeros before it).

    One allocation for every layer and one copy of each block; the layers' keys and values are views of it.
    """
    shape = next(h for h in hits if h is not None).blocks[0].kv.shape  # [2, layers, kv_heads, block, head_dim]
    sample = next(h for h in hits if h is not None).blocks[0].kv
    _, layers, heads, _, dim = shape
    full = sample.new_empty((2, layers, len(hits), heads, head, dim))
    for row, hit in enumerate(hits):
        length = 0 if hit is None else hit.length
        if length < head:
            full[:, :, row, :, : head - length].zero_()
        at = head - length
        for block in () if hit is None else hit.blocks:
            size = block.kv.shape[3]
            full[:, :, row, :, at : at + size].copy_(block.kv)
            at += size
    slots = [layer for layer in cache.layers if type(layer) is DynamicLayer]
    if len(slots) != layers:
        raise ValueError(f"the cached prefix has {layers} layers of keys and values, the model {len(slots)}")
    for i, layer in enumerate(slots):
        layer.lazy_initialization(full[0, i], full[1, i])
        layer.keys, layer.values = full[0, i], full[1, i]


def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The layers holding keys and values (a layer sharing another layer's cache holds none of its own)."""
    layers = []
    for layer in cache.layers:
        if isinstance(layer, DummyLayer):
            continue
        if not isinstance(layer, DynamicLayer) or type(layer) is not DynamicLayer:
            raise TypeError(f"cannot merge or filter a {type(layer).__name__} (only full-attention caches)")
        if layer.keys is not None and layer.values is not None and layer.keys.numel():
            layers.append(layer)
    return layers


def _stack_right_aligned(top: torch.Tensor, bottom: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Stack ``top`` over ``bottom`` along dim 0, both right-aligned in a zero tensor ``width`` long along ``dim``."""
    shape = list(top.shape)
    shape[0] = top.shape[0] + bottom.shape[0]
    shape[dim] = width
    out = top.new_zeros(shape)
    out[: top.shape[0]].narrow(dim, width - top.shape[dim], top.shape[dim]).copy_(top)
    out[top.shape[0] :].narrow(dim, width - bottom.shape[dim], bottom.shape[dim]).copy_(bottom)
    return out
