r"""Emulation of upstream LPLB's per-batch solver (REFERENCE.md §1), for the
"LPLB-style" policy of ``lplb simulate``.

What is emulated
----------------
Upstream solves, per group of ranks, the min-max split LP with a *primal affine-scaling*
interior-point method: a single thread block, float32, started at ``x = 1`` with a
Big-M artificial column, exactly 5 iterations and no convergence test, normal
equations factored by Cholesky; after the loop an acceptance (feasibility) test; when
it fails the group falls back to the even split (0.5/0.5 for two copies).  Here:

* one LP per connected component of the replica graph (upstream's groups; every
  component solved independently), all components batched in torch ops;
* standard form over ``x = (y[edges], s[ranks], T, a) >= 0``::

      minimise   T + M_big * a
      s.t.       sum_r y_mr                 + r0_m a = c_m     (movable experts m)
                 T - sum_m y_mr - s_r       + r0_r a = f_r     (ranks r)

  with ``r0 = b - A_0 1`` so that ``x = 1, a = 1`` is feasible (the Big-M start);
  loads are divided by the component's mean rank load first (``1 <= T* <= R``) and
  ``M_big = 100`` in those units;
* ``iterations`` (default 5) affine-scaling steps in float32, no stop test:
  ``D = diag(x)``, ``w = (A D^2 A^T)^{-1} A D^2 cost`` (dense normal equations over
  experts + ranks, batched Cholesky), reduced costs ``r = cost - A^T w``,
  ``dx = -D^2 r``, ``x += gamma * dx / max_i(-dx_i / x_i)`` with ``gamma = 0.99``;
* acceptance test after the loop: every entry finite and non-negative, and the
  artificial's residual ``a * max|r0| <= 1e-2 * (1 + max(c, f))`` (scaled units);
* accepted components take the split ``y_mr / sum_r y_mr`` (the fraction each copy
  keeps, like upstream's ``o_weight``) times the expert's load; rejected ones take the
  even split over the expert's copies (slots).

What is not emulated
--------------------
* the strided step-length reduction of upstream's kernel (it ignores most variables
  on groups larger than 8x2, so ``x`` can go negative unnoticed): the ratio test here
  runs over ALL variables, i.e. this is upstream's method "done right";
* upstream's grouping by ``r2o`` column (one ratio shared by all
  ``combined_redundant_experts`` of a rank and column): every movable expert has its
  own flow variables here, as in the plugin's general graph;
* the exact scaling, Big-M value, step factor and acceptance threshold of upstream
  (not documented; the values above are this emulation's choices);
* CUDA-specifics (shared-memory limits on group size, the per-SM token mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..problem import SplitGraph
from .ipm import component_batch, cpu_single_thread, finalize_flow

__all__ = ["LPLBIPMResult", "solve_lplb_ipm"]

_BIG_M = 100.0  # scaled units: 1 <= T* <= R and the optimal duals lie in [0, 1]
_GAMMA = 0.99  # long-step affine scaling
_ACCEPT = 1e-2  # artificial residual, relative to 1 + max(c, f)


@dataclass
class LPLBIPMResult:
    """Outcome of :func:`solve_lplb_ipm`.

    Attributes:
        edge_flow: float64 ``[E]`` on the CPU, a valid split.
        objective: maximum rank load of ``edge_flow``.
        accepted: bool ``[B]``, per component (those with at least one edge, in
            ascending label order, see ``labels``): the solve passed the acceptance
            test (otherwise the component uses the even split).
        labels: int64 ``[B]``, the ``graph.component`` label of each entry.
        candidate_flow: float64 ``[E]``, the affine-scaling split of every component
            before the acceptance decision (non-finite / negative entries zeroed and
            rescaled; a diagnostic: ``edge_flow`` equals it on accepted components).
    """

    edge_flow: torch.Tensor
    objective: float
    accepted: torch.Tensor
    labels: torch.Tensor
    candidate_flow: torch.Tensor


def solve_lplb_ipm(graph: SplitGraph, loads: torch.Tensor, *, iterations: int = 5) -> LPLBIPMResult:
    """Upstream-LPLB-style split: ``iterations`` float32 primal affine-scaling steps from
    ``x = 1`` with a Big-M column, acceptance test, even-split fallback (see the module
    docstring).

    Args:
        graph: the placement's split graph.
        loads: ``[L]`` per-logical-expert loads.
        iterations: affine-scaling steps (upstream: 5).
    """
    fixed = graph.fixed_loads(loads)
    demand = graph.demands(loads)
    if graph.n_edges == 0:
        none = torch.zeros(0, dtype=torch.float64)
        return LPLBIPMResult(none, float(fixed.max()), torch.zeros(0, dtype=torch.bool),
                             torch.zeros(0, dtype=torch.int64), none.clone())
    with cpu_single_thread("cpu"):
        bt = component_batch(graph, "cpu")
        f, c = bt.batch_loads(loads, torch.float64)
        scale = (f.sum(1) + c.sum(1)) / bt.n_ranks
        scale = torch.where(scale > 0, scale, 1.0)
        y, ok = _affine_scaling(f / scale.unsqueeze(1), c / scale.unsqueeze(1), bt, iterations)
        raw = (y.to(torch.float64) * scale.view(-1, 1, 1)).flatten()[bt.edge_pos]
        candidate = finalize_flow(graph, raw, demand)
        # rejected components: zero flow -> finalize_flow gives the even split over copies
        flow = finalize_flow(graph, torch.where(ok[_edge_component(bt)], raw, 0.0), demand)
    obj = float(graph.rank_loads(fixed, flow).max())
    return LPLBIPMResult(flow, obj, ok, bt.labels.clone(), candidate)


def _edge_component(bt) -> torch.Tensor:
    B, Mx, Rx = bt.shape
    return bt.edge_pos // (Mx * Rx)


def _affine_scaling(f64, c64, bt, iterations: int):
    """Batched float32 primal affine scaling.  Returns ``(y [B, Mx, Rx], accepted [B])``."""
    dt = torch.float32
    B, Mx, Rx = bt.shape
    f, c = f64.to(dt), c64.to(dt)
    em = bt.edge_mask.to(dt)  # [B, Mx, Rx]
    rm = bt.rank_mask.to(dt)
    xm = bt.expert_mask.to(dt)
    deg_m = em.sum(2)
    deg_r = em.sum(1)
    # artificial column r0 = b - A 1  (A 1: experts deg_m; ranks 1 - deg_r - 1)
    r0m = (c - deg_m) * xm
    r0r = (f + deg_r) * rm
    r0 = torch.cat([r0m, r0r], 1)  # [B, Mx+Rx]
    y = em.clone()
    s = rm.clone()
    T = torch.ones(B, dtype=dt)
    a = torch.ones(B, dtype=dt)
    pad = torch.cat([1.0 - xm, 1.0 - rm], 1)  # identity rows for padding
    for _ in range(iterations):
        y2, s2, T2, a2 = y * y, s * s, T * T, a * a
        # normal matrix A D^2 A^T over (experts, ranks)
        N = a2.view(B, 1, 1) * (r0.unsqueeze(2) * r0.unsqueeze(1))
        N[:, :Mx, Mx:] -= y2
        N[:, Mx:, :Mx] -= y2.transpose(1, 2)
        N[:, Mx:, Mx:] += T2.view(B, 1, 1) * (rm.unsqueeze(2) * rm.unsqueeze(1))
        diag = torch.cat([y2.sum(2), y2.sum(1) + s2], 1) + pad
        N = N + torch.diag_embed(diag)
        # right-hand side A D^2 cost: T's column (ranks +1) and the artificial's
        rhs = a2.unsqueeze(1) * _BIG_M * r0
        rhs[:, Mx:] += T2.unsqueeze(1) * rm
        L, info = torch.linalg.cholesky_ex(N)
        w = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
        w = torch.where((info == 0).unsqueeze(1), w, torch.nan)
        u, v = w[:, :Mx], w[:, Mx:]
        # reduced costs and the affine-scaling direction dx = -D^2 r
        ry = (v.unsqueeze(1) - u.unsqueeze(2)) * em
        rs = v * rm
        rT = 1.0 - (v * rm).sum(1)
        ra = _BIG_M - (r0 * w).sum(1)
        dy, ds, dT, da = -y2 * ry, -s2 * rs, -T2 * rT, -a2 * ra
        # ratio test over ALL variables (upstream's kernel only looked at a few)
        ratio = torch.maximum(
            torch.maximum((-dy / torch.where(em > 0, y, 1.0)).flatten(1).amax(1),
                          (-ds / torch.where(rm > 0, s, 1.0)).amax(1)),
            torch.maximum(-dT / T, -da / a),
        )
        alpha = torch.where(ratio > 0, _GAMMA / ratio, 0.0)
        y = y + alpha.view(B, 1, 1) * dy
        s = s + alpha.unsqueeze(1) * ds
        T = T + alpha * dT
        a = a + alpha * da
    finite = torch.isfinite(y).flatten(1).all(1) & torch.isfinite(s).all(1) & torch.isfinite(T) & torch.isfinite(a)
    nonneg = (y >= 0).flatten(1).all(1) & (s >= 0).all(1) & (T >= 0) & (a >= 0)
    resid = a * r0.abs().amax(1)
    feasible = resid <= _ACCEPT * (1.0 + torch.maximum(c.amax(1), f.amax(1)))
    return torch.where(torch.isfinite(y), y, 0.0), finite & nonneg & feasible
