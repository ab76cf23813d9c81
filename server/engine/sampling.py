"""Per-row token sampling over a batch of logits.

Every row of a batch carries its own parameters and its own ``torch.Generator``, so requests batched together
never share randomness and a seeded request is reproducible whatever runs beside it. The global torch RNG is
never used.

One call handles the whole batch: greedy rows share one ``argmax``; sampled rows are filtered together
(temperature, top-k, top-p, min-p as per-row tensors) and drawn by inverse CDF from one uniform number per row,
taken from that row's generator. Later per-row features slot in without changing the call: penalties, logit bias
and grammar masks are edits of a row's logits before selection (state on :class:`RowSampler`), logprobs read the
same scaled scores.
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
        logits = logits[:, : self.vocab_limit]
        # One argmax serves every greedy row (exact in any dtype, so no float copy); .tolist() is the only sync.
        chosen: list[int] = logits.argmax(dim=-1).tolist()
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            picks = sample_rows(logits.index_select(0, index).float(), [rows[i] for i in sampled])
            for i, token in zip(sampled, picks, strict=True):
                chosen[i] = token
        return chosen


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int]:
    """Sample one token per row of float ``logits`` (``[n, vocab]``) with each row's own filters and generator.

    Filters apply in the order temperature, top-k, top-p, min-p; each sees the distribution renormalised after
    the previous one (as Transformers' warpers do). Rows with neither top-k nor top-p draw from the whole
    vocabulary without sorting it; the others sort only their candidates.
    """
    device = logits.device
    # One uniform number per row from the row's own generator: the only per-row call, and the row's only draw.
    uniform = torch.cat([torch.rand(1, generator=row.generator, device=device) for row in rows])
    temperature = torch.tensor([row.params.temperature for row in rows], device=device)
    scores = logits / temperature.unsqueeze(1)
    vocab = scores.shape[-1]
    chosen = [0] * len(rows)
    full = [i for i, row in enumerate(rows) if not _needs_candidates(row.params, vocab)]
    ranked = [i for i, row in enumerate(rows) if _needs_candidates(row.params, vocab)]
    if full:
        index = torch.tensor(full, device=device)
        probs = torch.softmax(scores.index_select(0, index), dim=-1)
        probs = _min_p(probs, probs.amax(dim=-1, keepdim=True), [rows[i].params for i in full])
        picks = _inverse_cdf(probs, uniform.index_select(0, index)).tolist()
        for i, token in zip(full, picks, strict=True):
            chosen[i] = token
    if ranked:
        short = _sample_ranked(scores, ranked, rows, uniform, chosen, candidates=None)
        if short:  # nucleus wider than the candidate window (flat distributions): sort those rows fully
            _sample_ranked(scores, short, rows, uniform, chosen, candidates=vocab)
    return chosen


def _needs_candidates(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1.0


def _sample_ranked(
    scores: torch.Tensor,
    subset: list[int],
    rows: Sequence[RowSampler],
    uniform: torch.Tensor,
    chosen: list[int],
    candidates: int | None,
) -> list[int]:
    """Sample rows ``subset`` (which use top-k and/or top-p) from their sorted candidates into ``chosen``.

    Returns the rows whose nucleus did not fit in the candidate window (only when ``candidates`` is None).
    """
    device, vocab = scores.device, scores.shape[-1]
    params = [rows[i].params for i in subset]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    width = candidates or min(vocab, max(k if k < vocab else _TOP_P_CANDIDATES for k in top_k))
    index = torch.tensor(subset, device=device)
    rows_scores = scores.index_select(0, index)
    values, ids = torch.topk(rows_scores, width)  # sorted, largest first
    k = torch.tensor(top_k, device=device).unsqueeze(1)
    values = values.masked_fill(torch.arange(width, device=device) >= k, float("-inf"))
    # Top-k rows renormalise over their k tokens; top-p-only rows keep the whole vocabulary's normaliser.
    has_k = torch.tensor([kk < vocab for kk in top_k], device=device).unsqueeze(1)
    norm = torch.where(
        has_k, torch.logsumexp(values, dim=-1, keepdim=True), torch.logsumexp(rows_scores, dim=-1, keepdim=True)
    )
    probs = torch.exp(values - norm)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    short: list[int] = []
    if candidates is None and width < vocab:
        # A top-p-only row whose candidates hold less than top_p of the mass may miss nucleus tokens.
        mass = probs.sum(dim=-1).tolist()
        short = [i for i, p, kk, m in zip(subset, params, top_k, mass, strict=True) if kk == vocab and m < p.top_p]
    # Keep a token while the mass before it is below top_p (probs are renormalised after top-k, and over the whole
    # vocabulary for top-p-only rows). The top token always stays, so a degenerate top_p cannot empty a row.
    before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill((before >= top_p) & (before > 0), 0.0)
    probs = _min_p(probs, probs[:, :1], params)
    picks = ids.gather(1, _inverse_cdf(probs, uniform.index_select(0, index)).unsqueeze(1)).squeeze(1).tolist()
    for i, token in zip(subset, picks, strict=True):
        if i not in short:
            chosen[i] = token
    return short


def _min_p(probs: torch.Tensor, top: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Drop tokens below ``min_p`` times the most likely one (scale-free, so no renormalisation is needed)."""
    if not any(p.min_p > 0.0 for p in params):
        return probs
    min_p = torch.tensor([min(p.min_p, 1.0) for p in params], device=probs.device).unsqueeze(1)
    return probs.masked_fill(probs < min_p * top, 0.0)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's unnormalised ``weights`` with that row's uniform number in [0, 1)."""
    cdf = torch.cumsum(weights, dim=-1)
    target = uniform.unsqueeze(1) * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds the target, so zero-weight tokens are never chosen.
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp_(max=weights.shape[-1] - 1)


def _nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens of 1-D ``probs``, sorted, enough of them to cover ``top_p`` of the mass.

    A partial top-k is exact whenever its mass reaches ``top_p``: every token of the nucleus is among them.
    Only flat distributions fall back to sorting the whole vocabulary. (The batched sampler applies the same
    rule per row; this single-row form documents and tests it.)
    """
    k = min(_TOP_P_CANDIDATES, probs.shape[-1])
    values, ids = torch.topk(probs, k)
    if k < probs.shape[-1] and float(values.sum()) < top_p:
        values, ids = torch.sort(probs, descending=True)
    return values, ids
