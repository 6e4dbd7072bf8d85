"""The one-warp solvers, exact (csrc/solve_pair.cuh, two-copy) and IPM
(csrc/solve_ipm_pair.cuh, two-copy; csrc/solve_ipm_warp.cuh, any placement), built for
the CPU with their warp emulated by 32 threads (csrc/warp_emulation.h), against the
references and against the general kernels' CPU builds.

The emulation also checks that every shuffle and __syncwarp is reached by all 32 lanes
from the same line (a divergent one aborts), so a warp-synchronisation bug that would
hang the GPU fails here.  The CUDA build is checked on a GPU in
tests/gpu/test_solve_kernels.py.
"""

import numpy as np
import pytest
import torch

import kernel_emulation as emu
from instances import (
    assert_warp_rounds,
    takes_subsets,
    chain_placement,
    instances,
    mult2_placement,
    rel_diff,
    varied_loads,
)
from lplb_plugin.component_arrays import ComponentArrays
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.problem import SplitGraph
from lplb_plugin.solvers.exact import solve_exact
from lplb_plugin.solvers.ipm import solve_ipm

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++ compiler")


def _pair_instances(count: int, seed: int):
    """The instances(count, seed) the one-warp two-copy solvers take."""
    return (inst for inst in instances(count, seed=seed) if emu.fits_pair(inst.graph))


def test_same_answer_as_reference_and_general_kernel():
    """The answer of the reference and of the general kernel on every two-copy instance
    that fits; the general kernel's status, and its rounds as assert_warp_rounds has
    them; without the enumerated bound (rounds_only), its rounds everywhere."""
    seen = 0
    worst = 0.0
    for inst in _pair_instances(400, 17):
        seen += 1
        ref = solve_exact(inst.graph, inst.loads)
        got = emu.solve_host(inst.graph, inst.loads, "pair")
        gen = emu.solve_host(inst.graph, inst.loads, "exact")
        scale = float(inst.loads.max())
        assert bool(got.status.all()) == ref.certified, inst.name
        assert (got.status == gen.status).all(), inst.name
        assert_warp_rounds(got.iters, gen.iters, got.status, got.arrays, inst.name)
        rnd = emu.solve_host(inst.graph, inst.loads, "pair", rounds_only=True)
        assert (rnd.status == gen.status).all() and (rnd.iters[:, 0] == gen.iters[:, 0]).all(), inst.name
        assert rel_diff(rnd.edge_flow, gen.edge_flow, scale) <= 1e-10, inst.name
        d = rel_diff(got.edge_flow, ref.edge_flow, scale)
        worst = max(worst, d)
        assert d <= 1e-9, (inst.name, d)
        assert rel_diff(got.edge_flow, gen.edge_flow, scale) <= 1e-10, inst.name
        assert rel_diff(got.rank_load, ref.rank_loads, scale) <= 1e-9, inst.name
        assert abs(got.bound - gen.bound).max() <= 1e-12 * max(scale, 1.0), inst.name
    assert seen >= 100, seen
    print(f"pair solver: {seen} two-copy instances, worst relative flow difference {worst:.2e}")


def test_edge_multiplicity_two_and_fallback():
    p = mult2_placement()
    g = SplitGraph.from_placement(p)
    assert emu.fits_pair(g) and int(g.edge_mult.max()) == 2
    gen = torch.Generator().manual_seed(2)
    for k in range(20):
        loads = (torch.rand(40, generator=gen, dtype=torch.float64) ** (1 + k % 4)) * 1000
        if k % 2:
            loads = loads.round()
        ref = solve_exact(g, loads)
        got = emu.solve_host(g, loads, "pair")
        assert bool(got.status.all()) == ref.certified
        assert rel_diff(got.edge_flow, ref.edge_flow, float(loads.max())) <= 1e-9
    # no certification round: the even split, reported as a fallback
    loads = loads.clamp_min(1.0)
    got = emu.solve_host(g, loads, "pair", max_rounds=0)
    assert not bool(got.status.any())
    assert torch.allclose(got.edge_flow, g.even_flow(loads), rtol=1e-12, atol=1e-9)


