"""Fixtures of the engine unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.engine.hf import HFEngine
from server.engine.scheduler import Scheduler


@pytest.fixture
async def chunked_engine(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[HFEngine]:
    """The tiny model on the HF engine (float32) with 32-token prefill chunks, so longer prompts take several steps.

    Without a prefix cache: its tests count the prompt tokens each prefill computes (the cache's own tests are in
    ``test_prefix_engine.py``).
    """
    eng = HFEngine(
        str(tiny_model_dir),
        served_model_name="tiny",
        data_dir=tmp_path,
        dtype="float32",
        prefill_chunk_tokens=32,
        prefix_cache_mb=0,
    )
    await eng.start()
    yield eng
    await eng.stop()


def sched(engine: HFEngine) -> Scheduler:
    """The engine's scheduler (started engines only)."""
    assert engine._scheduler is not None
    return engine._scheduler
