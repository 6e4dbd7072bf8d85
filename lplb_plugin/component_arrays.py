"""Flat int32 arrays describing a :class:`~lplb_plugin.problem.SplitGraph` per connected
component, the input format of the solve kernels (``csrc/solve_*.cuh``).

The kernels run one thread block per connected component of the replica graph, with
everything renumbered locally: ranks ``0..R_c-1`` (ascending global rank), movable
experts ``0..M_c-1`` (ascending logical id) and their edges ``0..E_c-1`` (by expert,
then rank, as in the graph).  Components without movable experts are included too
(``M_c = E_c = 0``) so that every rank belongs to exactly one block.

Concatenated over components ``c = 0..C-1`` (``rb, mb, eb`` the component's offsets
into the rank, expert and edge arrays):

- ``comp_rank_off, comp_exp_off, comp_edge_off`` ``[C+1]``: those offsets;
- ``rank_global [R]``: global rank of each local rank;
- ``fix_off [R+1]``, ``fix_log [F]``, ``fix_div [F]``: for each rank (in ``rank_global``
  order) the logical experts of its non-movable slots, in slot order, and the number
  of slots of that expert on that rank (its share divisor);
- ``exp_log [M]``: logical id of each movable expert;
- ``exp_ptr [M+C]``: per component ``M_c+1`` local CSR offsets of each expert's edges;
- ``edge_rank, edge_exp, edge_mult, edge_global [E]``: local rank, local expert, slots
  on that rank, and the graph's edge id;
- ``rank_ptr [R+C]`` / ``rank_edges [E]``: per component ``R_c+1`` local CSR offsets and
  the local edge ids of each rank, ordered by expert (so every per-rank sum adds in
  the same order as the reference's ``bincount``).

``two_copy`` says that every movable expert has exactly two edges (copies on two
ranks: all upstream topologies); the exact kernel then solves small components with
its one-warp two-copy variant (``csrc/solve_pair.cuh``; other small components:
``csrc/solve_exact_warp.cuh``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from .problem import SplitGraph

__all__ = ["ComponentArrays"]


@dataclass(frozen=True, eq=False)
class ComponentArrays:
    """See the module docstring.  All tensors int32 on one device."""

    n_comp: int
    max_ranks: int
    max_experts: int
    max_edges: int
    lipschitz: float
    two_copy: bool
    comp_rank_off: torch.Tensor
    comp_exp_off: torch.Tensor
    comp_edge_off: torch.Tensor
    rank_global: torch.Tensor
    fix_off: torch.Tensor
    fix_log: torch.Tensor
    fix_div: torch.Tensor
    exp_log: torch.Tensor
    exp_ptr: torch.Tensor
    edge_rank: torch.Tensor
    edge_exp: torch.Tensor
    edge_mult: torch.Tensor
    edge_global: torch.Tensor
    rank_ptr: torch.Tensor
    rank_edges: torch.Tensor

    @classmethod
    def from_graph(cls, graph: SplitGraph) -> "ComponentArrays":
        R = graph.n_ranks
        comp_label = graph.component.numpy()
        _, comp = np.unique(comp_label, return_inverse=True)
        n_comp = int(comp.max()) + 1 if R else 0
        edge_expert = graph.edge_expert.numpy()
        edge_rank_g = graph.edge_rank.numpy()
        edge_mult_g = graph.edge_mult.numpy()
        movable = graph.movable.numpy()
        exp_comp = comp[edge_rank_g[graph.expert_edge_ptr.numpy()[:-1]]] if graph.n_movable else np.zeros(0, np.int64)

        # non-movable slots of each rank, in slot order
        slot_rank = graph.slot_rank.numpy()
        fixed_slot = graph.slot_edge.numpy() < 0
        phy2log = graph.phy2log.numpy()
        share = graph.log_slots_on_rank.numpy()

        comp_rank_off, comp_exp_off, comp_edge_off = [0], [0], [0]
        rank_global, fix_off, fix_log, fix_div = [], [0], [], []
        exp_log, exp_ptr = [], []
        e_rank, e_exp, e_mult, e_glob, rank_ptr, rank_edges = [], [], [], [], [], []
        max_r = max_m = max_e = 0
        for c in range(n_comp):
            ranks = np.flatnonzero(comp == c)
            local_rank = {int(r): i for i, r in enumerate(ranks)}
            for r in ranks:
                slots = np.flatnonzero((slot_rank == r) & fixed_slot)
                rank_global.append(int(r))
                fix_log.extend(phy2log[slots].tolist())
                fix_div.extend(share[slots].tolist())
                fix_off.append(len(fix_log))
            exps = np.flatnonzero(exp_comp == c)  # movable indices, ascending logical id
            edges = np.flatnonzero(np.isin(edge_expert, exps)) if exps.size else np.zeros(0, np.int64)
            local_exp = {int(m): i for i, m in enumerate(exps)}
            degree = np.diff(graph.expert_edge_ptr.numpy())[exps]
            exp_log.extend(movable[exps].tolist())
            exp_ptr.extend(np.concatenate([[0], np.cumsum(degree)]).tolist())
            lr = np.array([local_rank[int(r)] for r in edge_rank_g[edges]], dtype=np.int64)
            e_rank.extend(lr.tolist())
            e_exp.extend(local_exp[int(m)] for m in edge_expert[edges])
            e_mult.extend(edge_mult_g[edges].tolist())
            e_glob.extend(edges.tolist())
            # edges of each rank, by expert (edges are already expert-major)
            by_rank = np.argsort(lr, kind="stable")
            counts = np.bincount(lr, minlength=ranks.size)
            rank_ptr.extend(np.concatenate([[0], np.cumsum(counts)]).tolist())
            rank_edges.extend(by_rank.tolist())
            comp_rank_off.append(comp_rank_off[-1] + ranks.size)
            comp_exp_off.append(comp_exp_off[-1] + exps.size)
            comp_edge_off.append(comp_edge_off[-1] + edges.size)
            max_r, max_m, max_e = max(max_r, ranks.size), max(max_m, exps.size), max(max_e, edges.size)

        def t(v):
            return torch.tensor(v, dtype=torch.int32)

        per_rank_edges = np.bincount(edge_rank_g, minlength=R) if edge_rank_g.size else np.zeros(1)
        return cls(
            n_comp=n_comp, max_ranks=max_r, max_experts=max_m, max_edges=max_e,
            two_copy=bool((np.diff(graph.expert_edge_ptr.numpy()) == 2).all()),
            # the exact reference's FISTA step uses the graph-wide edge count per rank
            lipschitz=float(max(per_rank_edges.max(initial=1), 1)),
            comp_rank_off=t(comp_rank_off), comp_exp_off=t(comp_exp_off), comp_edge_off=t(comp_edge_off),
            rank_global=t(rank_global), fix_off=t(fix_off), fix_log=t(fix_log), fix_div=t(fix_div),
            exp_log=t(exp_log), exp_ptr=t(exp_ptr), edge_rank=t(e_rank), edge_exp=t(e_exp),
            edge_mult=t(e_mult), edge_global=t(e_glob), rank_ptr=t(rank_ptr), rank_edges=t(rank_edges),
        )

    def copy_table(self, graph: SplitGraph, log2phy: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
        """int32 ``[M, 1 + 2 C]`` (``C = log2phy.shape[1]``): per movable expert, in
        ``exp_log`` order, its number of copies, then per copy ``k`` (``log2phy``
        column order) its slot and the component-local edge that slot lies on (``-1``
        beyond its copies).  The solve kernels write the per-slot split and the copy
        shares of their component's experts from it straight after the solve: a copy's
        tokens are its local edge's flow over that edge's slots, with no search
        through the placement's tables (``csrc/slot_split.cuh``).

        Arguments: ``graph`` the placement's split graph these arrays were built from;
        ``log2phy`` int ``[L, C]``, ``logcnt`` int ``[L]`` its tables (on any device).
        """
        log2phy = log2phy.to("cpu", torch.int64)
        logcnt = logcnt.to("cpu", torch.int64)
        n_cols = log2phy.shape[1]
        exp_log = self.exp_log.to("cpu", torch.int64)
        table = torch.full((exp_log.numel(), 1 + 2 * n_cols), -1, dtype=torch.int64)
        if exp_log.numel() == 0:
            return table.to(torch.int32)
        # component of each movable expert, and the local id of each graph edge
        exp_off = self.comp_exp_off.to("cpu", torch.int64)
        edge_off = self.comp_edge_off.to("cpu", torch.int64)
        comp = torch.searchsorted(exp_off, torch.arange(exp_log.numel()), right=True) - 1
        local = torch.full((graph.n_edges,), -1, dtype=torch.int64)
        glob = self.edge_global.to("cpu", torch.int64)
        local[glob] = torch.arange(glob.numel())
        cnt = logcnt[exp_log]
        slots = log2phy[exp_log]  # [M, C]
        live = (torch.arange(n_cols).unsqueeze(0) < cnt.unsqueeze(1)) & (slots >= 0)
        edge = torch.where(live, graph.slot_edge[slots.clamp(min=0)], torch.full_like(slots, -1))
        edge_local = torch.where(edge >= 0, local[edge.clamp(min=0)] - edge_off[comp].unsqueeze(1), edge)
        table[:, 0] = cnt
        table[:, 1::2] = torch.where(live, slots, torch.full_like(slots, -1))
        table[:, 2::2] = edge_local
        return table.to(torch.int32)

    def to(self, device: torch.device | str) -> "ComponentArrays":
        """A copy with every tensor on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return ComponentArrays(**kw)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors in the kernels' argument order (contiguous int32)."""
        return [getattr(self, f.name).contiguous() for f in fields(self) if f.type in ("torch.Tensor", torch.Tensor)]