def test_components_too_large_are_refused():
    """The caller must route larger components to the general kernel (the CUDA
    launcher does); the CPU build says so instead of solving."""
    inst = next(i for i in instances(400, seed=17) if not emu.fits_pair(i.graph) and
                ComponentArrays.from_graph(i.graph).two_copy)
    with pytest.raises(AssertionError):
        emu.solve_host(inst.graph, inst.loads, "pair")


@pytest.mark.parametrize("case", ["no-replica", "two-ranks", "ring2"])
def test_degenerate_placements(case):
    """No movable expert at all (every graph is then two-copy), a single replicated
    expert on two ranks, a two-rank ring; zero, small and one-hot loads."""
    from lplb_plugin import topology

    p = {
        "no-replica": lambda: ExpertPlacement.from_phy2log(torch.arange(16), 4, 16),
        "two-ranks": lambda: ExpertPlacement.from_phy2log(torch.tensor([0, 1, 2, 0]), 2, 3),
        "ring2": lambda: ExpertPlacement.from_r2o(topology.ring(2), 10, 8, 2),
    }[case]()
    g = SplitGraph.from_placement(p)
    assert emu.fits_pair(g)
    L = p.n_logical
    for loads in (torch.zeros(L, dtype=torch.float64), torch.arange(L, dtype=torch.float64) + 1,
                  torch.tensor([1e6] + [0.0] * (L - 1), dtype=torch.float64)):
        ref = solve_exact(g, loads)
        got = emu.solve_host(g, loads, "pair")
        assert bool(got.status.all()) and ref.certified
        assert rel_diff(got.edge_flow, ref.edge_flow, float(loads.max())) <= 1e-12
        assert rel_diff(got.rank_load, ref.rank_loads, float(loads.max())) <= 1e-12


def test_failed_attempts_stop_early():
    assert emu.failed_attempts_check("pair", emu.fits_pair) >= 1


# ---------------------------------------------------------------------------- ipm
# csrc/solve_ipm_pair.cuh runs ipm::solve's iteration with the same formulas in the
# same order; only sums in another order and the elimination's arithmetic differ, so
# iteration counts and status must be equal and values equal to rounding.


def _ipm_pair_vs_general(graph, loads, method="ipm_pair", **options):
    got = emu.solve_host(graph, loads, method, **options)
    gen = emu.solve_host(graph, loads, "ipm", **options)
    scale = max(float(gen.bound.max()) if gen.bound.size else 0.0, 1e-12)
    assert (got.status == gen.status).all() and (got.iters == gen.iters).all()
    assert rel_diff(got.edge_flow, gen.edge_flow, scale) <= 1e-10
    assert rel_diff(got.rank_load, gen.rank_load, scale) <= 1e-10
    assert abs(got.bound - gen.bound).max() <= 1e-12 * scale
    return got


def test_ipm_same_iterations_as_general_kernel_and_torch_objective():
    seen = helped = 0
    for inst in _pair_instances(120, 7):
        seen += 1
        helped += ComponentArrays.from_graph(inst.graph).max_ranks > 16  # (helper warps)
        got = _ipm_pair_vs_general(inst.graph, inst.loads)
        ref = solve_ipm(inst.graph, inst.loads)
        assert bool(got.status.all()) == ref.converged, inst.name
        assert abs(float(got.bound.max()) - ref.objective) <= 1e-5 * max(abs(ref.objective), 1e-12), inst.name
    assert seen >= 40 and helped >= 3, (seen, helped)


