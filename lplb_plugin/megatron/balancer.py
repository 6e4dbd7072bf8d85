"""One MoE layer's physical choice: logical top-k ids -> physical slot ids.

Framework-agnostic glue between a Megatron MoE layer and the core :class:`Planner`
(count -> EP all-reduce -> solve -> redirect), plus the two pieces of state a training
layer needs: a FIFO replay cache (MoE activation recompute re-runs the router in the
backward pass; it must get the same physical choice, and must not issue a second
all-reduce) and the balance statistics for logging.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..layout import ExpertPlacement
from ..planner import Planner

__all__ = ["LayerBalancer", "BalanceStats"]


@dataclass
class BalanceStats:
    """Balance statistics accumulated since the last :meth:`LayerBalancer.pop_stats`.

    Attributes:
        batches: planned micro-batches.
        before_max_over_mean: sum over batches of max/mean rank load when every token
            goes to its expert's home copy (what the layer would see without the split).
        after_max_over_mean: sum over batches of the planned max/mean rank load.
        optimal: batches whose split the solver proved optimal (others used the
            fallback split).
        solve_seconds: total solve time.
    """

    batches: int = 0
    before_max_over_mean: float = 0.0
    after_max_over_mean: float = 0.0
    optimal: int = 0
    solve_seconds: float = 0.0

    def means(self) -> dict[str, float]:
        """Per-batch averages: ``{"before": ..., "after": ..., "optimal_fraction": ...,
        "solve_ms": ...}`` (empty dict when no batch was planned)."""
        if self.batches == 0:
            return {}
        n = self.batches
        return {
            "before": self.before_max_over_mean / n,
            "after": self.after_max_over_mean / n,
            "optimal_fraction": self.optimal / n,
            "solve_ms": 1e3 * self.solve_seconds / n,
        }


@dataclass
class LayerBalancer:
    """Physical choice of one layer.

    Attributes:
        planner: the layer's :class:`Planner` (its ``group`` is the EP group).
        stats: accumulated :class:`BalanceStats`.
    """

    planner: Planner
    stats: BalanceStats = field(default_factory=BalanceStats)
    _replay: deque = field(default_factory=deque)

    @property
    def placement(self) -> ExpertPlacement:
        return self.planner.placement

    def choose(self, logical_idx: torch.Tensor, mode: str = "plan") -> torch.Tensor:
        """Physical slot ids for this rank's tokens.

        Args:
            logical_idx: int64 ``[T, k]`` logical expert ids (no ``-1``: dropless).
            mode: ``"plan"`` (plan and return), ``"record"`` (plan, return, and queue
                the result for one later ``"replay"``) or ``"replay"`` (return the
                oldest queued result; micro-batches are recomputed in forward order).

        Returns:
            int64 ``[T, k]`` physical ids; each token goes to a copy of its own
            logical expert.
        """
        if mode == "replay":
            if not self._replay:
                raise RuntimeError(
                    "LPLB: the MoE layer is recomputing a micro-batch whose physical choice was not "
                    "recorded (the recompute forward must follow a no-grad checkpointed forward)"
                )
            phys = self._replay.popleft()
            if phys.shape != logical_idx.shape:
                raise RuntimeError(
                    f"LPLB: recomputed routing has shape {tuple(logical_idx.shape)}, the recorded "
                    f"choice {tuple(phys.shape)}; micro-batches were recomputed out of order"
                )
            return phys
        counts, _ = self.planner.count_workload(logical_idx, 1)
        global_counts = self.planner.global_counts(counts)
        plan = self.planner.plan(global_counts, device=logical_idx.device)
        phys = self.planner.redirect(logical_idx, plan)
        self._record_stats(plan)
        if mode == "record":
            self._replay.append(phys)
        return phys

    def _record_stats(self, plan) -> None:
        placement = self.placement
        home_rank = placement.slot_rank[placement.log2phy[:, 0]]
        before = torch.zeros(placement.n_ranks, dtype=torch.float64)
        before.index_add_(0, home_rank, plan.counts.to(torch.float64))
        mean = float(before.mean())
        s = self.stats
        s.batches += 1
        s.before_max_over_mean += float(before.max()) / mean if mean > 0 else 1.0
        s.after_max_over_mean += plan.max_over_mean
        s.optimal += int(bool(plan.optimal))
        s.solve_seconds += plan.solve_seconds

    def pop_stats(self) -> BalanceStats:
        """Return the accumulated statistics and start a new window."""
        stats, self.stats = self.stats, BalanceStats()
        return stats
