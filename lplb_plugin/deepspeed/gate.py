"""``LPLBTopKGate``: DeepSpeed's ``TopKGate`` with routes rewritten to physical experts.

The logical gating is DeepSpeed's own (``TopKGate.forward`` with its top-1 / top-2 /
top-k functions, aux loss, noise policies, RTS, ``used_token``); only the routes change
afterwards: the layer's :class:`~lplb_plugin.Planner` counts the tokens per logical
expert, sums the counts over the EP group, solves the split and rewrites every logical
expert id into a physical (replica) id.  Locations in the expert buffers and the
capacity are then recomputed for the ``P`` physical experts.  The gate weights, the aux
loss and the returned ``exp_counts`` stay logical (width ``L``).
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed import comm as dist
from deepspeed.comm import pg_utils
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from ..errors import LPLBInputError
from ..planner import Planner, SplitPlan
from ..redirect import sequence_numbers

__all__ = ["LPLBTopKGate", "GateStats"]


class GateStats:
    """Balance of the batches a gate routed since the last :meth:`reset`.

    All values are identical on every EP rank (they come from the global counts).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.max_over_mean = 0.0          # sum over batches, planned rank loads with LPLB
        self.max_over_mean_plain = 0.0    # sum, the plain layout (expert e on rank e // (L/ep))
        self.solve_seconds = 0.0          # sum
        self.not_optimal = 0              # batches whose solve fell back

    def add(self, plan: SplitPlan, plain_max_over_mean: float) -> None:
        self.batches += 1
        self.max_over_mean += plan.max_over_mean
        self.max_over_mean_plain += plain_max_over_mean
        self.solve_seconds += plan.solve_seconds
        self.not_optimal += 0 if plan.optimal else 1

    def means(self) -> dict[str, float]:
        """``{"max_over_mean", "max_over_mean_plain", "solve_ms", "fallbacks"}`` averaged
        over the recorded batches (empty dict when none)."""
        if self.batches == 0:
            return {}
        n = self.batches
        return {
            "max_over_mean": self.max_over_mean / n,
            "max_over_mean_plain": self.max_over_mean_plain / n,
            "solve_ms": 1000.0 * self.solve_seconds / n,
            "fallbacks": float(self.not_optimal),
        }


class LPLBTopKGate(TopKGate):
    """A ``TopKGate`` whose routes go to physical experts.

    Built by :class:`~lplb_plugin.deepspeed.LPLBMoE` from the layer's gate (same ``wg``,
    ``k``, noise and capacity settings); the planner is bound when DeepSpeed creates the
    EP group.  Requires dropless routing (``drop_tokens=False``).

    Attributes:
        num_physical_experts: ``P``.
        planner: the layer's :class:`Planner` (``None`` until bound).
        stats: :class:`GateStats` of the batches routed since the last metrics write.
    """

    planner: Optional[Planner]

    def _lplb_init(self, n_physical: int) -> None:
        self.num_physical_experts = n_physical
        self.planner = None
        self.stats = GateStats()

    def _bind_planner(self, planner: Planner) -> None:
        self.planner = planner

    def forward(self,
                input: torch.Tensor,
                used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = False,
                use_tutel: bool = False):
        """Same arguments as ``TopKGate.forward``.

        Args:
            input: ``[S, model_dim]`` tokens.
            used_token: optional ``[S]`` mask (top-1 only, as DeepSpeed).
            sparse_routes: ``True`` (what ``MOELayer.forward`` passes): return the sparse
                7-tuple ``(l_aux, capacity, P, indices [k, S] int32, locations [k, S]
                int32, gates [k, S] float32, exp_counts [L])``; ``False``: the dense
                4-tuple ``(l_aux, combine_weights [S, P, C] float32, dispatch_mask
                [S, P, C] bool, exp_counts [L])``.
            use_tutel: must be ``False``.

        ``indices`` are physical expert ids (``-1``: a route with no expert, e.g. a
        masked token); ``capacity`` is the largest number of routes any physical expert
        receives on any EP rank (all-reduced MAX), so no token is dropped.
        """
        if use_tutel:
            raise LPLBInputError("LPLBTopKGate: use_tutel=True is not supported (Tutel's dispatcher is not replica-aware)")
        if self.planner is None:
            raise LPLBInputError(
                "LPLBTopKGate has no planner yet: the layer runs only after its EP group exists "
                "(deepspeed.initialize / lplb_plugin.deepspeed.initialize, or "
                "MoE.set_deepspeed_parallelism())"
            )
        l_aux, _, _, log_idx, _, gates, exp_counts = super().forward(input, used_token, True, False)
        phys_idx, locations, capacity = self._route(log_idx)
        P = self.num_physical_experts
        if sparse_routes:
            return (l_aux, capacity, P, phys_idx.to(torch.int32), locations.to(torch.int32), gates, exp_counts)
        return (l_aux, *self._dense(phys_idx, locations, gates, int(capacity)), exp_counts)

    # ----------------------------------------------------------------- routing
    def _route(self, log_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        planner = self.planner
        idx = log_idx.to(torch.int64)
        counts, _ = planner.count_workload(idx, 1)
        global_counts = planner.global_counts(counts)
        plan = planner.plan(global_counts, device=idx.device)
        phys = planner.redirect(idx, plan)
        self.stats.add(plan, _plain_max_over_mean(plan.counts, planner.ep_size))

        # Position of every route in its physical expert's buffer: routes in [k, S]
        # row-major order (k-major, as DeepSpeed's top-2 orders them).
        seq, slot_counts = sequence_numbers(phys.reshape(-1), self.num_physical_experts)
        locations = seq.clamp_min(0).view_as(phys)
        capacity = slot_counts.max() if slot_counts.numel() else torch.zeros((), dtype=torch.int64)
        capacity = capacity.to(torch.int64).to(idx.device)
        if pg_utils.is_parallel(self.ep_group):
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        if groups._get_expert_model_parallel_world_size() == 1:
            # As DeepSpeed's dropless gating: pad to the non-expert tensor-parallel size,
            # since MOELayer then drops duplicate tokens across those ranks.
            tp = 1 if groups.mpu is None else bwc_tensor_model_parallel_world_size(mpu=groups.mpu)
            capacity = torch.ceil(capacity / tp).mul(tp).to(capacity.dtype)
        return phys, locations, capacity

    def _dense(self, phys: torch.Tensor, locations: torch.Tensor, gates: torch.Tensor, capacity: int):
        k, S = phys.shape
        P = self.num_physical_experts
        valid = phys >= 0
        token = torch.arange(S, device=phys.device).expand(k, S)[valid]
        combine = torch.zeros(S, P, capacity, dtype=gates.dtype, device=gates.device)
        combine = combine.index_put((token, phys[valid], locations[valid]), gates[valid], accumulate=True)
        return combine, combine.bool()


def _plain_max_over_mean(counts: torch.Tensor, ep_size: int) -> float:
    """Max/mean rank load of the plain DeepSpeed layout (expert e on rank e // (L/ep))."""
    loads = counts.to(torch.float64).view(ep_size, -1).sum(1)
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0