def test_ipm_caps_zero_loads_and_multiplicity_two():
    p = mult2_placement()
    g = SplitGraph.from_placement(p)
    gen = torch.Generator().manual_seed(3)
    loads = (torch.rand(40, generator=gen, dtype=torch.float64) ** 3) * 1000
    for cap in (0, 1, 2, 100):  # 0: the starting point, finalised
        got = _ipm_pair_vs_general(g, loads, max_iters=cap)
        assert int(got.iters[:, 0].max()) <= cap
    zero = _ipm_pair_vs_general(g, torch.zeros(40, dtype=torch.float64))
    assert bool(zero.status.all()) and float(zero.edge_flow.abs().max()) == 0.0
    # a loaded expert with its two copies on idle ranks: the even split's start
    one = torch.zeros(40, dtype=torch.float64)
    one[int(g.movable[0])] = 7.0
    _ipm_pair_vs_general(g, one)


def test_ipm_warp_same_iterations_as_general_kernel_any_placement():
    """csrc/solve_ipm_warp.cuh (one warp, experts with any number of copies) against
    the block IPM's CPU build on every instance with at most 32 edges per component,
    EPLB placements included, and with iteration caps."""
    seen = eplb = 0
    for inst in instances(120, seed=9):
        a = ComponentArrays.from_graph(inst.graph)
        if a.max_edges > 32:
            continue
        seen += 1
        eplb += not a.two_copy
        got = _ipm_pair_vs_general(inst.graph, inst.loads, method="ipm_warp")
        ref = solve_ipm(inst.graph, inst.loads)
        assert bool(got.status.all()) == ref.converged, inst.name
        if seen % 10 == 0:
            for cap in (0, 2):
                _ipm_pair_vs_general(inst.graph, inst.loads, method="ipm_warp", max_iters=cap)
    assert seen >= 30 and eplb >= 10, (seen, eplb)


def test_ipm_warp_with_helper_warps():
    """A 17-rank component within the any-placement kernel's 32 edges (chain_placement):
    its Newton systems go to the helper warps' inverse (csrc/team_inverse.cuh, the block
    emulated as 5 warps).  Same iterations and status as the block IPM, flows to
    rounding, the torch IPM's objective; with iteration caps and zero loads."""
    p = chain_placement(17)
    g = SplitGraph.from_placement(p)
    assert ComponentArrays.from_graph(g).max_ranks == 17
    gen = torch.Generator().manual_seed(4)
    for k in range(6):
        loads = varied_loads(gen, p.n_logical, k)
        got = _ipm_pair_vs_general(g, loads, method="ipm_warp")
        ref = solve_ipm(g, loads)
        assert bool(got.status.all()) == ref.converged, k
        assert abs(float(got.bound.max()) - ref.objective) <= 1e-5 * max(abs(ref.objective), 1e-12), k
    for cap in (0, 2):
        _ipm_pair_vs_general(g, loads, method="ipm_warp", max_iters=cap)
    zero = _ipm_pair_vs_general(g, torch.zeros(p.n_logical, dtype=torch.float64), method="ipm_warp")
    assert bool(zero.status.all()) and float(zero.edge_flow.abs().max()) == 0.0


def test_ipm_components_too_large_are_refused():
    inst = next(i for i in instances(400, seed=17) if not emu.fits_pair(i.graph) and
                ComponentArrays.from_graph(i.graph).two_copy)
    with pytest.raises(AssertionError):
        emu.solve_host(inst.graph, inst.loads, "ipm_pair")
    with pytest.raises(AssertionError):
        emu.solve_host(inst.graph, inst.loads, "ipm_warp")


# ------------------------------------------------------------- enumerated bound


