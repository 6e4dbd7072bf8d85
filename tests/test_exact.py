"""Exact solver: optimal per component against HiGHS, valid, certified, unique."""

import numpy as np
import pytest
import torch

from instances import instances, random_placement, two_copy_placements, varied_loads
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.problem import SplitGraph
from lplb_plugin.solvers.exact import solve_exact
from lplb_plugin.solvers.highs import solve_highs


def assert_valid_split(graph: SplitGraph, loads: torch.Tensor, flow: torch.Tensor) -> None:
    assert flow.dtype == torch.float64 and flow.shape == (graph.n_edges,)
    assert bool((flow >= 0).all())
    sums = torch.zeros(graph.n_movable, dtype=torch.float64).index_add_(0, graph.edge_expert, flow)
    demand = graph.demands(loads)
    assert torch.allclose(sums, demand, rtol=1e-12, atol=1e-9 * max(float(demand.max()) if demand.numel() else 0.0, 1.0))


def test_exact_matches_highs_on_600_instances():
    worst = 0.0
    n = 0
    for inst in instances(600, seed=11):
        t_highs, _ = solve_highs(inst.graph, inst.loads)
        r = solve_exact(inst.graph, inst.loads)
        assert r.certified, inst.name
        assert_valid_split(inst.graph, inst.loads, r.edge_flow)
        rel = abs(r.objective - t_highs) / max(t_highs, 1e-12)
        worst = max(worst, rel)
        assert rel <= 1e-9, (inst.name, r.objective, t_highs)
        # the loads reported are those of the flow
        rl = inst.graph.rank_loads(inst.graph.fixed_loads(inst.loads), r.edge_flow)
        assert torch.allclose(rl, r.rank_loads, rtol=1e-12, atol=1e-9)
        n += 1
    assert n == 600
    print(f"worst relative gap to HiGHS over {n} instances: {worst:.2e}")


def test_exact_certifies_steep_loads_with_vanishing_experts():
    """The GPU tests' varied load vectors (up to ~27 orders of magnitude) on the two-copy
    placements, drawn in the same order.  One of them (cube EP32, k = 4) has an expert
    of demand ~6e-24 whose flow vanishes within the convergence tolerance: it takes the
    even split instead of failing the exact expert sums, so every vector certifies and
    reaches HiGHS's optimum."""
    gen = torch.Generator().manual_seed(5)
    for name, p in two_copy_placements():
        g = SplitGraph.from_placement(p)
        for k in range(6):
            loads = varied_loads(gen, p.n_logical, k)
            r = solve_exact(g, loads)
            assert r.certified, (name, k)
            assert_valid_split(g, loads, r.edge_flow)
            t_highs, _ = solve_highs(g, loads)
            assert abs(r.objective - t_highs) <= 1e-9 * max(t_highs, 1e-12), (name, k, r.objective, t_highs)


def test_every_component_reaches_its_own_optimum():
    for inst in instances(120, seed=5):
        r = solve_exact(inst.graph, inst.loads)
        for c in torch.unique(inst.graph.component).tolist():
            in_c = inst.graph.component == c
            if not bool(in_c.any()):
                continue
            t_c, _ = solve_highs(inst.graph, inst.loads, component=c)
            mine = float(r.rank_loads[in_c].max())
            assert abs(mine - t_c) <= 1e-9 * max(t_c, 1.0), (inst.name, c, mine, t_c)
            # the certificate's lower bound is the component optimum
            assert abs(float(r.component_bound[in_c].max()) - t_c) <= 1e-9 * max(t_c, 1.0)


def _relabel(placement: ExpertPlacement, gen: torch.Generator):
    """Same problem with experts renamed and ranks (with their slots) permuted."""
    R, S, L = placement.n_ranks, placement.slots_per_rank, placement.n_logical
    expert_perm = torch.randperm(L, generator=gen)  # old -> new name
    rank_perm = torch.randperm(R, generator=gen)  # new rank i holds old rank rank_perm[i]
    old_slots = (rank_perm.unsqueeze(1) * S + torch.arange(S)).reshape(-1)
    new_phy2log = expert_perm[placement.phy2log[old_slots]]
    return ExpertPlacement.from_phy2log(new_phy2log, R, L), expert_perm, old_slots


