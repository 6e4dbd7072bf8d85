"""The solve kernels' code (csrc/solve_*.cuh), built for the CPU through
tests/kernel_emulation.py, against the torch / numpy references.

block_ops.cuh makes each kernel's source a serial C++ program as well, so the kernels'
algorithms stay under test in CI without a GPU; the CUDA builds are checked against the
same references on a GPU in tests/gpu/test_solve_kernels.py.
"""

import statistics

import pytest
import torch

import kernel_emulation as emu
from instances import instances, random_placement
from lplb_plugin import topology
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.problem import SplitGraph
from lplb_plugin.solvers.ipm import solve_ipm

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++ compiler")


# ---------------------------------------------------------------------------- ipm
# csrc/solve_ipm.cuh against lplb_plugin.solvers.ipm.solve_ipm.  Same algorithm, same
# path: the kernel runs each component alone where the reference batches them, so the
# two differ only by the rounding of sums taken in another order.  The flows agree
# too (an IPM converges to the same point of the optimal face when it follows the same
# path, even where the LP optimum is not unique): measured about 1e-8 of the max load.


def _ipm_valid(graph, loads, got, rtol=1e-9):
    """Non-negative, every movable expert's edges sum to its demand, rank loads and
    bounds are those of the flow."""
    flow = got.edge_flow
    assert bool(torch.isfinite(flow).all()) and bool((flow >= 0).all())
    sums = torch.zeros(graph.n_movable, dtype=torch.float64).index_add_(0, graph.edge_expert, flow)
    demand = graph.demands(loads)
    dmax = float(demand.max()) if demand.numel() else 0.0
    assert torch.allclose(sums, demand, rtol=rtol, atol=rtol * max(dmax, 1.0))
    rl = graph.rank_loads(graph.fixed_loads(loads), flow)
    assert torch.allclose(got.rank_load, rl, rtol=1e-12, atol=1e-9 * max(float(loads.max()), 1.0))
    arr = got.arrays
    for c in range(arr.n_comp):
        ranks = arr.rank_global[int(arr.comp_rank_off[c]) : int(arr.comp_rank_off[c + 1])].long()
        assert float(got.bound[c]) == float(got.rank_load[ranks].max())


def _ipm_compare(graph, loads, got, ref, tol=1e-5):
    """Objective and flow differences relative to the reference objective; asserts
    every component's max load agrees too."""
    obj = float(got.bound.max()) if got.bound.size else 0.0
    scale = max(abs(ref.objective), 1e-12)
    d_obj = abs(obj - ref.objective) / scale
    d_flow = float((got.edge_flow - ref.edge_flow).abs().max()) / scale if graph.n_edges else 0.0
    assert d_obj <= tol, (d_obj, obj, ref.objective)
    # each component reaches the reference's own value, not just the worst one
    ref_rl = graph.rank_loads(graph.fixed_loads(loads), ref.edge_flow)
    arr = got.arrays
    for c in range(arr.n_comp):
        ranks = arr.rank_global[int(arr.comp_rank_off[c]) : int(arr.comp_rank_off[c + 1])].long()
        assert abs(float(got.bound[c]) - float(ref_rl[ranks].max())) <= tol * scale
    return d_obj, d_flow


def test_ipm_matches_torch_ipm_on_200_instances():
    worst_obj = worst_flow = 0.0
    iters, iter_diff, n = [], 0, 0
    for inst in instances(200, seed=7):
        g, loads = inst.graph, inst.loads
        ref = solve_ipm(g, loads)
        got = emu.solve_host(g, loads, "ipm")
        _ipm_valid(g, loads, got)
        d_obj, d_flow = _ipm_compare(g, loads, got, ref)
        assert d_flow <= 1e-5, (inst.name, d_flow)
        worst_obj, worst_flow = max(worst_obj, d_obj), max(worst_flow, d_flow)
        assert bool(got.status.all()) == ref.converged, inst.name
        assert (got.iters[:, 1] == 0).all()
        # the reference reports the batch's iterations: the slowest component's
        it = int(got.iters[:, 0].max()) if got.iters.size else 0
        assert abs(it - ref.iterations) <= 1, (inst.name, it, ref.iterations)
        iter_diff += it != ref.iterations
        iters.append(it)
        n += 1
    assert n == 200
    assert iter_diff <= 2
    print(f"\nipm host build vs torch IPM over {n} instances: worst objective rel {worst_obj:.2e}, "
          f"worst flow rel {worst_flow:.2e}, iterations mean {statistics.mean(iters):.2f} max {max(iters)}, "
          f"{iter_diff} iteration counts differ")


@pytest.mark.parametrize("n_ranks", [96, 160])
def test_ipm_large_component(n_ranks):
    """One component far above 64 ranks (the whole block factors the Schur matrix; on
    the GPU at 160 it lives in global memory)."""
    gen = torch.Generator().manual_seed(n_ranks)
    p = random_placement(gen, 4 * n_ranks, n_ranks, 6)
    g = SplitGraph.from_placement(p)
    loads = ((torch.rand(4 * n_ranks, generator=gen, dtype=torch.float64) ** 4) * 1e5).round()
    ref = solve_ipm(g, loads)
    got = emu.solve_host(g, loads, "ipm")
    assert int(got.arrays.max_ranks) >= 0.75 * n_ranks
    assert got.status.all() and ref.converged
    _ipm_valid(g, loads, got)
    _, d_flow = _ipm_compare(g, loads, got, ref)
    assert d_flow <= 1e-5


