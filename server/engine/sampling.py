"""Per-row token sampling over a batch of logits.

Every row of a batch carries its own parameters and its own ``torch.Generator``, so requests batched together
never share randomness and a seeded request is reproducible whatever runs beside it. The global torch RNG is
never used. Later features (penalties, logit bias, logprobs) hang off :class:`RowSampler`, which holds the
per-request state, and :meth:`Sampler.sample`, which sees every row's state next to its logits.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.base import SamplingParams

# Nucleus sampling without top-k first tries this many candidates: sorting a 152k vocabulary each step costs
# more than the forward pass, and the nucleus almost always lies within the top few hundred tokens.
_TOP_P_CANDIDATES = 256


@dataclass(slots=True)
class RowSampler:
    """One request's sampling state.

    Attributes:
        params: The request's sampling parameters.
        generator: The request's own random generator (on the logits' device).
    """

    params: SamplingParams
    generator: torch.Generator

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device | str = "cpu") -> RowSampler:
        """Make a row for ``params``, seeding its generator from ``params.seed`` or from the OS when it is None."""
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=device)
        # Generators take unsigned 64-bit seeds; map negative user seeds instead of rejecting them.
        generator.manual_seed(seed % (1 << 64))
        return cls(params=params, generator=generator)


class Sampler:
    """Chooses the next token of every row of a batch.

    Args:
        vocab_limit: Number of ids the tokenizer can decode; logits at or beyond it are never chosen (models
            often pad their embedding matrix past the tokenizer's length).
    """

    def __init__(self, vocab_limit: int) -> None:
        self.vocab_limit = vocab_limit

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int]:
        """Pick one token per row.

        Args:
            logits: ``[batch, vocab]`` scores of the next token, any float dtype.
            rows: One :class:`RowSampler` per batch row, in the same order.

        Returns:
            The chosen token id of each row.
        """
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} samplers")
        logits = logits[:, : self.vocab_limit].float()
        # One argmax for the whole batch serves every greedy row; a single .tolist() is the only device sync.
        chosen: list[int] = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if not row.params.greedy:
                chosen[i] = sample_row(logits[i], row.params, row.generator)
        return chosen


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Sample one token from 1-D ``logits`` with temperature, top-k, top-p and min-p, in that order.

    Each filter sees the distribution renormalised after the previous one (as Transformers' warpers do).
    """
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    vocab = scores.shape[-1]
    ids: torch.Tensor | None = None  # candidate ids when only a subset is kept, else all of them in order
    if 0 < params.top_k < vocab:
        scores, ids = torch.topk(scores, params.top_k)  # sorted, largest first
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1)
        if params.top_p < 1.0:
            probs, ids = _nucleus_candidates(probs, params.top_p)
    if params.top_p < 1.0:
        # probs are sorted descending here; keep a token while the mass before it is below top_p. The top token
        # (nothing before it) always stays, so a degenerate top_p cannot leave an empty distribution.
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill((before >= params.top_p) & (before > 0), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < min(params.min_p, 1.0) * probs.max(), 0.0)
    # multinomial accepts unnormalised weights, so no renormalisation after masking.
    index = int(torch.multinomial(probs, 1, generator=generator).item())
    return int(ids[index].item()) if ids is not None else index


def _nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens, sorted, enough of them to cover ``top_p`` of the mass.

    A partial top-k is exact whenever its mass reaches ``top_p``: every token of the nucleus is among them.
    Only flat distributions fall back to sorting the whole vocabulary.
    """
    k = min(_TOP_P_CANDIDATES, probs.shape[-1])
    values, ids = torch.topk(probs, k)
    if k < probs.shape[-1] and float(values.sum()) < top_p:
        values, ids = torch.sort(probs, descending=True)
    return values, ids