def _best_rank_set_bounds(graph: SplitGraph, loads: torch.Tensor, arrays: ComponentArrays) -> list[float]:
    """Per component, max over its nonempty rank sets U of (F(U) + W(U)) / |U| (F: the
    fixed loads of U's ranks, W: the demand of the movable experts with every copy in
    U), by brute force: the LP optimum (docs/solvers.md)."""
    fixed = graph.fixed_loads(loads).tolist()
    dem = graph.demands(loads).tolist()
    ranks_of = [0] * graph.n_movable
    for m, r in zip(graph.edge_expert.tolist(), graph.edge_rank.tolist()):
        ranks_of[m] |= 1 << r
    off = arrays.comp_rank_off.tolist()
    out = []
    for c in range(arrays.n_comp):
        ranks = arrays.rank_global[off[c]:off[c + 1]].tolist()
        best = float("-inf")
        for bits in range(1, 1 << len(ranks)):
            u = sum(1 << r for i, r in enumerate(ranks) if bits >> i & 1)
            g = sum(fixed[r] for r in ranks if u >> r & 1) + sum(d for d, m in zip(dem, ranks_of) if m & ~u == 0)
            best = max(best, g / bin(u).count("1"))
        out.append(best)
    return out


def test_div_small_is_the_division():
    """blk::div_small (the enumeration's g(U) / |U| without the division's branches)
    gives the division's bits: integers, fractions, random doubles of normal
    quotients, zeros, infinities and NaN, for every divisor it serves (1..8)."""
    rng = np.random.default_rng(5)
    ints = np.arange(0, 2_000_000, dtype=np.float64)
    mant = rng.random(500_000) + 1.0
    wide = mant * np.exp2(rng.integers(-1000, 1000, mant.size).astype(np.float64))
    frac = rng.integers(0, 1 << 52, 500_000).astype(np.float64) * 1e-7
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 3.0, 2.0**52 + 1, 2.0**53 - 1])
    a = np.concatenate([ints, wide, -wide[:1000], frac, special])
    for n in range(1, 9):
        got, want = emu.div_small(a, float(n)), a / n
        same = (got.view(np.int64) == want.view(np.int64)) | (np.isnan(got) & np.isnan(want))
        assert bool(same.all()), (n, a[~same][:5], got[~same][:5], want[~same][:5])


@pytest.mark.parametrize("method", ["pair", "exact_warp"])
def test_enumerated_bound_is_the_best_rank_set(method):
    """Placements whose components have at most SUBSET_RANKS ranks (ring, cube, small
    EPLB ones): the one-warp solvers bound each component by the best of its rank sets
    (brute force here, the LP optimum), certify in one round, and give the reference's
    split; the build without the enumeration agrees."""
    fits = emu.fits_pair if method == "pair" else emu.fits_exact_warp
    seen = 0
    for inst in instances(160, seed=23):
        arrays = ComponentArrays.from_graph(inst.graph)
        if not fits(inst.graph) or not takes_subsets(arrays):
            continue
        if method == "exact_warp" and arrays.two_copy:
            continue  # (the pair case has them; here the EPLB ones)
        seen += 1
        got = emu.solve_host(inst.graph, inst.loads, method)
        ref = solve_exact(inst.graph, inst.loads)
        scale = max(float(inst.loads.max()), 1.0)
        best = torch.tensor(_best_rank_set_bounds(inst.graph, inst.loads, arrays), dtype=torch.float64)
        done = torch.as_tensor(got.status).bool() & (torch.as_tensor(got.iters[:, 0]) > 0)
        assert bool(got.status.all()) and ref.certified, inst.name
        assert torch.allclose(torch.as_tensor(got.bound)[done], best[done], rtol=1e-12, atol=1e-12 * scale), inst.name
        assert (got.iters[:, 0] <= 1).all(), inst.name
        assert rel_diff(got.edge_flow, ref.edge_flow, scale) <= 1e-9, inst.name
        rnd = emu.solve_host(inst.graph, inst.loads, method, rounds_only=True)
        assert rel_diff(got.edge_flow, rnd.edge_flow, scale) <= 1e-10, inst.name
    assert seen >= (10 if method == "pair" else 5), seen
    print(f"enumerated bound ({method}): {seen} instances")
