"""The step loop of the Transformers engine: admission, chunked prefill, one batched decode step, emission.

One worker thread owns the model and runs :meth:`Scheduler.run`. Each step it

1. drops rows whose consumer went away (``aborted``), so a closed stream frees its row within one step;
2. runs at most one prefill forward of at most ``prefill_chunk_tokens`` padded prompt tokens: either the next chunk
   of a long prompt, or a group of whole short prompts taken from the head of the FIFO queue. A finished prefill
   samples each row's first token and merges the rows into the running batch. The ``n`` samples of one prompt
   (submitted together, see :meth:`Scheduler.submit`) are prefilled once, as one prompt row, and forked into one
   batch row each when it merges (their caches are copies); each keeps its own sampler and seed, so its tokens are
   those it would get alone. As many forks as the batch bounds allow share one prefill; the rest wait for the next;
3. runs one decode forward over every running row, samples one token per row, emits it, and drops finished rows.

So a running stream waits at most one prefill chunk plus one decode step between tokens.

Failures stay where they belong:

- A row whose own work fails is finished with an :class:`EngineError` alone and leaves the batch; every other row
  goes on untouched. That covers a request the engine cannot prepare, a row whose logits are unusable (NaN or
  infinite scores), whose penalties, bias or grammar mask raise or leave no token to choose, and a row whose
  grammar rejects the token it was given (see :mod:`server.engine.sampling`).
- An exception in sampling or bookkeeping that cannot be pinned on one row fails the rows it touched (a prefill's
  requests, or the running batch) but is not held against the engine: the model itself worked.
- Only a failed model forward pass (a prefill chunk or a decode step) counts as the engine failing. It fails the
  rows of that forward (their cache is gone). The worker gives up when ``MAX_FAILED_STEPS`` steps in a row had a
  failed forward pass and none succeeded in between (the model or the device is broken, not one request), or when
  something escapes the step loop and would end the thread. It then records :attr:`Scheduler.failure`, fails every
  queued and running request with :class:`EngineError` and stops; the engine reports itself not ready from then on
  (readiness 503, new requests 503) until the process is restarted.

KV budget (``max_batch_tokens``): the running batch's padded footprint, ``rows x width`` of its left-padded cache,
stays within the budget. A request is admitted only if the batch it joins fits, ``_ADMIT_HEADROOM`` steps of growth
included; when growth would still overflow it, the newest rows are preempted: their cache is dropped and they wait
at the front of the queue to be prefilled again from prompt + generated tokens (vLLM's recompute preemption; a
preempted fork is prefilled again alone). A single row always runs, even past the budget, so any request that fits
the context can finish. Every fork counts as a row.

Prefix caching (:mod:`server.engine.reuse`): a request is looked up when it reaches the head of the queue and its
prefill starts after its longest cached prefix; rows of one prefill may skip different lengths (padding then sits
between a row's cached part and the rest, hidden by the mask). Each request's first delta says how many of its
prompt tokens were skipped. Prompts, preempted rows and finished rows are kept for later requests.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from server.engine.base import Constraint, EngineError, EngineOverloaded, TokenLogprob
from server.engine.batch import PaddedBatch, PrefillJob
from server.engine.hf_tokenizer import HFTokenizer
from server.engine.pending import Pending
from server.engine.prefix_cache import Hit, PrefixCache
from server.engine.reuse import Reuse
from server.engine.sampling import RowError, Sampler

logger = logging.getLogger("server.engine")

# Admission leaves room for this many decode steps of growth, so a full batch does not preempt on the next step.
_ADMIT_HEADROOM = 16
# A group prefill may widen the batch by this many columns of padding between rows' cached prefixes and the rest.
_HOLE_SLACK = 64
MAX_FAILED_STEPS = 3
"""Consecutive steps with a failed forward pass after which the engine is marked failed (see the module docstring)."""


class ForwardFailed(Exception):
    """A model forward pass raised (its exception is ``__cause__``): the only failure held against the engine."""


class Scheduler:
    """Queue, admission and step loop over one model; only :meth:`run`'s thread touches the model and the batch.

    Args:
        model: A loaded causal LM.
        tokenizer: Returns the current tokenizer (read once per request, for EOS ids and detokenization).
        sampler: Picks every row's next token.
        device: Where the model runs.
        max_model_len: Context length (prompt + output).
        max_queue_size: Requests allowed to wait; more raise :class:`EngineOverloaded` in :meth:`submit`.
        max_batch_size: Most rows decoding together (1 for models whose cache cannot be merged).
        max_batch_tokens: KV budget of the running batch in padded token slots (see the module docstring).
        prefill_chunk_tokens: Most padded prompt tokens prefilled per step.
        prefix_cache: Where prompt prefixes' KV is kept for reuse (``None``: every prompt is prefilled whole).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[], HFTokenizer],
        sampler: Sampler,
        *,
        device: torch.device,
        max_model_len: int,
        max_queue_size: int,
        max_batch_size: int,
        max_batch_tokens: int,
        prefill_chunk_tokens: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self._model, self._tokenizer, self._sampler, self._device = model, tokenizer, sampler, device
        self._max_model_len, self._max_queue_size = max_model_len, max_queue_size
        self._max_rows, self._max_tokens, self._chunk = max_batch_size, max_batch_tokens, prefill_chunk_tokens
        self._cv = threading.Condition()
        self._waiting: deque[Pending] = deque()  # new requests, FIFO; the event loop appends and removes
        self._requeued: deque[Pending] = deque()  # preempted rows, oldest first; served before new requests
        self._batch = PaddedBatch.empty(device)
        self._rows: list[Pending] = []  # one per batch row, in row order
        self._job: PrefillJob | None = None
        self._job_rows: list[Pending] = []
        self._job_fanout: list[int] = []  # the job's prompt row of each of _job_rows (forks share one)
        self._admitted = 0
        self._stopping = False
        self._failed_steps = 0  # consecutive steps whose prefill or decode forward pass raised
        self._forward_ok = False  # a forward pass of the current step succeeded
        self.failure: str | None = None
        """Why the worker gave up (set once, by the worker); ``None`` while it serves."""
        self._compilers: dict[int, Any] = {}  # grammar compilers by tokenizer identity (built on first use)
        self._reuse = Reuse(prefix_cache)
        self.kv_tokens = 0  # KV slots the running batch and the prefill in progress hold (for the usage gauge)
        # Observed maxima and counters, for tests and benchmarks.
        self.peak_rows = 0
        self.peak_footprint = 0
        self.preemptions = 0
        self.steps = 0
        self.prefilled_tokens = 0  # prompt (and recomputed) tokens fed to prefill forwards, padding excluded

    # -- any thread ---------------------------------------------------------------------------------------------
    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (``None``: off); its counters may be read from any thread."""
        return self._reuse.cache

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._requeued)

    @property
    def num_running(self) -> int:
        return len(self._rows) + len(self._job_rows)

    def submit(self, pendings: Sequence[Pending]) -> None:
        """Queue ``pendings`` together (FIFO), or none of them; raise :class:`EngineOverloaded` when they do not fit.

        Requests that share a ``group`` (the samples of one prompt) stay adjacent in the queue, so a prefill can take
        them together and fork its prompt row.
        """
        with self._cv:
            if self.failure is not None:
                raise EngineOverloaded(f"the engine failed: {self.failure}")
            if self._stopping:
                raise EngineOverloaded("the engine is not running")
            if len(pendings) > self._max_queue_size:
                raise EngineOverloaded(f"{len(pendings)} samples do not fit the request queue ({self._max_queue_size})")
            if len(self._waiting) + len(pendings) > self._max_queue_size:
                raise EngineOverloaded(f"the request queue is full ({self._max_queue_size} waiting)")
            self._waiting.extend(pendings)
            self._cv.notify()

    def abort(self, pending: Pending) -> None:
        """A queued request leaves at once; a running one is dropped at the start of the worker's next step."""
        pending.aborted = True
        with self._cv:
            if pending in self._waiting:
                self._waiting.remove(pending)

    def shutdown(self) -> list[Pending]:
        """Make :meth:`run` fail its rows and return; return the queued requests (the caller fails them)."""
        with self._cv:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        return dropped

    # -- the worker thread --------------------------------------------------------------------------------------
    def run(self) -> None:
        """Step until :meth:`shutdown`, then fail whatever is still admitted with :class:`EngineOverloaded`.

        Never raises: whatever would end the thread marks the engine failed and fails every request first, so no
        consumer waits forever on a worker that is gone.
        """
        try:
            self._loop()
        except BaseException as exc:  # the thread is ending for a reason nobody handled
            logger.critical("the engine worker stopped", exc_info=exc)
            self._give_up(f"the engine worker stopped: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        # inference_mode is thread-local, so it is entered here, in the thread that runs the model.
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._waiting or self._requeued or self._rows or self._job) and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception as exc:  # a bug, not a model failure: fail what is admitted, keep serving
                    logger.exception("engine step failed")
                    self._fail(self._rows + self._job_rows + list(self._requeued), _failure(exc))
                    self._reset_batch()
                    self._drop_job()
                    self._requeued.clear()
        self._fail(self._rows + self._job_rows + list(self._requeued), EngineOverloaded("the engine is shutting down"))
        self._reset_batch()
        self._drop_job()
        self._requeued.clear()

    def _step(self) -> None:
        self.steps += 1
        self._drop_aborted()
        forward_error: Exception | None = None
        self._forward_ok = False
        try:
            if self._job is not None or self._start_job():
                self._prefill()
        except Exception as exc:
            cause = _cause(exc)
            logger.error("prefill failed", exc_info=cause)
            self._fail(self._job_rows, _failure(cause))
            self._drop_job()
            if isinstance(exc, ForwardFailed):
                forward_error = cause
        if self._rows:
            try:
                self._decode()
            except Exception as exc:
                cause = _cause(exc)
                logger.error("decode step failed", exc_info=cause)
                self._fail(self._rows, _failure(cause))
                self._reset_batch()
                if isinstance(exc, ForwardFailed):
                    forward_error = cause
        if forward_error is not None:
            self._step_failed(forward_error)
        elif self._forward_ok:
            self._failed_steps = 0
        self.kv_tokens = self._batch.footprint + (0 if self._job is None else self._job.footprint)

    def _forward(self, run: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """Run one model forward pass; its exception becomes :class:`ForwardFailed` (the engine's own failure)."""
        try:
            logits = run()
        except Exception as exc:
            raise ForwardFailed(f"{type(exc).__name__}: {exc}") from exc
        self._forward_ok = True
        return logits

    def _step_failed(self, exc: Exception) -> None:
        """Count a step whose forward pass failed; give up after ``MAX_FAILED_STEPS`` in a row."""
        self._failed_steps += 1
        if self._failed_steps >= MAX_FAILED_STEPS:
            self._give_up(
                f"{self._failed_steps} engine steps in a row failed, the last with {type(exc).__name__}: {exc}"
            )

    def _give_up(self, reason: str) -> None:
        """Mark the engine failed, stop the loop and fail every queued and running request (worker thread)."""
        logger.critical("the engine failed and stops serving: %s", reason)
        with self._cv:
            self.failure = reason
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        self._fail(
            [*self._rows, *self._job_rows, *self._requeued, *waiting], EngineError(f"the engine failed: {reason}")
        )
        self._reset_batch()
        self._drop_job()
        self._requeued.clear()

    def _drop_aborted(self) -> None:
        self._requeued = deque(p for p in self._requeued if not p.aborted)
        if any(p.aborted for p in self._rows):
            self._keep([i for i, p in enumerate(self._rows) if not p.aborted])
        if self._job_rows and all(p.aborted for p in self._job_rows):
            self._drop_job()  # partial rows in a live job are dropped when it merges (at most one chunk later)

    def _start_job(self) -> bool:
        """Take queued requests (FIFO) that fit every bound into a new prefill job; forks of a prompt share its row."""
        taken: list[Pending] = []
        contexts: list[list[int]] = []  # one per prompt row of the job
        hits: list[Hit | None] = []  # the cached prefix of each prompt row
        fanout: list[int] = []  # the prompt row of each taken request
        with self._cv:
            while True:
                queue = self._requeued or self._waiting
                if not queue:
                    break
                head = queue[0]
                if head.aborted or (head.sampler is None and not self._prepare_or_fail(head)):
                    queue.popleft()
                    continue
                fork = bool(taken) and head.forks(taken[-1])
                context = None if fork else head.context()
                hit = None if context is None else self._reuse.lookup(head, context)
                skip = 0 if hit is None else hit.length
                if not self._fits(contexts, hits, len(taken) + 1, context, skip):
                    break
                queue.popleft()
                if head.order < 0:  # its first admission: the prompt's cached tokens are reported with its usage
                    head.order, self._admitted = self._admitted, self._admitted + 1
                    head.cached_tokens = skip if context is not None else taken[-1].cached_tokens
                if head.stream is not None:
                    head.stream.mark_started()  # its queue time ends here (kept if it is preempted later)
                taken.append(head)
                if context is not None:
                    contexts.append(context)
                    hits.append(hit)
                fanout.append(len(contexts) - 1)
        if not taken:
            return False
        self._job_rows, self._job_fanout = taken, fanout  # first, so that a failure below still reaches them
        # Prompt logprobs are reported once: a preempted row being prefilled again does not ask twice. Forks share
        # their first request's (the samples of one prompt ask alike).
        firsts = [taken[fanout.index(r)] for r in range(len(contexts))]
        want = [None if p.prompt_reported else p.request.params.prompt_logprobs for p in firsts]
        self._job = PrefillJob(
            contexts,
            self._model.config,
            self._device,
            prompt_logprobs=want,
            vocab_limit=self._sampler.vocab_limit,
            cached=hits,
        )
        self._reuse.count(contexts, hits)
        return True

    def _fits(
        self,
        contexts: Sequence[Sequence[int]],
        hits: Sequence[Hit | None],
        requests: int,
        context: Sequence[int] | None,
        skip: int,
    ) -> bool:
        """Whether a job of ``requests`` requests fits: prompt rows ``contexts`` (their cached prefixes ``hits``)
        plus ``context`` with ``skip`` cached tokens (``context`` None: a fork of the last row)."""
        rows = len(self._rows) + requests
        if rows > self._max_rows:
            return False
        lengths = [len(c) for c in contexts] + ([] if context is None else [len(context)])
        skips = [0 if h is None else h.length for h in hits] + ([] if context is None else [skip])
        rest = max(n - k for n, k in zip(lengths, skips, strict=True))  # columns to feed
        width = max(skips) + rest
        if len(lengths) > 1 and (len(lengths) * rest > self._chunk or width - max(lengths) > _HOLE_SLACK):
            return False  # only a lone prompt is chunked; a group prefills in one forward, without wide holes
        if not self._rows and requests == 1:
            return True  # a lone request always runs
        steps = -(-rest // self._chunk)  # until it merges, while the batch grows one column per step
        merged = max(self._batch.width + steps, width) + 1 + _ADMIT_HEADROOM
        return rows * merged <= self._max_tokens

    def _prepare_or_fail(self, pending: Pending) -> bool:
        """:meth:`Pending.prepare`, failing only this request if preparing it raises (not every step)."""
        try:
            return pending.prepare(self._tokenizer(), self._device, self._max_model_len, self._grammar)
        except Exception as exc:
            logger.exception("could not prepare request %s", pending.request.request_id)
            pending.emit(_failure(exc))
            return False

    def _grammar(self, tokenizer: HFTokenizer, constraint: Constraint) -> Any:
        """A fresh grammar state for one row; the compiler for ``tokenizer`` is built once, on first use."""
        from server.engine.grammar import GrammarCompiler

        compiler = self._compilers.get(id(tokenizer))
        if compiler is None:
            compiler = GrammarCompiler(tokenizer.hf, tokenizer.vocab_size, tokenizer.eos_token_ids)
            self._compilers = {id(tokenizer): compiler}  # the tokenizer only changes in tests
        return compiler.matcher(constraint)

    def _prefill(self) -> None:
        job = self._job
        assert job is not None
        fed = job.fed
        logits = self._forward(lambda: job.step(self._model, self._chunk))
        self.prefilled_tokens += job.fed - fed
        if logits is None:
            return
        rows, fanout = self._job_rows, self._job_fanout
        if len(rows) != job.rows:  # forks: one copy of their prompt row's logits each
            logits = logits.index_select(0, torch.tensor(fanout, device=logits.device))
        picks, logprobs = self._sample(logits, rows)
        for row, r in zip(rows, fanout, strict=True):
            entries = job.prompt_entries[r]
            if entries is not None:
                row.prompt_logprobs, row.prompt_reported = list(entries), True
        keep = self._advance(rows, picks, logprobs)
        for r in range(job.rows):  # the prompts' KV, for requests that share a prefix (after the first tokens went out)
            first = rows[fanout.index(r)]
            self._reuse.keep(first.request.cache_scope, job.prompts[r], job.cache, job.mask, r)
        self._batch.extend(job.into_batch([fanout[i] for i in keep]))  # a forked prompt row is copied per fork
        self._rows += [rows[i] for i in keep]
        self._drop_job()

    def _decode(self) -> None:
        self._preempt()
        self.peak_rows = max(self.peak_rows, len(self._rows))
        self.peak_footprint = max(self.peak_footprint, self._batch.size * (self._batch.width + 1))
        tokens = [row.tokens[-1] for row in self._rows]
        logits = self._forward(lambda: self._batch.decode(self._model, tokens))
        assert logits is not None
        picks, logprobs = self._sample(logits, self._rows)
        keep = self._advance(self._rows, picks, logprobs)
        kept = set(keep)  # a finished row's prompt and answer: the next turn of its conversation starts with them
        self._reuse.keep_rows(self._batch, self._rows, [i for i in range(len(self._rows)) if i not in kept])
        self._keep(keep)

    def _advance(
        self, rows: Sequence[Pending], picks: Sequence[int | RowError], logprobs: Sequence[TokenLogprob | None]
    ) -> list[int]:
        """Hand each row its token; return the indexes of the rows that keep running.

        A row that got no token (a :class:`RowError`) or whose bookkeeping raises (its grammar rejects the token)
        is failed here, alone: it leaves with the finished rows and the others are untouched.
        """
        keep: list[int] = []
        for i, (row, pick) in enumerate(zip(rows, picks, strict=True)):
            try:
                if isinstance(pick, RowError):
                    raise pick
                if row.advance(pick, logprobs[i]):
                    keep.append(i)
            except Exception as exc:
                logger.warning("request %s failed alone: %s", row.request.request_id, exc)
                self._fail([row], exc if isinstance(exc, EngineError) else _failure(exc))
        return keep

    def _preempt(self) -> None:
        """Evict the newest rows until the next step's batch fits the KV budget (one row always stays)."""
        evicted: list[Pending] = []
        while len(self._rows) > 1 and self._batch.size * (self._batch.width + 1) > self._max_tokens:
            newest = max(range(len(self._rows)), key=lambda i: self._rows[i].order)
            self._reuse.keep_rows(self._batch, self._rows, [newest])  # its recomputation will find what it had
            evicted.append(self._rows[newest])
            self._keep([i for i in range(len(self._rows)) if i != newest])
        if evicted:
            self.preemptions += len(evicted)
            logger.info("KV budget: preempted %d row(s) to recompute later", len(evicted))
            self._requeued = deque(sorted([*self._requeued, *evicted], key=lambda p: p.order))

    def _sample(
        self, logits: torch.Tensor, rows: Sequence[Pending]
    ) -> tuple[list[int | RowError], list[TokenLogprob | None]]:
        samplers = [row.sampler for row in rows]
        assert all(s is not None for s in samplers)
        picks = self._sampler.sample(logits, samplers)  # type: ignore[arg-type]
        return picks, self._sampler.logprobs(logits, samplers, picks)  # type: ignore[arg-type]

    def _keep(self, keep: list[int]) -> None:
        self._batch.select(keep)
        self._rows = [self._rows[i] for i in keep]

    def _reset_batch(self) -> None:
        self._batch, self._rows = PaddedBatch.empty(self._device), []
        self.kv_tokens = 0

    def _drop_job(self) -> None:
        self._job, self._job_rows, self._job_fanout = None, [], []

    @staticmethod
    def _fail(rows: Sequence[Pending], exc: EngineError) -> None:
        for row in rows:
            if not row.aborted:
                row.emit(exc)


def _cause(exc: Exception) -> Exception:
    """The model's own exception behind a :class:`ForwardFailed`; any other exception as it is."""
    cause = exc.__cause__
    return cause if isinstance(exc, ForwardFailed) and isinstance(cause, Exception) else exc


def _failure(exc: Exception) -> EngineError:
    return EngineError(f"generation failed: {type(exc).__name__}: {exc}")