@pytest.mark.parametrize("seed", range(12))
def test_answer_is_unique_under_relabelling(seed):
    """The tie-break is a strictly convex projection, so renaming experts and permuting
    ranks must give the same split (an index-based tie-break would not)."""
    gen = torch.Generator().manual_seed(seed)
    for inst in instances(3, seed=100 + seed):
        p = inst.placement
        r = solve_exact(inst.graph, inst.loads)
        x = inst.graph.slot_split(inst.loads, r.edge_flow)
        q, expert_perm, old_slots = _relabel(p, gen)
        gq = SplitGraph.from_placement(q)
        new_loads = torch.empty_like(inst.loads)
        new_loads[expert_perm] = inst.loads
        rq = solve_exact(gq, new_loads)
        xq = gq.slot_split(new_loads, rq.edge_flow)
        scale = max(float(inst.loads.max()), 1.0)
        assert torch.allclose(xq, x[old_slots], rtol=0, atol=1e-7 * scale), inst.name


def test_answer_does_not_depend_on_phase_one_budget():
    """Starting the certificate later (more phase-1 iterations) gives the same split."""
    from lplb_plugin.solvers import exact

    for inst in instances(60, seed=21):
        a = solve_exact(inst.graph, inst.loads)
        saved = exact._ROUNDS
        try:
            exact._ROUNDS = (200, 800)
            b = solve_exact(inst.graph, inst.loads)
        finally:
            exact._ROUNDS = saved
        assert a.certified and b.certified
        scale = max(float(inst.loads.max()), 1.0)
        assert torch.allclose(a.edge_flow, b.edge_flow, rtol=0, atol=1e-7 * scale), inst.name


def test_projection_of_even_split_when_already_balanced():
    """Uniform loads on a symmetric topology: the even split is optimal, so it is the
    answer (the projection moves nothing)."""
    from lplb_plugin import topology

    p = ExpertPlacement.from_r2o(topology.cube(), 80, 64, 8)
    g = SplitGraph.from_placement(p)
    loads = torch.full((64,), 100.0, dtype=torch.float64)
    r = solve_exact(g, loads)
    x = g.slot_split(loads, r.edge_flow)
    assert torch.allclose(x[p.log2phy[:, 0]], torch.where(p.logcnt == 2, 50.0, 100.0).double())


def test_degenerate_inputs():
    gen = torch.Generator().manual_seed(0)
    p = random_placement(gen, 16, 4, 6)
    g = SplitGraph.from_placement(p)
    for loads in (
        torch.zeros(16, dtype=torch.float64),
        torch.eye(16, dtype=torch.float64)[3] * 1e6,
        torch.full((16,), 1e-3, dtype=torch.float64),
        torch.arange(16, dtype=torch.float64) ** 4,
    ):
        r = solve_exact(g, loads)
        assert r.certified
        assert_valid_split(g, loads, r.edge_flow)
        t, _ = solve_highs(g, loads)
        assert abs(r.objective - t) <= 1e-9 * max(t, 1e-12)


def test_no_movable_expert():
    p = ExpertPlacement.from_phy2log(torch.arange(8), 4, 8)
    g = SplitGraph.from_placement(p)
    loads = torch.arange(8, dtype=torch.float64)
    r = solve_exact(g, loads)
    assert r.certified and r.edge_flow.numel() == 0
    assert r.objective == 13.0


def test_fallback_is_valid_and_not_certified():
    """With no certification attempt left the solver returns its best valid split and
    says so (the caller warns)."""
    from lplb_plugin.solvers import exact

    for inst in instances(40, seed=4):
        saved = exact._ROUNDS
        try:
            exact._ROUNDS = ()
            r = solve_exact(inst.graph, inst.loads)
        finally:
            exact._ROUNDS = saved
        assert not r.certified
        assert_valid_split(inst.graph, inst.loads, r.edge_flow)
        t, _ = solve_highs(inst.graph, inst.loads)
        assert r.objective >= t * (1 - 1e-12) - 1e-9


def test_attempt_below_the_optimum_stops_early():
    """A bound below a component's optimum has no valid split under it: the projection's
    dual then exceeds sum mult demand^2 (weak duality) and the attempt returns after a
    few Newton steps, not after the iteration cap (same answers either way)."""
    from lplb_plugin.solvers import exact as ex

    for inst in list(instances(30, seed=11))[::3]:
        r = solve_exact(inst.graph, inst.loads)
        st = ex._structure(inst.graph)
        if st.E == 0:
            continue
        fixed = inst.graph.fixed_loads(inst.loads).numpy()
        demand = inst.graph.demands(inst.loads).numpy()
        if not demand.any():
            continue
        x0 = np.where(st.mask, (demand / np.maximum(st.slots, 1))[:, None], 0.0)
        scale = max(float(demand.max()), float(fixed.max()))
        low = r.component_bound.numpy() * (1.0 - 1e-3)
        _, _, _, ok, its = ex._project(st, fixed, demand, x0, low, np.zeros(st.M), np.zeros(st.R), scale)
        assert not ok, inst.name
        assert its < ex._NEWTON_ITERS, (inst.name, its)