def _ipm_cube_ep32():
    p = ExpertPlacement.from_r2o(topology.cube(), 256 + 32 * 2, 256, 32)
    return p, SplitGraph.from_placement(p)


def test_ipm_degenerate_loads():
    """Zero loads, one hot expert (movable or not), a tiny and a steep load vector."""
    p, g = _ipm_cube_ep32()
    movable = int(g.movable[3])
    fixed_only = int(torch.nonzero(torch.isin(torch.arange(256), g.movable, invert=True))[0])
    cases = {
        "zero": torch.zeros(256, dtype=torch.float64),
        "hot-movable": torch.eye(256, dtype=torch.float64)[movable] * 1e6,
        "hot-fixed": torch.eye(256, dtype=torch.float64)[fixed_only] * 1e6,
        "tiny": torch.full((256,), 1e-3, dtype=torch.float64),
        "steep": torch.arange(256, dtype=torch.float64) ** 4,
    }
    for name, loads in cases.items():
        ref = solve_ipm(g, loads)
        got = emu.solve_host(g, loads, "ipm")
        _ipm_valid(g, loads, got)
        _, d_flow = _ipm_compare(g, loads, got, ref)
        assert d_flow <= 1e-5, name
        assert got.status.all() and ref.converged, name
    # zero loads: nothing to solve, the zero flow, no iteration
    got = emu.solve_host(g, cases["zero"], "ipm")
    assert (got.edge_flow == 0).all() and (got.iters == 0).all() and (got.bound == 0).all()
    # one hot movable expert: split evenly over its two ranks, everything else idle
    got = emu.solve_host(g, cases["hot-movable"], "ipm")
    assert abs(float(got.bound.max()) - 5e5) <= 1e-6 * 5e5


def test_ipm_no_movable_expert():
    p = ExpertPlacement.from_phy2log(torch.arange(8), 4, 8)
    g = SplitGraph.from_placement(p)
    loads = torch.arange(8, dtype=torch.float64)
    got = emu.solve_host(g, loads, "ipm")
    ref = solve_ipm(g, loads)
    assert got.edge_flow.numel() == 0 and got.status.all() and (got.iters == 0).all()
    assert got.rank_load.tolist() == [1.0, 5.0, 9.0, 13.0]
    assert got.bound.tolist() == [1.0, 5.0, 9.0, 13.0]
    assert float(got.bound.max()) == ref.objective


@pytest.mark.parametrize("max_iters", [0, 1, 3])
def test_ipm_iteration_cap(max_iters):
    """Too few iterations: not converged, still a valid split, the reference's one."""
    for inst in instances(30, seed=4):
        g, loads = inst.graph, inst.loads
        got = emu.solve_host(g, loads, "ipm", max_iters=max_iters)
        ref = solve_ipm(g, loads, max_iters=max_iters)
        _ipm_valid(g, loads, got)
        _, d_flow = _ipm_compare(g, loads, got, ref)
        assert d_flow <= 1e-5, inst.name
        assert bool(got.status.all()) == ref.converged, inst.name
        assert (got.iters[:, 0] <= max_iters).all()
        arr = got.arrays
        for c in range(arr.n_comp):
            ranks = arr.rank_global[int(arr.comp_rank_off[c]) : int(arr.comp_rank_off[c + 1])].long()
            solved = int(arr.comp_edge_off[c + 1]) > int(arr.comp_edge_off[c]) and float(got.rank_load[ranks].sum()) > 0
            if solved and max_iters <= 1:  # one step never meets the stop test
                assert got.status[c] == 0 and got.iters[c, 0] == max_iters, inst.name
            if not solved:
                assert got.status[c] == 1 and got.iters[c, 0] == 0, inst.name
        if max_iters == 0:  # the starting point, finalised: the even split over edges
            assert torch.allclose(got.edge_flow, ref.edge_flow, rtol=1e-12, atol=1e-9)


def test_ipm_tolerance_is_honoured():
    """A looser tol stops earlier, with an objective within tol of the tight one."""
    for inst in instances(40, seed=9):
        g, loads = inst.graph, inst.loads
        tight = emu.solve_host(g, loads, "ipm", tol=1e-9)
        loose = emu.solve_host(g, loads, "ipm", tol=1e-3)
        ref = solve_ipm(g, loads, tol=1e-3)
        assert loose.status.all() and tight.status.all()
        assert (loose.iters[:, 0] <= tight.iters[:, 0]).all()
        t, l = float(tight.bound.max()), float(loose.bound.max())
        assert l >= t - 1e-9 * max(t, 1.0) and l <= t * (1 + 1e-3) + 1e-9
        _ipm_compare(g, loads, loose, ref)
