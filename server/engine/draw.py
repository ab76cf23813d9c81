"""Drawing one token per row from filtered distributions: temperature, top-k, top-p and min-p, per row.

Rows with neither top-k nor top-p draw from the whole vocabulary without sorting it; the others sort only their
candidates. Every row draws with one uniform number from its own generator (inverse CDF), so a seeded row gives the
same tokens whatever it is batched with. See :mod:`server.engine.sampling` for the batch-level sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from server.engine.base import SamplingParams

if TYPE_CHECKING:
    from server.engine.sampling import RowSampler

# Nucleus sampling without top-k first tries this many candidates: sorting a 152k vocabulary each step costs
# more than the forward pass, and the nucleus almost always lies within the top few hundred tokens.
_TOP_P_CANDIDATES = 256


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int | None]:
    """Sample one token per row of float ``logits`` (``[n, vocab]``) with each row's own filters and generator.

    Filters apply in the order temperature, top-k, top-p, min-p; each sees the distribution renormalised after
    the previous one (as Transformers' warpers do). Rows with neither top-k nor top-p draw from the whole
    vocabulary without sorting it; the others sort only their candidates. A row whose filtered distribution has no
    positive finite mass (its scaled scores overflowed) gets ``None``, never a token.
    """
    device = logits.device
    # One uniform number per row from the row's own generator: the only per-row call, and the row's only draw.
    uniform = torch.cat([torch.rand(1, generator=row.generator, device=device) for row in rows])
    temperature = torch.tensor([row.params.temperature for row in rows], device=device)
    scores = logits / temperature.unsqueeze(1)
    vocab = scores.shape[-1]
    chosen: list[int | None] = [None] * len(rows)
    full = [i for i, row in enumerate(rows) if not _needs_candidates(row.params, vocab)]
    ranked = [i for i, row in enumerate(rows) if _needs_candidates(row.params, vocab)]
    if full:
        index = torch.tensor(full, device=device)
        probs = torch.softmax(scores.index_select(0, index), dim=-1)
        probs = _min_p(probs, probs.amax(dim=-1, keepdim=True), [rows[i].params for i in full])
        picks = _inverse_cdf(probs, uniform.index_select(0, index)).tolist()
        for i, token in zip(full, picks, strict=True):
            chosen[i] = token if token >= 0 else None
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
    chosen: list[int | None],
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
    drawn = _inverse_cdf(probs, uniform.index_select(0, index))
    picks = ids.gather(1, drawn.clamp(min=0).unsqueeze(1)).squeeze(1).tolist()
    for i, token, ok in zip(subset, picks, (drawn >= 0).tolist(), strict=True):
        if i not in short:
            chosen[i] = token if ok else None
    return short


def _min_p(probs: torch.Tensor, top: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Drop tokens below ``min_p`` times the most likely one (scale-free, so no renormalisation is needed)."""
    if not any(p.min_p > 0.0 for p in params):
        return probs
    min_p = torch.tensor([min(p.min_p, 1.0) for p in params], device=probs.device).unsqueeze(1)
    return probs.masked_fill(probs < min_p * top, 0.0)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's unnormalised ``weights`` with that row's uniform number in [0, 1).

    A row whose total weight is not a positive finite number (NaN or infinite weights, or none at all) gets -1.
    """
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1:]
    # Keep the target strictly below the total whatever the generator gives (some device generators can return
    # exactly 1), so the search ends on a token with weight, never on a zero-weight (masked) token after the last one.
    target = torch.minimum(uniform.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True: the first index whose cdf exceeds the target, so zero-weight tokens are never chosen.
    index = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)
    usable = (torch.isfinite(total) & (total > 0)).squeeze(1)
    return torch.where(usable, index, torch.full_like(index, -1))


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
