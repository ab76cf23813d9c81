"""A request's failure stays that request's: a row whose logits, processing or grammar fail ends alone.

The sampler tests use hand-made logits; the engine tests break one row of a real batch on the tiny model (through
a sampler subclass that marks the row by its seed) and check that its neighbour's tokens equal the neighbour's solo
run, that the broken request gets an :class:`EngineError`, and that the engine's failed-step counter never moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from server.engine.base import GREEDY_BELOW, Constraint, EngineError, EngineRequest, SamplingParams
from server.engine.draw import _inverse_cdf
from server.engine.grammar_mask import forbidden_tokens
from server.engine.hf import HFEngine
from server.engine.sampling import RowError, RowSampler, Sampler
from server.engine.scheduler import MAX_FAILED_STEPS, Scheduler

pytestmark = pytest.mark.slow

MARK = 666  # the seed that marks the row a test breaks
PROMPT = [5, 17, 230, 41, 9, 88, 301]
NEIGHBOUR = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


# -- the sampler alone ------------------------------------------------------------------------------------------


def row(**params: Any) -> RowSampler:
    return RowSampler.create(SamplingParams(max_tokens=4, seed=params.pop("seed", 0), **params))


def test_tiny_temperatures_are_greedy() -> None:
    assert GREEDY_BELOW == 1e-5
    for t in (0.0, 1e-40, 1e-300, 5e-324, 1e-6, 9.99e-6):
        assert SamplingParams(max_tokens=1, temperature=t).greedy, t
    for t in (1e-5, 0.1, 2.0):
        assert not SamplingParams(max_tokens=1, temperature=t).greedy, t
    # A tiny temperature over logits with a masked (-inf) tail picks the top allowed token, never a masked one.
    logits = torch.full((1, 50), float("-inf"))
    logits[0, 10:13] = torch.tensor([1.0, 3.0, 2.0])
    for t in (1e-40, 1e-6, 1e-5):
        assert Sampler(50).sample(logits, [row(temperature=t)]) == [11]


def test_unusable_rows_fail_alone_and_the_others_sample_as_if_alone() -> None:
    base = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    logits = base.clone()
    logits[0, 7] = float("nan")  # the model's NaN
    logits[1, 3] = float("inf")  # the model's +inf
    logits[2, :] = float("-inf")  # nothing finite at all
    logits[3, 0] = 3e38  # finite, but divided by a small temperature it overflows: no usable distribution
    rows = [row(), row(temperature=0.0), row(), row(temperature=1e-5, seed=4), row(temperature=0.8, seed=9)]
    picks = Sampler(40).sample(logits, rows)
    assert all(isinstance(p, RowError) for p in picks[:4]), picks
    assert "unusable scores" in str(picks[0]) and "no probability mass" in str(picks[3])
    alone = Sampler(40).sample(base[4:], [row(temperature=0.8, seed=9)])
    assert picks[4] == alone[0]
    # logprobs are computed only for rows that got a token.
    want = [row(logprobs=2), row(logprobs=2)]
    out = Sampler(40).logprobs(base[:2], want, [RowError("x"), 5])
    assert out[0] is None and out[1] is not None and out[1].token_id == 5


class Marker:
    """Stands in for a row's grammar: the injected mask function below decides what it does."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


def marker_masks(logits: torch.Tensor, grammars: Sequence[Any]) -> None:
    if any(g is not None and g.kind == "raise" for g in grammars):
        raise RuntimeError("mask computation failed")
    for i, g in enumerate(grammars):
        if g is not None and g.kind == "nothing":
            logits[i] = float("-inf")  # a grammar that allows no token
        elif g is not None:
            logits[i, 20:] = float("-inf")


class RaisingEdit(Sampler):
    """A sampler whose penalty/bias step raises for the row seeded ``MARK``, like any bug in one row's processing."""

    def _edit(self, out: torch.Tensor, i: int, row: RowSampler) -> None:  # type: ignore[override]
        if row.params.seed == MARK:
            raise ValueError("injected processing failure")
        Sampler._edit(out, i, row)


def test_processing_that_raises_or_allows_nothing_fails_only_that_row() -> None:
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(5))
    sampler = RaisingEdit(40, apply_masks=marker_masks)
    rows = [
        RowSampler.create(SamplingParams(max_tokens=4, temperature=0.0), grammar=Marker("raise")),  # type: ignore[arg-type]
        RowSampler.create(SamplingParams(max_tokens=4, temperature=0.7, seed=1), grammar=Marker("nothing")),  # type: ignore[arg-type]
        RowSampler.create(SamplingParams(max_tokens=4, temperature=0.0), grammar=Marker("ok")),  # type: ignore[arg-type]
        row(temperature=0.0, seed=MARK, logit_bias=((1, 2.0),)),
        row(temperature=0.9, seed=2, logit_bias=((3, 100.0),)),
    ]
    picks = sampler.sample(logits, rows)
    assert isinstance(picks[0], RowError) and "output constraint failed" in str(picks[0])
    assert isinstance(picks[1], RowError) and "no token can be chosen" in str(picks[1])
    assert isinstance(picks[3], RowError) and "injected processing failure" in str(picks[3])
    assert picks[2] == int(logits[2, :20].argmax())
    assert picks[4] == 3  # its +100 bias applied as usual


def test_the_draw_never_lands_on_a_zero_weight_token() -> None:
    weights = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for u in (0.0, 0.5, 1.0 - 2**-24, 1.0):  # 1.0 exactly: what a generator must never give, but some devices do
        index = _inverse_cdf(weights, torch.full((3,), u)).tolist()
        assert index == [1, 0, -1], (u, index)
    nan = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0]])
    assert _inverse_cdf(nan, torch.tensor([0.5, 0.5])).tolist() == [-1, -1]


