"""Solvers of the split LP.

``solve(loads, phy2log, n_ranks, method=...)`` is the one entry point:

- ``"exact"`` (default): combinatorial bound + certified projection
  (:mod:`.exact`); the unique tie-broken optimum of every connected component.
- ``"ipm"``: primal-dual Mehrotra interior-point method in batched torch ops
  (:mod:`.ipm`), the reference of the CUDA IPM kernel.
- ``"highs"``: scipy's HiGHS (:mod:`.highs`), the test oracle (needs scipy).

Solvers never raise on a numerically hard batch: when a solve cannot be certified
(exact) or does not converge (ipm) the best valid split found is used and a warning is
logged, so training goes on with a safe split.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import LPLBInputError
from ..layout import ExpertPlacement
from ..problem import SplitGraph

__all__ = ["METHODS", "SolveResult", "solve", "solve_graph", "graph_for"]

METHODS = ("exact", "ipm", "highs")

log = logging.getLogger("lplb_plugin")

_GRAPHS: "OrderedDict[tuple, SplitGraph]" = OrderedDict()


@dataclass(frozen=True)
class SolveResult:
    """A split and how it was obtained.

    Attributes:
        edge_flow: float64 ``[E]`` on the CPU, flow per edge of the graph.
        rank_loads: float64 ``[R]``.
        objective: max rank load.
        optimal: the solver proved (exact) or converged to (ipm, within its
            tolerance) the optimum; False means a fallback split was used.
        method: which solver produced it.
    """

    edge_flow: torch.Tensor
    rank_loads: torch.Tensor
    objective: float
    optimal: bool
    method: str


def graph_for(phy2log: torch.Tensor, n_ranks: int) -> SplitGraph:
    """Split graph of a placement, cached by content (placements change rarely)."""
    p2l = phy2log.detach().to("cpu", torch.int64).contiguous()
    key = (int(n_ranks), p2l.numel(), p2l.numpy().tobytes())
    graph = _GRAPHS.get(key)
    if graph is None:
        graph = SplitGraph.from_placement(ExpertPlacement.from_phy2log(p2l, n_ranks))
        _GRAPHS[key] = graph
        if len(_GRAPHS) > 64:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    return graph


def check_loads(loads: torch.Tensor, n_logical: int, name: str = "loads") -> torch.Tensor:
    """Validate per-expert loads and return them as CPU float64 ``[L]``."""
    if not isinstance(loads, torch.Tensor):
        loads = torch.as_tensor(loads)
    if loads.dim() != 1 or loads.numel() != n_logical:
        raise LPLBInputError(f"{name} must be 1-D with {n_logical} entries (one per logical expert), got shape {tuple(loads.shape)}")
    if loads.dtype == torch.bool or loads.is_complex():
        raise LPLBInputError(f"{name} must be a real tensor, got dtype {loads.dtype}")
    out = loads.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()):
        raise LPLBInputError(f"{name} must be finite and non-negative, got min {float(out.min())}, max {float(out.max())}")
    return out


def solve_graph(
    graph: SplitGraph, loads: torch.Tensor, method: str = "exact", *, warn: bool = True, **options
) -> SolveResult:
    """Solve one batch on a prepared graph.

    Args:
        graph: from :func:`graph_for` or :meth:`SplitGraph.from_placement`.
        loads: ``[L]`` non-negative loads (CPU float64 after :func:`check_loads`).
        method: ``"exact"``, ``"ipm"`` or ``"highs"``.
        warn: log a warning when the split is a fallback (config
            ``warn_on_fallback``); ``SolveResult.optimal`` says so either way.
        options: forwarded to the solver (``max_iters``, ``tol`` for ipm).
    """
    if method == "exact":
        from .exact import solve_exact

        r = solve_exact(graph, loads, **options)
        if not r.certified and warn:
            log.warning(
                "lplb: exact split not certified after %d rounds; using the best valid split found "
                "(max load %.6g, proven lower bound %.6g)",
                r.rounds, r.objective, float(r.component_bound.max()),
            )
        return SolveResult(r.edge_flow, r.rank_loads, r.objective, r.certified, "exact")
    if method == "ipm":
        from .ipm import solve_ipm

        r = solve_ipm(graph, loads, **options)
        if not r.converged and warn:
            log.warning(
                "lplb: IPM did not reach its tolerance in %d iterations (gap %.3g); using its valid split",
                r.iterations, r.gap,
            )
        rl = graph.rank_loads(graph.fixed_loads(loads), r.edge_flow)
        return SolveResult(r.edge_flow, rl, float(rl.max()), bool(r.converged), "ipm")
    if method == "highs":
        from .highs import solve_highs

        _, flow = solve_highs(graph, loads)
        flow = flow.clamp_min(0)
        rl = graph.rank_loads(graph.fixed_loads(loads), flow)
        return SolveResult(flow, rl, float(rl.max()), True, "highs")
    raise LPLBInputError(f"method={method!r} is unknown; expected one of {', '.join(repr(m) for m in METHODS)}")


def solve(loads: torch.Tensor, phy2log: torch.Tensor, n_ranks: int, method: str = "exact", **options) -> torch.Tensor:
    """Split each logical expert's load over its physical copies.

    Args:
        loads: ``[L]`` tokens (or cost) per logical expert, summed over the EP group;
            any real dtype, CPU or CUDA.
        phy2log: int ``[P]`` logical expert of each physical slot (rank-major slots,
            ``P % n_ranks == 0``).
        n_ranks: EP ranks.
        method: ``"exact"`` (default), ``"ipm"`` or ``"highs"``.
        options: solver options (ipm: ``max_iters``, ``tol``).

    Returns:
        float64 ``[P]`` on ``loads``' device: load of each slot.  Copies of expert
        ``e`` sum to ``loads[e]``; ``x >= 0``; the busiest rank of every connected
        component of the replica graph is as light as possible.
    """
    if method not in METHODS:
        raise LPLBInputError(f"method={method!r} is unknown; expected one of {', '.join(repr(m) for m in METHODS)}")
    graph = graph_for(phy2log, n_ranks)
    cpu_loads = check_loads(loads, graph.n_logical)
    result = solve_graph(graph, cpu_loads, method, **options)
    return graph.slot_split(cpu_loads, result.edge_flow).to(loads.device if isinstance(loads, torch.Tensor) else "cpu")
