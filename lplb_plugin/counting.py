"""Count stage: tokens per logical expert, plus per-chunk prefix sums.

Torch reference of the CUDA ``count`` kernel.  Upstream LPLB splits the flattened
``topk_idx`` into one contiguous chunk per SM and returns the inclusive prefix sums of
the per-chunk histograms (``[n_sms, L]``); the same definition is kept here so both
paths return the same tensors.
"""

from __future__ import annotations

import torch

from .errors import LPLBInputError

__all__ = ["count_tokens", "check_topk_idx", "check_topk_idx_type"]


def check_topk_idx_type(idx: torch.Tensor, name: str = "idx") -> None:
    """Validate that router output is an int32/int64 tensor (no host sync)."""
    if not isinstance(idx, torch.Tensor):
        raise LPLBInputError(f"{name} must be a torch.Tensor of expert ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise LPLBInputError(f"{name} must be int32 or int64 logical expert ids, got dtype {idx.dtype}")


def check_topk_idx(idx: torch.Tensor, n_logical: int, name: str = "idx") -> None:
    """Validate router output: an integer tensor with values in ``[-1, n_logical)``.

    One host sync (reads min/max); the CUDA path of ``Planner.run`` instead counts
    out-of-range ids in its count kernel and reports them one call later.
    """
    check_topk_idx_type(idx, name)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= n_logical:
            raise LPLBInputError(
                f"{name} values must lie in [-1, {n_logical}) (-1 = dropped), got range [{lo}, {hi}]"
            )


def count_tokens(idx: torch.Tensor, n_logical: int, n_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of ``idx`` over logical experts, skipping ``-1``.

    Args:
        idx: int32/int64 tensor of any shape, values in ``[-1, n_logical)``.
        n_logical: ``L``.
        n_chunks: contiguous chunks of the flattened ``idx`` (entry ``i`` of ``N``
            belongs to chunk ``i * n_chunks // N``).

    Returns:
        ``counts``: int32 ``[L]``; ``prefix``: int32 ``[n_chunks, L]``, inclusive prefix
        sums over chunks of the per-chunk histograms (``prefix[-1] == counts``).
        Both on ``idx``'s device; no host synchronisation (scatter-add, no bincount).
    """
    if n_chunks < 1:
        raise LPLBInputError(f"n_sms must be >= 1, got {n_chunks}")
    flat = idx.reshape(-1).to(torch.int64)
    n = flat.numel()
    # -1 lands in an extra bin L per chunk, dropped below
    e = torch.where(flat < 0, torch.full_like(flat, n_logical), flat)
    chunk = torch.arange(n, device=idx.device) * n_chunks // max(n, 1)
    hist = torch.zeros(n_chunks * (n_logical + 1), dtype=torch.int32, device=idx.device)
    hist.scatter_add_(0, chunk * (n_logical + 1) + e, torch.ones_like(e, dtype=torch.int32))
    prefix = torch.cumsum(hist.view(n_chunks, n_logical + 1)[:, :n_logical], dim=0, dtype=torch.int32)
    return prefix[-1].clone(), prefix
