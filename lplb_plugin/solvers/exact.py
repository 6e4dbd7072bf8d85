"""Exact split: per-component min-max optimum, made unique, with a certificate.

Problem (DESIGN.md §3): movable experts ``m`` with demand ``c[m]`` split over the ranks
holding their copies (edges ``(m, r)``, ``mult`` slots each); rank ``r`` carries
``fixed[r]`` plus its edges' flow.  Ranks fall into connected components ``K`` of the
replica graph, which are independent problems (for upstream topologies: the EP groups).

The answer, for every component ``K`` separately:

1. its maximum rank load is the LP optimum ``T_K``;
2. among all splits reaching every ``T_K``, it is the one closest (sum of squares over
   physical slots) to the *even split* ``x0[p] = c[e] / logcnt[e]``.  That projection
   is unique, so the answer does not depend on how it was computed: the CUDA kernel and
   this reference must agree.  It also moves as few tokens away from the even split as
   balance allows.

How (docs/solvers.md has the argument):

- Lower bound.  For any set ``U`` of ranks, ``T >= g(U) / |U|`` with
  ``g(U) = fixed(U) + W(U)`` and ``W(U)`` the demand of experts whose copies all lie in
  ``U`` (their tokens cannot leave ``U``).  Given an ordering of a component's ranks by
  approximate load, the best prefix ``U`` gives ``T_K^lo``; a few iterations of an
  accelerated projected gradient method on ``1/2 sum_r load_r^2`` (phase 1) order the
  ranks well enough that the best prefix is the bottleneck set, so ``T_K^lo = T_K``.
  The bound is exact rational arithmetic on integer counts (one division).
- Upper bound, tie-break and certificate in one step.  Project ``x0`` onto
  ``{split: load_r <= T_K^lo}``: ``y[m, r] = mult * max(0, x0[m] + alpha[m] + beta[r])``
  with ``beta[r] <= 0`` only on ranks whose bound is active; ``alpha, beta`` maximise
  the concave dual, found by semismooth Newton (the linear systems are Schur
  complements over ranks).  If the projection exists, the split reaches the lower
  bound, so it is optimal, and it is the unique tie-broken answer (KKT holds).
  If it does not (the ordering was not yet right), phase 1 runs longer and the bound
  can only rise; after the last round the best valid split found is returned with
  ``certified = False`` (the caller warns and may fall back).

Everything here is float64 numpy on the host: the problem has at most a few hundred
variables, where numpy's per-call cost beats torch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..problem import SplitGraph

__all__ = ["ExactResult", "solve_exact"]

#: Cumulative phase-1 iterations before each certification attempt.
_ROUNDS = (4, 16, 64, 256, 1024)
_NEWTON_ITERS = 30
#: Relative tolerance of the certificate (loads vs bound, expert sums).
CERT_RTOL = 1e-10


@dataclass(frozen=True)
class ExactResult:
    """Result of :func:`solve_exact`.

    Attributes:
        edge_flow: float64 ``[E]`` (CPU): flow on each edge of the graph; always a
            valid split (non-negative, each expert's edges sum to its demand).
        rank_loads: float64 ``[R]`` loads of that split.
        component_bound: float64 ``[R]``: the proven lower bound ``T_K`` of each
            rank's component (equal to the component's max load when certified).
        objective: ``max(rank_loads)``.
        certified: the split provably reaches every component's optimum and is the
            unique tie-broken answer.  False only for the approximate fallback.
        rounds: certification attempts made.
        newton_iters: semismooth Newton iterations, all attempts together.
    """

    edge_flow: torch.Tensor
    rank_loads: torch.Tensor
    component_bound: torch.Tensor
    objective: float
    certified: bool
    rounds: int
    newton_iters: int


class _Structure:
    """Per-graph arrays in padded ``[M, K]`` form, computed once per graph."""

    def __init__(self, graph: SplitGraph) -> None:
        self.R = graph.n_ranks
        self.M = graph.n_movable
        self.E = graph.n_edges
        ptr = graph.expert_edge_ptr.numpy()
        deg = ptr[1:] - ptr[:-1]
        self.K = int(deg.max()) if self.M else 0
        self.edge_rank = graph.edge_rank.numpy()
        self.edge_expert = graph.edge_expert.numpy()
        slot = np.arange(self.K)[None, :]
        self.mask = slot < deg[:, None]
        # padding points at a dummy edge E / rank 0 with zero weight
        self.pad_edge = np.where(self.mask, ptr[:-1, None] + slot, self.E)
        safe = np.minimum(self.pad_edge, max(self.E - 1, 0))
        self.pad_rank = np.where(self.mask, self.edge_rank[safe] if self.E else 0, 0)
        self.rank_flat = self.pad_rank.ravel()
        self.mult = np.where(self.mask, graph.edge_mult.numpy()[safe] if self.E else 0, 0).astype(np.float64)
        # slots of each movable expert (for the even split), over all its ranks
        self.slots = self.mult.sum(axis=1)
        self.two_copies = self.K == 2 and bool(self.mask.all())
        self.lipschitz = float(max(np.bincount(self.edge_rank, minlength=self.R).max(initial=1), 1))
        # dense component ids: the per-component bound sorts ranks by them
        _, self.comp_index = np.unique(graph.component.numpy(), return_inverse=True)
        self.n_comp = int(self.comp_index.max()) + 1 if self.R else 0
        self.pair_a = np.repeat(np.arange(self.K), self.K)
        self.pair_b = np.tile(np.arange(self.K), self.K)


@lru_cache(maxsize=64)
def _structure(graph: SplitGraph) -> _Structure:
    return _Structure(graph)


def solve_exact(graph: SplitGraph, loads: torch.Tensor, *, max_rounds: int = len(_ROUNDS)) -> ExactResult:
    """Exact, unique split of ``loads`` over ``graph`` (see the module docstring).

    Args:
        graph: the placement's :class:`SplitGraph`.
        loads: ``[L]`` per-logical-expert loads (any real dtype, any device; read on
            the host), finite and non-negative.
        max_rounds: certification attempts before the approximate fallback
            (1..5).

    Returns:
        :class:`ExactResult`.
    """
    st = _structure(graph)
    fixed = graph.fixed_loads(loads).numpy()
    demand = graph.demands(loads).numpy()
    x0 = np.where(st.mask, (demand / np.maximum(st.slots, 1))[:, None], 0.0)  # per slot
    if st.E == 0 or not demand.any():
        flow = st.mult * x0
        rl = _rank_loads(st, fixed, flow)
        return _result(st, flow, rl, _component_max(st, rl), True, 0, 0)

    scale = max(float(demand.max()), float(fixed.max()))
    bound = np.full(st.R, -np.inf)
    y = st.mult * x0
    z, t_k, done = y.copy(), 1.0, 0
    newton_total = 0
    best = (_rank_loads(st, fixed, y).max(), y)  # the even split is always valid
    rounds = min(max(max_rounds, 1), len(_ROUNDS))
    for rnd in range(rounds):
        y, z, t_k = _fista(st, fixed, demand, y, z, t_k, _ROUNDS[rnd] - done)
        done = _ROUNDS[rnd]
        approx = _rank_loads(st, fixed, y)
        if approx.max() < best[0]:
            best = (approx.max(), y)
        bound = np.maximum(bound, _prefix_bound(st, fixed, demand, approx))
        # cold start: a failed attempt leaves a diverged dual behind
        flow, _, _, ok, its = _project(st, fixed, demand, x0, bound, np.zeros(st.M), np.zeros(st.R), scale)
        newton_total += its
        if ok:
            rl = _rank_loads(st, fixed, flow)
            return _result(st, flow, rl, bound, True, rnd + 1, newton_total)
    rl = _rank_loads(st, fixed, best[1])
    return _result(st, best[1], rl, bound, False, rounds, newton_total)


def _result(st, flow, rank_loads, bound, certified, rounds, newton_iters) -> ExactResult:
    edge = np.zeros(st.E + 1)
    edge[st.pad_edge] = flow
    return ExactResult(
        edge_flow=torch.from_numpy(edge[: st.E].copy()),
        rank_loads=torch.from_numpy(np.ascontiguousarray(rank_loads, dtype=np.float64)),
        component_bound=torch.from_numpy(np.ascontiguousarray(bound, dtype=np.float64)),
        objective=float(rank_loads.max()) if rank_loads.size else 0.0,
        certified=certified,
        rounds=rounds,
        newton_iters=newton_iters,
    )


def _rank_loads(st: _Structure, fixed: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``[R]`` loads of a padded ``[M, K]`` flow."""
    return fixed + np.bincount(st.rank_flat, weights=flow.ravel(), minlength=st.R)