# -- one broken row in a real batch -----------------------------------------------------------------------------


class Breaking(Sampler):
    """The engine's sampler, except that the row seeded ``MARK`` breaks in the way ``how`` says.

    It breaks only once it has shared ``after`` steps with another row, so the failure happens in a batch.
    """

    def __init__(self, base: Sampler, how: str, after: int = 1) -> None:
        super().__init__(base.vocab_limit, self._masks)
        self._base_masks = base._apply_masks
        self.how, self.after, self.shared, self.broke = how, after, 0, 0
        self.armed = False
        self._marked: set[int] = set()

    def _masks(self, logits: torch.Tensor, grammars: Sequence[Any]) -> None:
        assert self._base_masks is not None
        self._base_masks(logits, grammars)
        if self.how == "nothing":
            for i, g in enumerate(grammars):
                if id(g) in self._marked:
                    logits[i] = float("-inf")

    def sample(self, logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int | RowError]:
        marked = [i for i, r in enumerate(rows) if r.params.seed == MARK]
        self.armed = armed = bool(marked) and len(rows) > 1 and self.shared >= self.after
        if marked and len(rows) > 1:
            self.shared += 1
        self._marked = {id(rows[i].grammar) for i in marked} if armed else set()
        if not armed:
            return super().sample(logits, rows)
        self.broke += 1
        if self.how == "nan":
            logits = logits.clone()
            logits[marked, 7] = float("nan")
        elif self.how == "batch":
            raise RuntimeError("injected sampling failure that names no row")
        picks = super().sample(logits, rows)
        if self.how == "token":  # a token the row's grammar forbids, as a sampler bug would produce
            grammar = rows[marked[0]].grammar
            assert grammar is not None
            picks[marked[0]] = int(forbidden_tokens([grammar])[0].nonzero()[1])
        return picks

    def _edit(self, out: torch.Tensor, i: int, row: RowSampler) -> None:  # type: ignore[override]
        if self.how == "raise" and row.params.seed == MARK and self.armed:
            raise ValueError("injected processing failure")
        Sampler._edit(out, i, row)


@pytest.fixture(scope="module")
async def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HFEngine]:
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path_factory.mktemp("rf"))
    await eng.start()
    yield eng
    await eng.stop()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def sched(engine: HFEngine) -> Scheduler:
    assert engine._scheduler is not None
    return engine._scheduler


async def run(engine: HFEngine, request: EngineRequest) -> list[int]:
    ids: list[int] = []
    stream = engine.generate(request)
    try:
        async for delta in stream:
            ids += delta.token_ids
    finally:
        await stream.aclose()
    return ids


async def outcome(engine: HFEngine, request: EngineRequest) -> list[int] | EngineError:
    try:
        return await run(engine, request)
    except EngineError as exc:
        return exc


MARKED = {
    # how -> the marked row's parameters (processed or constrained where the failure needs it)
    "nan": SamplingParams(max_tokens=40, temperature=0.9, seed=MARK, ignore_eos=True),
    "raise": SamplingParams(max_tokens=40, temperature=0.0, seed=MARK, ignore_eos=True, logit_bias=((4, 1.0),)),
    "nothing": SamplingParams(max_tokens=40, temperature=0.0, seed=MARK, constraint=Constraint('{"type":"object"}')),
    "token": SamplingParams(max_tokens=40, temperature=0.9, seed=MARK, constraint=Constraint('{"type":"object"}')),
}


@pytest.mark.anyio
@pytest.mark.parametrize("how", list(MARKED))
async def test_a_broken_row_fails_alone_and_its_neighbour_is_untouched(engine: HFEngine, how: str) -> None:
    s = sched(engine)
    original = s._sampler
    solo = await run(engine, EngineRequest("solo", PROMPT, NEIGHBOUR))
    s._sampler = breaking = Breaking(original, how)
    try:
        neighbour, broken = await asyncio.gather(
            outcome(engine, EngineRequest("neighbour", PROMPT, NEIGHBOUR)),
            outcome(engine, EngineRequest("broken", PROMPT[:4], MARKED[how])),
        )
    finally:
        s._sampler = original
    assert breaking.broke >= 1, "the marked row never shared a step with its neighbour"
    assert isinstance(broken, EngineError), broken
    assert neighbour == solo
    assert s._failed_steps == 0 and engine.failure is None and engine.ready
    assert await run(engine, EngineRequest("after", PROMPT, NEIGHBOUR)) == solo
    with anyio.fail_after(5):
        while engine.num_running:  # noqa: ASYNC110 - the worker thread has no event to await
            await asyncio.sleep(0.005)


@pytest.mark.anyio
async def test_a_sampling_failure_naming_no_row_fails_its_batch_but_never_the_engine(engine: HFEngine) -> None:
    s = sched(engine)
    original = s._sampler
    solo = await run(engine, EngineRequest("solo", PROMPT, NEIGHBOUR))
    for attempt in range(MAX_FAILED_STEPS + 2):
        s._sampler = Breaking(original, "batch")
        try:
            results = await asyncio.gather(
                outcome(engine, EngineRequest(f"n{attempt}", PROMPT, NEIGHBOUR)),
                outcome(engine, EngineRequest(f"b{attempt}", PROMPT[:4], MARKED["nan"])),
            )
        finally:
            s._sampler = original
        assert all(isinstance(r, EngineError) for r in results), results
        assert s._failed_steps == 0 and engine.failure is None and engine.ready
    assert await run(engine, EngineRequest("after", PROMPT, NEIGHBOUR)) == solo
