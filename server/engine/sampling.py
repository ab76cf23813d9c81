"""Per-row token sampling over a batch of logits.

Every row of a batch carries its own parameters and its own ``torch.Generator``, so requests batched together
never share randomness and a seeded request is reproducible whatever runs beside it. The global torch RNG is
never used.

One call handles the whole batch: greedy rows share one ``argmax``; sampled rows are filtered together
(temperature, top-k, top-p, min-p as per-row tensors) and drawn by inverse CDF from one uniform number per row,
taken from that row's generator. Penalties, logit bias and grammar masks are edits of a row's logits before
selection (state on :class:`RowSampler`); logprobs read the raw scores.

A row's failure is that row's alone: a row whose logits are unusable (NaN or infinite scores from the model, nothing
left to choose after its penalties, bias and mask, or a distribution that does not sum to a positive finite mass)
or whose processing raises gets a :class:`RowError` instead of a token, and every other row of the batch is sampled
exactly as if it were not there. No NaN or infinite score can ever turn into a token.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.base import EngineError, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from server.engine.grammar import RowGrammar

# Nucleus sampling without top-k first tries this many candidates: sorting a 152k vocabulary each step costs
# more than the forward pass, and the nucleus almost always lies within the top few hundred tokens.
_TOP_P_CANDIDATES = 256


class RowError(EngineError):
    """One row of a batch cannot be sampled; its request fails and the rest of the batch goes on."""


@dataclass(slots=True)
class RowSampler:
    """One request's sampling state.

    Attributes:
        params: The request's sampling parameters.
        generator: The request's own random generator (on the logits' device).
    """

    params: SamplingParams
    generator: torch.Generator
    grammar: RowGrammar | None = None
    counts: Counter[int] = field(default_factory=Counter)  # generated tokens (presence/frequency penalties)
    seen: set[int] = field(default_factory=set)  # prompt and generated tokens (repetition penalty)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        device: torch.device | str = "cpu",
        *,
        prompt: Iterable[int] = (),
        grammar: RowGrammar | None = None,
    ) -> RowSampler:
        """Make a row for ``params``, seeding its generator from ``params.seed`` or from the OS when it is None."""
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=device)
        # Generators take unsigned 64-bit seeds; map negative user seeds instead of rejecting them.
        generator.manual_seed(seed % (1 << 64))
        seen = set(prompt) if params.repetition_penalty != 1.0 else set()
        return cls(params=params, generator=generator, grammar=grammar, seen=seen)

    @property
    def processed(self) -> bool:
        """Whether this row's logits are edited before selection (penalties, bias, grammar)."""
        p = self.params
        return bool(
            self.grammar is not None
            or p.logit_bias
            or (self.counts and (p.presence_penalty or p.frequency_penalty))
            or (self.seen and p.repetition_penalty != 1.0)
        )

    def accept(self, token: int) -> None:
        """Record the chosen ``token``: penalty state, and the grammar's state (which must allow it)."""
        p = self.params
        if p.presence_penalty or p.frequency_penalty:
            self.counts[token] += 1
        if p.repetition_penalty != 1.0:
            self.seen.add(token)
        if self.grammar is not None:
            self.grammar.consume(token)


