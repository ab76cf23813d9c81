"""Per-row token sampling over a batch of logits.

Every row of a batch carries its own parameters and its own ``torch.Generator``, so requests batched together
never share randomness and a seeded request is reproducible whatever runs beside it. The global torch RNG is
never used.

One call handles the whole batch: greedy rows share one ``argmax``; sampled rows are filtered together
(temperature, top-k, top-p, min-p as per-row tensors) and drawn by inverse CDF from one uniform number per row,
taken from that row's generator (:mod:`server.engine.draw`). Penalties, logit bias and grammar masks are edits
of a row's logits before selection (state on :class:`RowSampler`); logprobs read the raw scores.

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
from server.engine.draw import sample_rows

if TYPE_CHECKING:
    from server.engine.grammar import RowGrammar


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


def _unusable(logits: torch.Tensor) -> list[int]:
    """Rows of ``logits`` with a NaN or +inf score, or no finite score at all."""
    finite: list[bool] = torch.isfinite(logits.amax(dim=-1)).tolist()
    return [i for i, ok in enumerate(finite) if not ok]