def _component_max(st: _Structure, values: np.ndarray) -> np.ndarray:
    """``[R]``: max of ``values`` over each rank's component."""
    m = np.full(st.n_comp, -np.inf)
    np.maximum.at(m, st.comp_index, values)
    return m[st.comp_index]


# ------------------------------------------------------------------ phase 1: ordering
def _project_simplex(st: _Structure, v: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean projection of ``v[M, K]`` onto ``{y >= 0, sum y = demand}``."""
    if st.two_copies:
        first = np.clip(0.5 * (v[:, 0] - v[:, 1] + demand), 0.0, demand)
        return np.stack([first, demand - first], axis=1)
    vm = np.where(st.mask, v, -np.inf)
    u = -np.sort(-vm, axis=1)
    css = np.cumsum(np.where(st.mask, u, 0.0), axis=1)
    theta = (css - demand[:, None]) / np.arange(1, st.K + 1)
    n_pos = np.maximum(((u - theta) > 0).sum(axis=1), 1)
    th = theta[np.arange(st.M), n_pos - 1]
    return np.where(st.mask, np.maximum(v - th[:, None], 0.0), 0.0)


def _fista(st, fixed, demand, y, z, t_k, iters):
    """Accelerated projected gradient on ``1/2 sum_r load_r^2``; step ``1/L`` with
    ``L`` the most edges on one rank (the gradient's Lipschitz constant)."""
    step = 1.0 / st.lipschitz
    for _ in range(iters):
        load = _rank_loads(st, fixed, z)
        y_new = _project_simplex(st, z - step * load[st.pad_rank], demand)
        t_new = 0.5 * (1.0 + (1.0 + 4.0 * t_k * t_k) ** 0.5)
        z = y_new + ((t_k - 1.0) / t_new) * (y_new - y)
        y, t_k = y_new, t_new
    return y, z, t_k


# ------------------------------------------------------------------ lower bound
def _prefix_bound(st: _Structure, fixed: np.ndarray, demand: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """``[R]``: for each rank, the best prefix bound ``max_k g(S_k) / k`` of its
    component, ranks ordered by ``approx`` (descending; ties by rank id)."""
    R = st.R
    order = np.lexsort((np.arange(R), -approx, st.comp_index))
    pos = np.empty(R, dtype=np.int64)
    pos[order] = np.arange(R)
    inside_at = np.zeros(st.M, dtype=np.int64)
    np.maximum.at(inside_at, st.edge_expert, pos[st.edge_rank])
    gain = fixed[order] + np.bincount(inside_at, weights=demand, minlength=R)
    comp_sorted = st.comp_index[order]
    starts = np.flatnonzero(np.r_[True, comp_sorted[1:] != comp_sorted[:-1]])
    csum = np.cumsum(gain)
    before = np.r_[0.0, csum][starts][np.searchsorted(starts, np.arange(R), side="right") - 1]
    k = np.arange(R) - starts[np.searchsorted(starts, np.arange(R), side="right") - 1] + 1
    density = (csum - before) / k
    best = np.maximum.reduceat(density, starts)
    out = np.empty(R)
    out[order] = best[np.searchsorted(starts, np.arange(R), side="right") - 1]
    return out


# ------------------------------------------------------------------ projection
def _project(st, fixed, demand, x0, bound, alpha, beta, scale):
    """Project the even split onto ``{valid split, load_r <= bound_r}``.

    Returns ``(flow[M, K], alpha, beta, ok, newton_iters)``; ``ok`` when the projection
    exists and meets the certificate tolerance.
    """
    cap = bound - fixed  # room for movable flow on each rank
    tol = CERT_RTOL * scale
    if (cap < -tol).any():
        return st.mult * x0, alpha, beta, False, 0
    rank = st.pad_rank
    # ranks whose bound binds; grown when the projection overshoots elsewhere
    active = _rank_loads(st, fixed, st.mult * x0) > bound
    beta = np.minimum(beta, 0.0)
    sticky = np.zeros(st.R, dtype=bool)
    was_released = np.zeros(st.R, dtype=bool)
    # Any valid split y has 1/2 sum (y - x0)^2 <= 1/2 sum mult demand^2 (per slot, y and
    # x0 both lie in [0, demand]); by weak duality a dual value above twice that (a
    # rounding margin) proves that no split meets the bound, so the attempt stops
    # there instead of running Newton to its iteration cap.
    dual_cap = float((st.mult * (demand * demand)[:, None]).sum())
    its = 0
    for _outer in range(8):
        beta = np.where(active, beta, 0.0)
        for _ in range(_NEWTON_ITERS):
            s = x0 + alpha[:, None] + beta[rank]
            flow = st.mult * np.maximum(s, 0.0)
            g_a = demand - flow.sum(axis=1)
            g_b = np.where(active, cap - np.bincount(st.rank_flat, weights=flow.ravel(), minlength=st.R), 0.0)
            if max(np.abs(g_a).max(), np.abs(g_b).max()) <= 1e-11 * scale:
                break
            base = _dual(st, demand, cap, x0, active, alpha, beta)
            if base > dual_cap:
                return flow, alpha, beta, False, its
            its += 1
            d_a, d_b = _newton_direction(st, np.where(s > 0, st.mult, 0.0), active, g_a, g_b)
            alpha, beta = _line_search(st, demand, cap, x0, active, alpha, beta, d_a, d_b, g_a, g_b, base)
        else:
            return flow, alpha, beta, False, its
        load = _rank_loads(st, fixed, flow)
        over = ~active & (load > bound + tol)
        # a bound that pulls load in is not binding, unless releasing it overshot
        released = active & (beta > tol * 1e-3) & ~sticky
        if not over.any() and not released.any():
            break
        sticky |= over & was_released
        was_released |= released
        active = (active | over) & ~released
    else:
        return flow, alpha, beta, False, its
    # exact expert sums: rescale each expert's flow onto its demand.  An expert whose
    # flow vanished within the tolerance (its demand is below it) takes the even split
    # instead: that moves no load by more than the tolerance, which the check below
    # still bounds.
    tot = flow.sum(axis=1)
    live = demand > 0
    vanished = live & ~(tot > 0)
    if (vanished & ~(demand <= tol)).any():
        return flow, alpha, beta, False, its
    keep = live & ~vanished
    flow[keep] *= (demand[keep] / tot[keep])[:, None]
    flow[vanished] = st.mult[vanished] * x0[vanished]
    flow[~live] = 0.0
    ok = bool((_rank_loads(st, fixed, flow) <= bound + tol).all())
    return flow, alpha, beta, ok, its


def _newton_direction(st, w, active, g_a, g_b):
    """Solve ``(H + delta I) d = g`` for the dual's generalised Hessian.

    ``w[M, K]`` are the slot weights of edges carrying flow.  Every such edge curves
    ``alpha``; edges into ranks with a binding bound (``active``) also curve and couple
    ``beta``.  The expert block is diagonal, so it is eliminated and only an ``R x R``
    Schur complement over ranks is factorised; inactive ranks keep ``d = 0``.
    """
    delta = 1e-12
    rank = st.pad_rank
    coupled = w * active[rank]
    d_alpha = w.sum(axis=1) + delta
    d_beta = np.bincount(st.rank_flat, weights=coupled.ravel(), minlength=st.R) + delta
    schur = np.diag(np.where(active, d_beta, 1.0)).ravel()
    vals = (coupled[:, st.pair_a] * coupled[:, st.pair_b]) / d_alpha[:, None]
    np.add.at(schur, (rank[:, st.pair_a] * st.R + rank[:, st.pair_b]).ravel(), -vals.ravel())
    rhs = g_b - np.bincount(st.rank_flat, weights=(coupled * (g_a / d_alpha)[:, None]).ravel(), minlength=st.R)
    d_b = np.where(active, np.linalg.solve(schur.reshape(st.R, st.R), np.where(active, rhs, 0.0)), 0.0)
    d_a = (g_a - (coupled * d_b[rank]).sum(axis=1)) / d_alpha
    return d_a, d_b


def _dual(st, demand, cap, x0, active, alpha, beta):
    s = np.maximum(x0 + alpha[:, None] + beta[st.pad_rank], 0.0)
    return demand @ alpha + np.where(active, cap, 0.0) @ beta - 0.5 * (st.mult * s * s).sum() + 0.5 * (st.mult * x0 * x0).sum()


def _line_search(st, demand, cap, x0, active, alpha, beta, d_a, d_b, g_a, g_b, base):
    """Armijo backtracking on the concave dual from its value ``base`` at (alpha,
    beta) (full steps near the answer)."""
    slope = g_a @ d_a + g_b @ d_b
    t = 1.0
    for _ in range(40):
        a, b = alpha + t * d_a, beta + t * d_b
        if _dual(st, demand, cap, x0, active, a, b) >= base + 1e-4 * t * slope:
            return a, b
        t *= 0.5
    return alpha + t * d_a, beta + t * d_b