class Sampler:
    """Chooses the next token of every row of a batch.

    Args:
        vocab_limit: Number of ids the tokenizer can decode; logits at or beyond it are never chosen (models
            often pad their embedding matrix past the tokenizer's length).
    """

    def __init__(
        self,
        vocab_limit: int,
        apply_masks: Callable[[torch.Tensor, Sequence[RowGrammar | None]], None] | None = None,
    ) -> None:
        self.vocab_limit = vocab_limit
        self._apply_masks = apply_masks

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int | RowError]:
        """Pick one token per row.

        Args:
            logits: ``[batch, vocab]`` scores of the next token, any float dtype. Not modified: rows with
                penalties, bias or a grammar are edited in a copy.
            rows: One :class:`RowSampler` per batch row, in the same order.

        Returns:
            The chosen token id of each row, or the :class:`RowError` that row failed with.
        """
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} samplers")
        logits = logits[:, : self.vocab_limit]
        failed: dict[int, RowError] = {}
        # The model's own scores: NaN or +inf (a numerically broken forward for that row) can be neither sampled nor
        # reported as logprobs. amax propagates NaN, so one reduction finds both, and rows with nothing finite.
        for i in _unusable(logits):
            failed[i] = RowError("the model produced unusable scores (NaN or infinite) for this request")
        processed = [i for i, row in enumerate(rows) if row.processed and i not in failed]
        if processed:
            logits = self._process(logits, rows, failed)
            for i in _unusable(logits):
                if i in processed and i not in failed:
                    failed[i] = RowError(
                        "no token can be chosen: the output constraint, logit_bias and penalties left no finite score"
                    )
        # One argmax serves every greedy row (exact in any dtype, so no float copy); .tolist() is the only sync.
        chosen: list[int | RowError] = list(logits.argmax(dim=-1).tolist())
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy and i not in failed]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            picks = sample_rows(logits.index_select(0, index).float(), [rows[i] for i in sampled])
            for i, token in zip(sampled, picks, strict=True):
                if token is None:
                    failed[i] = RowError("sampling found no probability mass (the scaled scores overflowed)")
                else:
                    chosen[i] = token
        for i, error in failed.items():
            chosen[i] = error
        return chosen

    def _process(
        self, logits: torch.Tensor, rows: Sequence[RowSampler], failed: dict[int, RowError] | None = None
    ) -> torch.Tensor:
        """A float copy of ``logits`` with each row's penalties, then its bias, then its grammar mask applied.

        The grammar mask comes last so that no bias or penalty can make a forbidden token possible again. A row whose
        edit raises is recorded in ``failed`` (and left out of the masks); the others are edited as usual.
        """
        failed = {} if failed is None else failed
        out = logits.float()  # a copy for half dtypes; a float32 input is cloned below
        if out.data_ptr() == logits.data_ptr():
            out = out.clone()
        for i, row in enumerate(rows):
            if i in failed or not row.processed:
                continue
            try:
                self._edit(out, i, row)
            except Exception as exc:
                failed[i] = RowError(f"logit processing failed: {type(exc).__name__}: {exc}")
        grammars = [None if i in failed else row.grammar for i, row in enumerate(rows)]
        if any(g is not None for g in grammars):
            if self._apply_masks is None:
                raise RuntimeError("a constrained row reached a sampler without grammar masks")
            try:
                self._apply_masks(out, grammars)
            except Exception:
                # Find the row(s) whose mask cannot be computed; masking a row again is harmless (idempotent).
                for i, grammar in enumerate(grammars):
                    if grammar is None:
                        continue
                    try:
                        self._apply_masks(out[i : i + 1], [grammar])
                    except Exception as exc:
                        failed[i] = RowError(f"the output constraint failed: {type(exc).__name__}: {exc}")
        return out

    @staticmethod
    def _edit(out: torch.Tensor, i: int, row: RowSampler) -> None:
        """Apply row ``i``'s repetition, presence and frequency penalties and its logit bias to ``out[i]``."""
        p, device = row.params, out.device
        if row.seen and p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(row.seen), device=device)
            ids = ids[ids < out.shape[1]]
            vals = out[i, ids]
            out[i, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if row.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(row.counts), device=device)
            counts = torch.tensor(list(row.counts.values()), dtype=out.dtype, device=device)
            keep = ids < out.shape[1]
            out[i, ids[keep]] -= counts[keep] * p.frequency_penalty + p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=device)
            bias = torch.tensor([b for _, b in p.logit_bias], dtype=out.dtype, device=device)
            keep = ids < out.shape[1]
            out[i, ids[keep]] += bias[keep]

    @torch.no_grad()
    def logprobs(
        self, logits: torch.Tensor, rows: Sequence[RowSampler], chosen: Sequence[int | RowError]
    ) -> list[TokenLogprob | None]:
        """The model's log probability of each row's ``chosen`` token and its top alternatives.

        Only rows whose params ask for logprobs (and that got a token) get an entry; the others get ``None``. The
        distribution is the raw model's (``logits`` before temperature, penalties, bias and masks), as OpenAI
        reports it.
        """
        want = [i for i, row in enumerate(rows) if row.params.logprobs is not None and isinstance(chosen[i], int)]
        out: list[TokenLogprob | None] = [None] * len(rows)
        if not want:
            return out
        index = torch.tensor(want, device=logits.device)
        scores = logits[:, : self.vocab_limit].index_select(0, index)
        targets = [t for t in (chosen[i] for i in want) if isinstance(t, int)]
        counts = [rows[i].params.logprobs or 0 for i in want]
        for i, entry in zip(want, token_logprobs(scores, targets, counts), strict=True):
            out[i] = entry
        return out


def token_logprobs(scores: torch.Tensor, targets: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Log-softmax of ``scores`` (``[n, vocab]``) read at each row's target id, with each row's ``top[i]`` best."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    target = torch.tensor(list(targets), device=scores.device).unsqueeze(1)
    picked = logp.gather(1, target).squeeze(1).tolist()
    width = max(top, default=0)
    best_vals: list[list[float]] = []
    best_ids: list[list[int]] = []
    if width:
        values, ids = torch.topk(logp, min(width, logp.shape[1]))
        best_vals, best_ids = values.tolist(), ids.tolist()
    entries = []
    for i, (token, lp, k) in enumerate(zip(targets, picked, top, strict=True)):
        alternatives = tuple(zip(best_ids[i][:k], best_vals[i][:k], strict=True)) if k else ()
        entries.append(TokenLogprob(token_id=token, logprob=lp, top=alternatives))
    return entries


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


def _unusable(logits: torch.Tensor) -> list[int]:
    """Rows of ``logits`` with a NaN or +inf score, or no finite score at all."""
    finite: list[bool] = torch.isfinite(logits.amax(dim=-1)).tolist()
    return [i for i, ok in enumerate(finite) if not ok]


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
