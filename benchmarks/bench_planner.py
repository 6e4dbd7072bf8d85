"""Planner stage timings on a GPU: the CUDA kernels (count, exact and IPM solve, map,
and the whole ``Planner.run``) next to the torch path and the host solve, per topology.

256 logical experts, top-8, 4096 and 16384 tokens per rank; placements: ring EP8x1,
cube EP32 (8x2), hypercube EP16 (16x2), torus EP32 (8x4), cube EP64, EPLB EP32 with
288 slots.  Kernel figures are CUDA-event timings of CUDA-graph replays (captured
once, replayed 200 times after warm-up):

- ``solve_exact_us`` / ``solve_ipm_us``: the solve kernel (one block per connected
  component; it also writes the per-slot shares); the IPM at the default ``tol``
  (1e-6, relative duality gap);
- ``solve_ipm_tol1e5_us``, ``ipm_tol1e5_gap``, ``ipm_tol1e5_iters_max``: the IPM
  stopped at ``tol`` 1e-5, the accuracy of the issue's IPM target (gap <= 1e-5);
- ``solve_exact_block_us`` / ``solve_ipm_block_us``: the same with the block kernels
  only (``DeviceSolver.use_warp = False``; equal to the above where no one-warp
  solver applies);
- ``run_graph_us``: ``Planner.run`` captured whole (count + solve + map; no group, so
  no communication);
- ``ipm_gap``: relative distance of the IPM kernel's max load from the exact optimum;
- ``graph_floor``: what the timing method costs by itself: a graph of one kernel
  on a one-element tensor replayed the same way (``one_kernel_graph_us``: no figure
  above can read lower), and that kernel 20 times in one graph, per kernel
  (``per_kernel_in_graph_us``: a kernel node among others);
- ``first_attempt_fails``: the exact solve on the cube EP32 batches of the profile
  (layers 3 and 50, 16384 tokens per rank) whose first certification attempt fails,
  so that a second round runs (the solver's slow path).

Baselines in the same process: the torch count / redirect (events / graph replays),
the exact solver on the host (wall clock, median of 50) and ``host_run_ms``, the
torch-path ``Planner.run`` (CPU solve, one sync) timed end to end.  Prints one JSON
object.

    python benchmarks/bench_planner.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lplb_plugin import Planner, kernels, topology  # noqa: E402
from lplb_plugin.counting import count_tokens  # noqa: E402
from lplb_plugin.data import load_profile  # noqa: E402
from lplb_plugin.layout import ExpertPlacement  # noqa: E402
from lplb_plugin.placement import rebalance_experts  # noqa: E402
from lplb_plugin.redirect import redirect  # noqa: E402


def cases():
    prof = load_profile("prefill")
    out = [
        ("ring8x1-ep8", Planner(topology.ring(8), 256 + 8, 256, ep_size=8)),
        ("cube-ep32", Planner(topology.cube(), 256 + 64, 256, ep_size=32)),
        ("hypercube-ep16", Planner(topology.hypercube(), 256 + 32, 256, ep_size=16)),
        ("torus8x4-ep32", Planner(topology.torus_2d(8, 4), 256 + 64, 256, ep_size=32)),
        ("cube-ep64", Planner(topology.cube(), 256 + 128, 256, ep_size=64)),
    ]
    phy2log, _, _ = rebalance_experts(prof[10:11], 288, 8, 4, 32)
    out.append(("eplb-ep32-288", Planner.from_placement(ExpertPlacement.from_phy2log(phy2log[0], 32, 256))))
    return out, prof


def batch(planner: Planner, prof: torch.Tensor, layer: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top-8 ids drawn from profile layer ``layer`` (Gumbel top-k), and the global
    per-expert counts of an EP group whose ranks all see such a batch."""
    gen = torch.Generator().manual_seed(seed)
    logw = torch.log(prof[layer] / prof[layer].sum()).float()
    gumbel = -torch.log(-torch.log(torch.rand(tokens, 256, generator=gen).clamp_(1e-20, 1)))
    idx = torch.topk(logw + gumbel, 8, dim=1).indices
    return idx, planner.count_workload(idx)[0] * planner.ep_size


def first_attempt_fails(planners, prof) -> list[dict]:
    planner = dict(planners)["cube-ep32"]
    ds = kernels.DeviceSolver(planner._graph, planner.log2phy, planner.logcnt, torch.device("cuda"))
    rows = []
    for layer in (3, 50):
        _, counts = batch(planner, prof, layer, 16384, layer * 7 + 16384)
        glob = counts.to(torch.int32).cuda()
        r = ds.solve(glob, "exact")
        rows.append({"placement": "cube-ep32", "layer": layer, "tokens_per_rank": 16384,
                     "exact_rounds_max": int(r.iters[:, 0].max()), "exact_newton_max": int(r.iters[:, 1].max()),
                     "exact_certified": bool(r.status.all()),
                     "solve_exact_us": round(graph_time(lambda: ds.solve(glob, "exact")), 2)})
    return rows


