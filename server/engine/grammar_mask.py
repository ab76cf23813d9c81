"""Grammar masks on a batch of logits (the torch side of :mod:`server.engine.grammar`).

llguidance writes one bit per token into an int32 bitmask on the CPU (its Rust code, several rows in parallel,
without the GIL); the bits are unpacked on the logits' device with plain tensor ops. llguidance's own
``apply_token_bitmask_inplace`` is a ``torch.compile`` kernel, which on CPU needs a C++ toolchain and seconds of
warm-up, so it is not used.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import llguidance
import llguidance.torch
import torch

from server.engine.grammar import RowGrammar

_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _get_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return shifts


def forbidden_tokens(rows: Sequence[RowGrammar], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[len(rows), vocab_size]`` booleans on ``device``: True where a row's grammar forbids the token next."""
    vocab = rows[0].vocab_size
    if any(row.vocab_size != vocab for row in rows):
        raise ValueError("rows of one batch must share a vocabulary")
    bitmask = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    if len(rows) == 1:
        llguidance.torch.fill_next_token_bitmask(rows[0].matcher, bitmask, 0)
    else:
        llguidance.torch.fill_next_token_bitmask_par(
            _get_executor(), [(row.matcher, i) for i, row in enumerate(rows)], bitmask
        )
    device = torch.device(device)
    # Bit j of word w is token 32w + j; on little-endian machines (all torch targets) that is bit j % 8 of byte
    # 4w + j // 8. Unpacking bytes keeps the temporaries at one byte per token (int32 words would need four), and
    # inverting while still packed saves a pass over the unpacked mask.
    packed = (~bitmask).to(device, non_blocking=True).view(torch.uint8)
    bits = (packed.unsqueeze(-1) >> _shifts(device)) & 1
    return bits.view(torch.bool).view(len(rows), -1)[:, :vocab]


def apply_masks(logits: torch.Tensor, rows: Sequence[RowGrammar | None]) -> None:
    """Set to ``-inf``, in place, every logit a row's grammar forbids; rows whose grammar is None are untouched.

    Args:
        logits: ``[len(rows), width]`` float scores on any device. ``width`` normally equals the grammars'
            ``vocab_size``; ids at or beyond it (a padded embedding matrix) are forbidden for constrained rows.
        rows: Each row's grammar state, or None for an unconstrained row.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
    index = [i for i, row in enumerate(rows) if row is not None]
    if not index:
        return
    forbidden = forbidden_tokens([row for row in rows if row is not None], logits.device)
    vocab = min(forbidden.shape[1], logits.shape[1])
    forbidden = forbidden[:, :vocab]
    if len(index) == len(rows):
        logits[:, :vocab].masked_fill_(forbidden, float("-inf"))
        logits[:, vocab:] = float("-inf")
        return
    for k, i in enumerate(index):  # one pass per constrained row; no gather/scatter copies of the batch
        logits[i, :vocab].masked_fill_(forbidden[k], float("-inf"))
        logits[i, vocab:] = float("-inf")
