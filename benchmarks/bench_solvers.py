"""Split-LP solver latency and quality on CPU.

Run from the repository root:  python benchmarks/bench_solvers.py [--batches 50]
Prints ONE JSON object::

    {"benchmark": "solvers", "device": "cpu", "batches": ..., "tokens_per_rank": ...,
     "results": [{"placement", "n_ranks", "n_slots", "n_components", "method",
                  "median_ms", "p90_ms", "mean_rel_gap_to_highs"}, ...]}

Placements: the upstream topologies of ``tests/instances.py``'s
``topology_placements()`` plus its EPLB placements, built here on the mean prefill
profile.  Batches: ``--batches`` draws of ``tokens_per_rank * top_k * n_ranks`` routed
tokens from a random layer of the shipped ``prefill`` profile (the same batches for
every method).  Every solver call is timed on its own (wall clock, after one warm-up
call per placement); ``mean_rel_gap_to_highs`` is the mean over batches of
``(max rank load of the method's split - HiGHS optimum) / HiGHS optimum``.

To add a solver, add one line to :data:`SOLVERS`: a name and a callable
``(graph, loads) -> edge_flow`` (float64 ``[E]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from instances import eplb_placements, sample_batch, topology_placements  # noqa: E402

from lplb_plugin.data import load_profile  # noqa: E402
from lplb_plugin.layout import ExpertPlacement  # noqa: E402
from lplb_plugin.problem import SplitGraph  # noqa: E402
from lplb_plugin.solvers.exact import solve_exact  # noqa: E402
from lplb_plugin.solvers.highs import solve_highs  # noqa: E402
from lplb_plugin.solvers.ipm import solve_ipm  # noqa: E402
from lplb_plugin.solvers.lplb_ipm import solve_lplb_ipm  # noqa: E402

Solver = Callable[[SplitGraph, torch.Tensor], torch.Tensor]

#: name -> callable(graph, loads) -> edge_flow float64 [E].  Add a method in one line.
SOLVERS: dict[str, Solver] = {
    "exact": lambda g, loads: solve_exact(g, loads).edge_flow,
    "ipm": lambda g, loads: solve_ipm(g, loads).edge_flow,
    "highs": lambda g, loads: solve_highs(g, loads)[1],
    "lplb_ipm": lambda g, loads: solve_lplb_ipm(g, loads).edge_flow,
}

TOKENS_PER_RANK, TOP_K = 4096, 8


def placements(profile: torch.Tensor) -> list[tuple[str, ExpertPlacement]]:
    """Topology placements plus EPLB placements built on the mean profile row."""
    return topology_placements(profile.shape[1]) + eplb_placements(profile.mean(0))


def sample_batches(profile: torch.Tensor, n_ranks: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` per-expert load vectors: multinomial draws from random profile layers."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        layer = int(torch.randint(0, profile.shape[0], (1,), generator=gen))
        out.append(sample_batch(gen, profile[layer], TOKENS_PER_RANK * TOP_K * n_ranks))
    return out


def objective(graph: SplitGraph, loads: torch.Tensor, flow: torch.Tensor) -> float:
    return float(graph.rank_loads(graph.fixed_loads(loads), flow).max())


def time_call(fn: Solver, graph: SplitGraph, loads: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    flow = fn(graph, loads)
    return (time.perf_counter() - start) * 1e3, flow


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def bench_placement(
    name: str,
    placement: ExpertPlacement,
    batches: list[torch.Tensor],
    solvers: dict[str, Solver],
) -> list[dict]:
    """One result row per solver for this placement."""
    graph = SplitGraph.from_placement(placement)
    optimum = [solve_highs(graph, loads)[0] for loads in batches]
    n_comp = int(torch.unique(graph.component[graph.edge_rank]).numel()) if graph.n_edges else 0
    rows = []
    for method, fn in solvers.items():
        fn(graph, batches[0])  # warm-up: caches, lazy imports
        times, gaps = [], []
        for loads, t in zip(batches, optimum):
            ms, flow = time_call(fn, graph, loads)
            times.append(ms)
            gaps.append((objective(graph, loads, flow) - t) / t if t > 0 else 0.0)
        rows.append(
            {
                "placement": name,
                "n_ranks": placement.n_ranks,
                "n_slots": placement.n_physical,
                "n_components": n_comp,
                "method": method,
                "median_ms": round(statistics.median(times), 4),
                "p90_ms": round(percentile(times, 0.9), 4),
                "mean_rel_gap_to_highs": statistics.mean(gaps),
            }
        )
    return rows


def run_benchmark(n_batches: int = 50, seed: int = 0, methods: list[str] | None = None) -> dict:
    profile = load_profile("prefill")
    solvers = {k: v for k, v in SOLVERS.items() if methods is None or k in methods}
    results = []
    for name, placement in placements(profile):
        batches = sample_batches(profile, placement.n_ranks, n_batches, seed)
        results.extend(bench_placement(name, placement, batches, solvers))
    return {
        "benchmark": "solvers",
        "device": "cpu",
        "batches": n_batches,
        "tokens_per_rank": TOKENS_PER_RANK,
        "top_k": TOP_K,
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=None, choices=sorted(SOLVERS))
    args = ap.parse_args(argv)
    print(json.dumps(run_benchmark(args.batches, args.seed, args.methods)))


if __name__ == "__main__":
    main()
