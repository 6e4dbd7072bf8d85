"""One batch's LP, built from per-expert loads and a placement.

Given loads ``c[L]`` and a placement, only experts whose copies sit on at least two
distinct ranks can move tokens.  The LP of DESIGN.md §3 is a bipartite flow problem:

    minimise T  s.t.  sum_{r in ranks(e)} y[e, r] = c[e]          (movable e)
                      fixed[r] + sum_{e} y[e, r] <= T             (every rank r)
                      y >= 0

``fixed[r]`` is the load of experts that cannot leave rank ``r`` (a single copy, or all
copies on ``r``).  Edges ``(e, r)`` merge the copies of ``e`` that share rank ``r``
(``mult`` of them); their flow is split evenly between those slots, which is also what
a minimum-norm split over slots does.

:class:`SplitGraph` holds the static part (depends on the placement only, built once);
the per-batch part is two gathers of the loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import ExpertPlacement

__all__ = ["SplitGraph"]


@dataclass(frozen=True, eq=False)
class SplitGraph:
    """Static structure of the split LP for one placement (all CPU int64).

    Attributes:
        n_ranks: ``R``.
        n_logical: ``L``.
        movable: ``[M]`` logical ids of experts with copies on >= 2 ranks (ascending).
        edge_expert: ``[E]`` index into ``movable`` of each edge (sorted by expert, then
            rank).
        edge_rank: ``[E]`` rank of each edge.
        edge_mult: ``[E]`` number of slots of that expert on that rank.
        expert_edge_ptr: ``[M+1]`` CSR offsets: edges of movable expert ``m`` are
            ``edge_ptr[m]:edge_ptr[m+1]``.
        slot_edge: ``[P]`` edge of each slot, ``-1`` for slots of non-movable experts.
        slot_rank: ``[P]`` rank of each slot.
        phy2log: ``[P]``.
        log_slots_on_rank: ``[P]`` for every slot, how many slots of the same expert
            sit on the same rank (the share divisor).
        component: ``[R]`` id of each rank's connected component of the replica graph
            (ranks linked by a movable expert), numbered by lowest rank.
    """

    n_ranks: int
    n_logical: int
    movable: torch.Tensor
    edge_expert: torch.Tensor
    edge_rank: torch.Tensor
    edge_mult: torch.Tensor
    expert_edge_ptr: torch.Tensor
    slot_edge: torch.Tensor
    slot_rank: torch.Tensor
    phy2log: torch.Tensor
    log_slots_on_rank: torch.Tensor
    component: torch.Tensor

    @classmethod
    def from_placement(cls, placement: ExpertPlacement) -> "SplitGraph":
        R, L, P = placement.n_ranks, placement.n_logical, placement.n_physical
        phy2log = placement.phy2log
        slot_rank = placement.slot_rank
        # One key per (expert, rank) pair; unique() sorts by expert then rank.
        key = phy2log * R + slot_rank
        pair, slot_pair, pair_mult = torch.unique(key, return_inverse=True, return_counts=True)
        pair_expert = pair // R
        pair_rank = pair % R
        ranks_per_expert = torch.bincount(pair_expert, minlength=L)
        is_movable = ranks_per_expert >= 2
        movable = torch.nonzero(is_movable).flatten()
        pair_is_edge = is_movable[pair_expert]
        pair_to_edge = torch.full_like(pair, -1)
        pair_to_edge[pair_is_edge] = torch.arange(int(pair_is_edge.sum()))
        log_to_movable = torch.full((L,), -1, dtype=torch.int64)
        log_to_movable[movable] = torch.arange(movable.numel())
        edge_expert = log_to_movable[pair_expert[pair_is_edge]]
        edge_rank = pair_rank[pair_is_edge]
        edge_mult = pair_mult[pair_is_edge]
        ptr = torch.zeros(movable.numel() + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(torch.bincount(edge_expert, minlength=movable.numel()), 0)
        return cls(
            n_ranks=R,
            n_logical=L,
            movable=movable,
            edge_expert=edge_expert,
            edge_rank=edge_rank,
            edge_mult=edge_mult,
            expert_edge_ptr=ptr,
            slot_edge=pair_to_edge[slot_pair],
            slot_rank=slot_rank,
            phy2log=phy2log,
            log_slots_on_rank=pair_mult[slot_pair],
            component=_rank_components(R, edge_expert, edge_rank),
        )

    @property
    def n_movable(self) -> int:
        return self.movable.numel()

    @property
    def n_edges(self) -> int:
        return self.edge_expert.numel()

    def fixed_loads(self, loads: torch.Tensor) -> torch.Tensor:
        """float64 ``[R]``: load each rank carries whatever the split (non-movable
        experts).  ``loads``: ``[L]`` per-logical-expert token counts (any dtype)."""
        loads = loads.to("cpu", torch.float64)
        slot_load = loads[self.phy2log] / self.log_slots_on_rank
        slot_load = torch.where(self.slot_edge < 0, slot_load, torch.zeros_like(slot_load))
        return torch.zeros(self.n_ranks, dtype=torch.float64).index_add_(0, self.slot_rank, slot_load)

    def demands(self, loads: torch.Tensor) -> torch.Tensor:
        """float64 ``[M]``: loads of the movable experts."""
        return loads.to("cpu", torch.float64)[self.movable]

    def rank_loads(self, fixed: torch.Tensor, edge_flow: torch.Tensor) -> torch.Tensor:
        """float64 ``[R]``: per-rank load of an edge flow ``[E]``."""
        return fixed.clone().index_add_(0, self.edge_rank, edge_flow.to(torch.float64))

    def slot_split(self, loads: torch.Tensor, edge_flow: torch.Tensor) -> torch.Tensor:
        """float64 ``[P]``: per-slot load ``x`` from an edge flow ``[E]``; slots of
        non-movable experts get their expert's load (shared evenly by copies on the same
        rank)."""
        loads = loads.to("cpu", torch.float64)
        x = loads[self.phy2log] / self.log_slots_on_rank
        moved = self.slot_edge >= 0
        e = self.slot_edge[moved]
        x[moved] = edge_flow.to(torch.float64)[e] / self.edge_mult[e]
        return x

    def even_flow(self, loads: torch.Tensor) -> torch.Tensor:
        """float64 ``[E]``: every movable expert's load spread evenly over its slots
        (what static replication without a per-batch split does)."""
        demand = self.demands(loads)
        slots = torch.zeros(self.n_movable, dtype=torch.float64).index_add_(
            0, self.edge_expert, self.edge_mult.to(torch.float64)
        )
        return demand[self.edge_expert] * self.edge_mult / slots[self.edge_expert]

    def edge_flow_from_slots(self, x: torch.Tensor) -> torch.Tensor:
        """float64 ``[E]``: inverse of :meth:`slot_split` on the movable slots."""
        x = x.to("cpu", torch.float64)
        moved = self.slot_edge >= 0
        return torch.zeros(self.n_edges, dtype=torch.float64).index_add_(0, self.slot_edge[moved], x[moved])


def _rank_components(n_ranks: int, edge_expert: torch.Tensor, edge_rank: torch.Tensor) -> torch.Tensor:
    """Connected components of ranks linked by a shared movable expert, labelled by the
    smallest rank in each (label propagation; the graphs are small)."""
    label = torch.arange(n_ranks)
    if edge_expert.numel() == 0:
        return label
    n_exp = int(edge_expert.max()) + 1
    while True:
        # min label over each expert's ranks, then over each rank's experts
        exp_min = torch.full((n_exp,), n_ranks, dtype=torch.int64).scatter_reduce_(
            0, edge_expert, label[edge_rank], reduce="amin"
        )
        new = label.clone().scatter_reduce_(0, edge_rank, exp_min[edge_expert], reduce="amin")
        if torch.equal(new, label):
            return label
        label = new
