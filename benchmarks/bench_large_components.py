"""The solve kernels on components larger than the upstream topologies make: where a
block keeps its scratch (shared memory, the Newton matrix in global memory, or all of
it in global memory) and what each costs, next to the exact solver on the host.

Three random placements of ``tests/instances.py`` (every logical expert once, the
remaining slots random experts), each with one large connected component: 64 ranks
x 6 slots (scratch in shared memory), 160 ranks x 6 slots (the R x R matrix in
global memory) and 128 ranks x 32 slots (512 experts, ~4,000 edges: everything in
global memory).  Loads: 1e5 u^4 tokens per logical expert, u uniform.  GPU figures
are CUDA-event timings of 20 eager ``DeviceSolver.solve`` calls after warm-up (solve
kernel and slot kernel); ``host_exact_ms`` is ``solvers.exact.solve_exact`` on this
machine's CPU (mean of 5).  Prints one JSON object.

    python benchmarks/bench_large_components.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the same placements as tests/gpu's test_large_components

from instances import random_placement  # noqa: E402
from lplb_plugin import kernels  # noqa: E402
from lplb_plugin.problem import SplitGraph  # noqa: E402
from lplb_plugin.solvers.exact import solve_exact  # noqa: E402

CASES = [(64, 6), (160, 6), (128, 32)]  # (ranks, slots per rank); 4 * ranks logical experts
REPS = 20


def time_solve(ds: kernels.DeviceSolver, loads: torch.Tensor, method: str) -> tuple[float, list]:
    """Mean microseconds per solve over REPS eager calls, and the last solve's iterations."""
    for _ in range(3):
        split = ds.solve(loads, method)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        split = ds.solve(loads, method)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / REPS, split.iters.cpu().tolist()


def main() -> None:
    if kernels.get() is None:
        raise SystemExit("needs a CUDA GPU and the compiled kernels (lplb_plugin._C)")
    rows = []
    for n_ranks, per_rank in CASES:
        gen = torch.Generator().manual_seed(n_ranks)
        n_logical = 4 * n_ranks
        placement = random_placement(gen, n_logical, n_ranks, per_rank)
        graph = SplitGraph.from_placement(placement)
        ds = kernels.DeviceSolver(graph, placement.log2phy, placement.logcnt, torch.device("cuda"))
        loads = ((torch.rand(n_logical, generator=gen, dtype=torch.float64) ** 4) * 1e5).round()
        row = {"ranks": n_ranks, "slots": n_ranks * per_rank, "components": ds.sizes[0],
               "largest": {"ranks": ds.sizes[1], "experts": ds.sizes[2], "edges": ds.sizes[3]}}
        for method in ("exact", "ipm"):
            us, iters = time_solve(ds, loads.cuda(), method)
            doubles = ds.global_scratch(method)
            where = "shared" if doubles == 0 else "matrix global" if doubles == ds.sizes[1] ** 2 else "all global"
            row[method] = {"us": round(us, 1), "scratch": where, "global_doubles_per_component": doubles,
                           "iterations_max": max(max(i) for i in iters)}
        t = time.perf_counter()
        for _ in range(5):
            solve_exact(graph, loads)
        row["host_exact_ms"] = round((time.perf_counter() - t) / 5 * 1000, 2)
        rows.append(row)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