def event_time(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps  # us


def graph_time(fn, reps: int = 200) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return event_time(g.replay, reps)


def graph_floor() -> dict:
    """Replay cost of graphs of a trivial kernel, in us: one kernel per graph (the floor
    under every figure here: each replays one graph), and per kernel in a graph of 20."""
    x = torch.zeros(1, device="cuda")

    def twenty() -> None:
        for _ in range(20):
            x.add_(1.0)

    return {
        "one_kernel_graph_us": round(graph_time(lambda: x.add_(1.0)), 2),
        "per_kernel_in_graph_us": round(graph_time(twenty) / 20, 2),
    }


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "planner", "skipped": "needs CUDA"}))
        return
    ext = kernels.get()
    planners, prof = cases()
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, planner in planners:
        for tokens in (4096, 16384):
            idx, counts = batch(planner, prof, 10, tokens, tokens)  # a global batch
            idx, counts = idx.cuda(), counts.cuda()
            plan = planner.plan(counts.cpu(), device="cuda")
            l2p = planner.log2phy.cuda()
            row = {"placement": name, "ranks": planner.ep_size, "slots": planner.n_routed_experts, "tokens_per_rank": tokens}
            if ext is not None:
                row["count_kernel_us"] = round(graph_time(lambda: ext.count(idx, 256, n_sms)), 2)
                c, pre, _ = ext.count(idx, 256, n_sms)
                row["map_kernel_us"] = round(graph_time(lambda: ext.map(idx, pre, c, plan.cum_frac, l2p)), 2)
                row["count_map_graph_us"] = round(
                    graph_time(lambda: ext.map(idx, *reversed(ext.count(idx, 256, n_sms)[:2]), plan.cum_frac, l2p)), 2
                )
            row["torch_count_us"] = round(event_time(lambda: count_tokens(idx, 256, n_sms)), 2)
            row["torch_redirect_graph_us"] = round(graph_time(lambda: redirect(idx, plan.cum_frac, l2p, check=False)), 2)
            solve = []
            for _ in range(50):
                t0 = time.perf_counter()
                planner.plan(counts.cpu(), device="cuda")
                solve.append((time.perf_counter() - t0) * 1e3)
            row["host_solve_ms"] = round(statistics.median(solve), 3)
            if ext is not None:
                ds = kernels.DeviceSolver(planner._graph, planner.log2phy, planner.logcnt, torch.device("cuda"))
                glob = counts.to(torch.int32)
                row["solve_exact_us"] = round(graph_time(lambda: ds.solve(glob, "exact")), 2)
                row["solve_ipm_us"] = round(graph_time(lambda: ds.solve(glob, "ipm")), 2)
                ds.use_warp = False  # the block kernels, for comparison
                row["solve_exact_block_us"] = round(graph_time(lambda: ds.solve(glob, "exact")), 2)
                row["solve_ipm_block_us"] = round(graph_time(lambda: ds.solve(glob, "ipm")), 2)
                ds.use_warp = True
                ex, ip = ds.solve(glob, "exact"), ds.solve(glob, "ipm")
                opt = float(ex.rank_loads.max())
                row["exact_certified"] = bool(ex.status.all())
                row["exact_rounds_max"] = int(ex.iters[:, 0].max())
                row["exact_newton_max"] = int(ex.iters[:, 1].max())
                row["ipm_converged"] = bool(ip.status.all())
                row["ipm_iters_max"] = int(ip.iters[:, 0].max())
                row["ipm_gap"] = float(ip.rank_loads.max()) / opt - 1.0 if opt > 0 else 0.0
                row["solve_ipm_tol1e5_us"] = round(graph_time(lambda: ds.solve(glob, "ipm", ipm_tol=1e-5)), 2)
                ip5 = ds.solve(glob, "ipm", ipm_tol=1e-5)
                row["ipm_tol1e5_converged"] = bool(ip5.status.all())
                row["ipm_tol1e5_iters_max"] = int(ip5.iters[:, 0].max())
                row["ipm_tol1e5_gap"] = float(ip5.rank_loads.max()) / opt - 1.0 if opt > 0 else 0.0
                row["run_graph_us"] = round(graph_time(lambda: planner.run(idx)), 2)
                eager = []
                for _ in range(30):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    planner.run(idx)
                    torch.cuda.synchronize()
                    eager.append((time.perf_counter() - t0) * 1e6)
                row["run_eager_us"] = round(statistics.median(eager), 1)
            # the previous release's run(): GPU count, counts to the host, host solve,
            # GPU map of the host's shares
            runs = []
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                local = planner.count_workload(idx)[0]
                host_plan = planner.plan(local.cpu(), device=idx.device)
                planner.redirect(idx, host_plan)
                torch.cuda.synchronize()
                runs.append((time.perf_counter() - t0) * 1e3)
            row["host_run_ms"] = round(statistics.median(runs), 3)
            rows.append(row)
    print(json.dumps({
        "benchmark": "planner", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "kernels": ext is not None, "n_sms": n_sms, "graph_floor": graph_floor(), "rows": rows,
        "first_attempt_fails": first_attempt_fails(planners, prof) if ext is not None else [],
    }))


if __name__ == "__main__":
    main()
