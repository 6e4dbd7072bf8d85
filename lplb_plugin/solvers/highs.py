"""HiGHS (through ``scipy.optimize.linprog``) as the LP oracle.

Used by tests and benchmarks only, never on the training hot path: scipy is imported
lazily and is not a runtime dependency.
"""

from __future__ import annotations

import torch

from ..problem import SplitGraph

__all__ = ["solve_highs"]


def solve_highs(graph: SplitGraph, loads: torch.Tensor, component: int | None = None) -> tuple[float, torch.Tensor]:
    """Solve the min-max split LP with HiGHS.

    Args:
        graph: the placement's split graph.
        loads: ``[L]`` per-logical-expert loads.
        component: if given, only the ranks with ``graph.component == component`` (and
            their experts) are optimised; flows of other edges come back as 0.

    Returns:
        ``(T, edge_flow)``: the optimal maximum rank load (float) and one optimal edge
        flow, float64 ``[E]`` (HiGHS picks a vertex; it is not the unique tie-broken
        split of the exact solver).
    """
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    fixed = graph.fixed_loads(loads).numpy()
    demand = graph.demands(loads).numpy()
    E, M, R = graph.n_edges, graph.n_movable, graph.n_ranks
    ee = graph.edge_expert.numpy()
    er = graph.edge_rank.numpy()
    if component is not None:
        # drop other components: their ranks and edges become empty rows / zero demand
        in_comp = graph.component.numpy() == component
        fixed = np.where(in_comp, fixed, -np.inf)
        demand = np.where(np.isin(np.arange(M), ee[in_comp[er]]), demand, 0.0)
        fixed = np.where(np.isfinite(fixed), fixed, 0.0)
        keep_rank = in_comp
    else:
        keep_rank = np.ones(R, dtype=bool)
    if E == 0:
        return float(fixed[keep_rank].max()), torch.zeros(0, dtype=torch.float64)
    # variables: y[0:E], T at index E
    cost = np.zeros(E + 1)
    cost[E] = 1.0
    a_eq = coo_matrix((np.ones(E), (ee, np.arange(E))), shape=(M, E + 1))
    # one row per kept rank: its edges' flow - T <= -fixed
    row_of = np.cumsum(keep_rank) - 1
    kept_edge = keep_rank[er]
    n_rows = int(keep_rank.sum())
    rows = np.concatenate([row_of[er[kept_edge]], np.arange(n_rows)])
    cols = np.concatenate([np.arange(E)[kept_edge], np.full(n_rows, E)])
    vals = np.concatenate([np.ones(int(kept_edge.sum())), -np.ones(n_rows)])
    a_ub = coo_matrix((vals, (rows, cols)), shape=(n_rows, E + 1))
    res = linprog(
        cost,
        A_ub=a_ub.tocsr(),
        b_ub=-fixed[keep_rank],
        A_eq=a_eq.tocsr(),
        b_eq=demand,
        bounds=[(0, None)] * E + [(None, None)],
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed: {res.message}")
    return float(res.x[E]), torch.from_numpy(res.x[:E].copy())
