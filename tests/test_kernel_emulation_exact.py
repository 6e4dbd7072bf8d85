"""The exact solve kernel's code (csrc/solve_exact.cuh), built for the CPU, against
the numpy reference (lplb_plugin/solvers/exact.py) and HiGHS.

The CUDA build of the same source is checked against the same reference on a GPU in
tests/gpu/test_solve_kernels.py; this file keeps the algorithm under test in CI.
"""

import pytest
import torch

import kernel_emulation as emu
from instances import instances, random_placement, rel_diff
from lplb_plugin import topology
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.problem import SplitGraph
from lplb_plugin.solvers.exact import solve_exact
from lplb_plugin.solvers.highs import solve_highs

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++ compiler")


def _check_valid(graph, loads, flow, rank_load):
    assert bool((flow >= 0).all())
    sums = torch.zeros(graph.n_movable, dtype=torch.float64).index_add_(0, graph.edge_expert, flow)
    demand = graph.demands(loads)
    assert torch.allclose(sums, demand, rtol=1e-12, atol=1e-9)
    assert torch.allclose(rank_load, graph.rank_loads(graph.fixed_loads(loads), flow), rtol=1e-12, atol=1e-9)


def test_same_answer_as_reference_on_600_instances():
    worst = 0.0
    for inst in instances(600, seed=11):
        ref = solve_exact(inst.graph, inst.loads)
        got = emu.solve_host(inst.graph, inst.loads)
        assert bool(got.status.all()) == ref.certified, inst.name
        scale = float(inst.loads.max())
        d = rel_diff(got.edge_flow, ref.edge_flow, scale)
        worst = max(worst, d)
        assert d <= 1e-9, (inst.name, d)
        _check_valid(inst.graph, inst.loads, got.edge_flow, got.rank_load)
        assert rel_diff(got.rank_load, ref.rank_loads, scale) <= 1e-9
    assert worst <= 1e-9


def test_every_component_bound_is_the_highs_optimum():
    for inst in instances(60, seed=5):
        got = emu.solve_host(inst.graph, inst.loads)
        comp = got.arrays
        for c in range(comp.n_comp):
            lo, hi = int(comp.comp_rank_off[c]), int(comp.comp_rank_off[c + 1])
            ranks = comp.rank_global[lo:hi].long()
            if int(comp.comp_exp_off[c + 1]) == int(comp.comp_exp_off[c]):
                continue
            t, _ = solve_highs(inst.graph, inst.loads, component=int(inst.graph.component[ranks[0]]))
            got_max = float(got.rank_load[ranks].max())
            assert abs(got_max - t) <= 1e-9 * max(t, 1.0), inst.name
            assert abs(float(got.bound[c]) - t) <= 1e-9 * max(t, 1.0), inst.name


@pytest.mark.parametrize("n_ranks", [96, 160])
def test_large_component(n_ranks):
    """One component far above 64 ranks (beyond shared memory for the Newton matrix
    on the GPU at 160): same answer as the reference."""
    gen = torch.Generator().manual_seed(n_ranks)
    p = random_placement(gen, 4 * n_ranks, n_ranks, 6)
    g = SplitGraph.from_placement(p)
    loads = ((torch.rand(4 * n_ranks, generator=gen, dtype=torch.float64) ** 4) * 1e5).round()
    ref = solve_exact(g, loads)
    got = emu.solve_host(g, loads)
    assert int(got.arrays.max_ranks) >= 0.75 * n_ranks
    assert bool(got.status.all()) == ref.certified
    assert rel_diff(got.edge_flow, ref.edge_flow, float(loads.max())) <= 1e-9


def test_degenerate_inputs_and_no_movable_expert():
    gen = torch.Generator().manual_seed(0)
    p = random_placement(gen, 16, 4, 6)
    g = SplitGraph.from_placement(p)
    for loads in (
        torch.zeros(16, dtype=torch.float64),
        torch.eye(16, dtype=torch.float64)[3] * 1e6,
        torch.full((16,), 1e-3, dtype=torch.float64),
        torch.arange(16, dtype=torch.float64) ** 4,
    ):
        ref = solve_exact(g, loads)
        got = emu.solve_host(g, loads)
        assert got.status.all()
        assert rel_diff(got.edge_flow, ref.edge_flow, float(loads.max())) <= 1e-9
    p = ExpertPlacement.from_phy2log(torch.arange(8), 4, 8)
    g = SplitGraph.from_placement(p)
    got = emu.solve_host(g, torch.arange(8, dtype=torch.float64))
    assert got.status.all() and got.edge_flow.numel() == 0
    assert got.rank_load.tolist() == [1.0, 5.0, 9.0, 13.0]


def test_no_round_left_gives_the_valid_even_split_uncertified():
    for inst in instances(20, seed=4):
        got = emu.solve_host(inst.graph, inst.loads, max_rounds=0)
        has_edges = (got.arrays.comp_edge_off[1:] > got.arrays.comp_edge_off[:-1]).numpy()
        assert not got.status[has_edges].any()
        _check_valid(inst.graph, inst.loads, got.edge_flow, got.rank_load)
        assert torch.allclose(got.edge_flow, inst.graph.even_flow(inst.loads), rtol=1e-12, atol=1e-9)


def test_upstream_topologies_certify_in_one_round_usually():
    """Cost model behind the GPU timings: on upstream topologies with real loads the
    first certification attempt (4 FISTA sweeps) almost always succeeds."""
    rounds = []
    for name, r2o, ep in [("cube", topology.cube(), 32), ("ring", topology.ring(8), 8)]:
        extra = 2 if name == "cube" else 1
        p = ExpertPlacement.from_r2o(r2o, 256 + ep * extra, 256, ep)
        g = SplitGraph.from_placement(p)
        for inst in instances(40, seed=2):
            got = emu.solve_host(g, inst.loads)
            assert got.status.all()
            rounds.extend(got.iters[:, 0].tolist())
    assert sum(r <= 1 for r in rounds) >= 0.8 * len(rounds)


def test_failed_attempts_stop_early():
    assert emu.failed_attempts_check("exact") >= 1
