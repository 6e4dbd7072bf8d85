"""Where a rank's per-logical-expert counts come from.

Each source returns this rank's int32 ``[L]`` counts for the current batch (send side:
the tokens this rank is about to dispatch); the reducer then sums them over the EP
group.  DeepEP's receive-side counters are different in kind (already summed over
senders, per physical local expert, cumulative): :class:`RecvStatsDelta` turns them
into per-step global logical loads, the right input for re-placing experts
(``Planner.update_redundancy_mapping``), not for the current batch's split.
"""

from __future__ import annotations

import torch

from ..counting import count_tokens
from ..errors import LPLBInputError

__all__ = ["RouterSource", "DeepEPLayoutSource", "RecvStatsDelta"]


class RouterSource:
    """Counts of the router's ``topk_idx`` (the Planner's count stage).

    Args:
        n_logical: ``L``.
    """

    name = "router"

    def __init__(self, n_logical: int) -> None:
        self.n_logical = n_logical

    def counts(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """int32 ``[L]`` on ``topk_idx``'s device (``-1`` skipped, no host sync)."""
        return count_tokens(topk_idx, self.n_logical, 1)[0]


class DeepEPLayoutSource:
    """DeepEP V1 ``Buffer.get_dispatch_layout(topk_idx, num_experts)``'s
    ``num_tokens_per_expert`` (int32, this rank's tokens, ``-1`` skipped).

    The layout is computed by DeepEP's own kernel, and a job that dispatches with
    DeepEP computes it anyway: ``counts_from_layout`` takes the tensor the caller
    already has, ``counts`` calls the buffer itself.

    Args:
        buffer: a ``deep_ep.Buffer``.
        n_logical: ``L``; DeepEP is asked for counts over the *logical* experts.
    """

    name = "deepep"

    def __init__(self, buffer, n_logical: int) -> None:
        if not callable(getattr(buffer, "get_dispatch_layout", None)):
            raise LPLBInputError(
                f"buffer must be a DeepEP V1 deep_ep.Buffer (with get_dispatch_layout), got {type(buffer).__name__}"
            )
        self.buffer = buffer
        self.n_logical = n_logical

    def counts(self, topk_idx: torch.Tensor) -> torch.Tensor:
        # DeepEP requires int64 topk_idx
        layout = self.buffer.get_dispatch_layout(topk_idx.to(torch.int64), self.n_logical)
        return self.counts_from_layout(layout[2])

    def counts_from_layout(self, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if num_tokens_per_expert.shape != (self.n_logical,):
            raise LPLBInputError(
                f"num_tokens_per_expert must have shape ({self.n_logical},), got {tuple(num_tokens_per_expert.shape)}"
            )
        return num_tokens_per_expert.to(torch.int32)


class RecvStatsDelta:
    """Per-step global logical loads from DeepEP's receive-side counters.

    ``cumulative_local_expert_recv_stats`` (V1 low-latency dispatch, V2
    ``ElasticBuffer.dispatch``, V2.5 ``EPBuffer.dispatch``) is a caller-owned int32
    ``[num_local]`` CUDA tensor that DeepEP keeps adding to: tokens received by each
    *physical* expert of this rank, already summed over the senders.  :meth:`step`
    takes the increase since the last call, all-gathers the slices of every rank
    (rank-major physical slots), and folds copies into their logical expert.

    Args:
        recv_stats: the counter tensor, int32 ``[P / ep_size]``.
        phy2log: int ``[P]`` placement.
        group: the EP process group (``None``: a single rank).
    """

    def __init__(self, recv_stats: torch.Tensor, phy2log: torch.Tensor, group=None) -> None:
        self.recv_stats = recv_stats
        self.phy2log = phy2log.to(torch.int64)
        self.group = group
        n_ranks = 1 if group is None else _world(group)
        if recv_stats.dim() != 1 or recv_stats.numel() * n_ranks != self.phy2log.numel():
            raise LPLBInputError(
                f"recv_stats must be 1-D with P / ep_size = {self.phy2log.numel() // max(n_ranks, 1)} entries, "
                f"got shape {tuple(recv_stats.shape)}"
            )
        self._last = recv_stats.detach().clone()

    def step(self) -> torch.Tensor:
        """int64 ``[L]``: global tokens per logical expert received since the last
        call (on the counter's device)."""
        now = self.recv_stats.detach().clone()
        delta = (now - self._last).to(torch.int64)
        self._last = now
        if self.group is not None and _world(self.group) > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(delta) for _ in range(_world(self.group))]
            dist.all_gather(parts, delta, group=self.group)
            delta = torch.cat(parts)
        n_logical = int(self.phy2log.max()) + 1
        return torch.zeros(n_logical, dtype=torch.int64, device=delta.device).index_add_(
            0, self.phy2log.to(delta.device), delta
        )


def _world(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)
