"""The exact method's one-warp solver for small components of any placement
(csrc/solve_exact_warp.cuh), built for the CPU with its warp emulated by 32 threads
(csrc/warp_emulation.h), against the general exact kernel's CPU build
(csrc/solve_exact.cuh) and the reference (lplb_plugin/solvers/exact.py).

It runs exact::solve's steps with the same formulas in the same order (only the
reductions, the reciprocals and the elimination round differently), so status,
rounds and Newton iterations match the general kernel and the flows agree to
rounding; except that components of at most SUBSET_RANKS ranks take their first
bound from every rank set (one round), which the build without it (rounds_only)
leaves out so that the step-by-step comparison still covers them.  The emulation
also aborts when a shuffle or __syncwarp is not reached by all 32 lanes from the same
line.  The CUDA build is compared with the general kernel
on a GPU in tests/gpu/test_solve_kernels.py.
"""

import pytest
import torch

import kernel_emulation as emu
from instances import (
    SMALL_EPLB_CONFIGS,
    assert_warp_rounds,
    eplb_placements,
    instances,
    mult2_placement,
    random_placement,
    rel_diff,
    sample_batch,
    varied_loads,
    zipf_loads,
)
from lplb_plugin.component_arrays import ComponentArrays
from lplb_plugin.data import load_profile
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.problem import SplitGraph
from lplb_plugin.solvers.exact import solve_exact

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++ compiler")


def _compare(graph, loads, max_rounds=5, ref_certifies=False, rounds_only=False):
    """The warp solver against the general kernel's CPU build: same status, flows and
    loads equal to rounding, the same bounds, and rounds as assert_warp_rounds has them
    (rounds_only: the build without the enumerated bound, which takes the general
    kernel's steps on every component: the same rounds and, to one, Newton iterations
    everywhere); and against the reference (which always runs at least one round) when
    max_rounds > 0: the same status and answer, or with ref_certifies only where the
    reference certifies (it can fall back where the kernels certify: docs/solvers.md).
    A small component certifies in its first round where the general kernel may run
    out of rounds (max_rounds < 5): there both are compared at all rounds.  Returns
    both kernels' results."""
    got = emu.solve_host(graph, loads, "exact_warp", rounds_only=rounds_only, max_rounds=max_rounds)
    gen = emu.solve_host(graph, loads, "exact", max_rounds=max_rounds)
    if not rounds_only and max_rounds > 0 and not (got.status == gen.status).all():
        assert (got.status >= gen.status).all()
        max_rounds = 5
        gen = emu.solve_host(graph, loads, "exact")
    scale = float(loads.max())
    assert (got.status == gen.status).all()
    if rounds_only:
        assert (got.iters[:, 0] == gen.iters[:, 0]).all() and (abs(got.iters[:, 1] - gen.iters[:, 1]) <= 1).all()
    else:
        assert_warp_rounds(got.iters, gen.iters, got.status, got.arrays)
    assert rel_diff(got.edge_flow, gen.edge_flow, scale) <= 1e-10
    assert rel_diff(got.rank_load, gen.rank_load, scale) <= 1e-10
    finite = gen.bound > -float("inf")  # (no round: no bound)
    assert (got.bound[~finite] == gen.bound[~finite]).all()
    assert abs(got.bound[finite] - gen.bound[finite]).max(initial=0.0) <= 1e-12 * max(scale, 1.0)
    if max_rounds > 0:
        ref = solve_exact(graph, loads, max_rounds=max_rounds)
        if ref_certifies and not ref.certified:
            return got, gen
        assert bool(got.status.all()) == ref.certified
        assert rel_diff(got.edge_flow, ref.edge_flow, scale) <= 1e-9
        assert rel_diff(got.rank_load, ref.rank_loads, scale) <= 1e-9
    return got, gen


def test_same_answer_rounds_and_newton_iterations_as_general_kernel():
    """Every instance of instances(400, 17) whose components fit (two-copy and EPLB
    placements): the general kernel's status per component; without the enumerated
    bound (rounds_only) also its rounds per component and in total the same Newton
    iterations (same algorithm; only rounding may move one); with it, one round on
    components of at most SUBSET_RANKS ranks and no more Newton iterations in total."""
    seen = eplb = 0
    newton = {False: [0, 0], True: [0, 0]}
    rounds = {False: [0, 0], True: [0, 0]}
    for inst in instances(400, seed=17):
        if not emu.fits_exact_warp(inst.graph):
            continue
        seen += 1
        eplb += not ComponentArrays.from_graph(inst.graph).two_copy
        for rounds_only in (False, True):
            try:
                got, gen = _compare(inst.graph, inst.loads, rounds_only=rounds_only)
            except AssertionError as err:
                raise AssertionError((inst.name, rounds_only)) from err
            newton[rounds_only][0] += int(got.iters[:, 1].sum())
            newton[rounds_only][1] += int(gen.iters[:, 1].sum())
            rounds[rounds_only][0] += int(got.iters[:, 0].sum())
            rounds[rounds_only][1] += int(gen.iters[:, 0].sum())
    assert seen >= 150 and eplb >= 30, (seen, eplb)
    n, r = newton[True], rounds[True]
    assert r[0] == r[1] and abs(n[0] - n[1]) <= n[1] // 100, (n, r)
    n, r = newton[False], rounds[False]
    assert r[0] <= r[1] and n[0] <= n[1] + n[1] // 100, (n, r)
    print(f"exact_warp: {seen} instances ({eplb} EPLB); Newton iterations {n[0]} (general kernel {n[1]}; "
          f"without the enumerated bound {newton[True][0]}), rounds {r[0]} ({r[1]})")


def test_eplb_placements_on_the_prefill_profile():
    prof = load_profile("prefill")
    placements = eplb_placements(prof[10], SMALL_EPLB_CONFIGS)
    gen = torch.Generator().manual_seed(3)
    for name, p in placements:
        g = SplitGraph.from_placement(p)
        a = ComponentArrays.from_graph(g)
        assert emu.fits_exact_warp(g) and not a.two_copy, name
        batches = [sample_batch(gen, prof[layer], 16384 * 8) for layer in (3, 10, 30, 50)]
        batches += [varied_loads(gen, p.n_logical, k) for k in (1, 4)]
        for k, loads in enumerate(batches):
            try:
                _compare(g, loads)
            except AssertionError as err:
                raise AssertionError((name, k)) from err


def test_random_small_placements():
    """Random placements of 3-12 ranks with 2-5 slots each (experts with up to a
    handful of copies, two copies of one expert on one rank: edge multiplicity 2),
    steep, rounded, sparse and Zipf loads.  (On some of these the reference falls
    back where both kernels certify, as docs/solvers.md describes: there the kernels
    are compared with each other only.)"""
    gen = torch.Generator().manual_seed(0)
    seen = mult = 0
    for trial in range(120):
        R = int(torch.randint(3, 13, (1,), generator=gen))
        per = int(torch.randint(2, 6, (1,), generator=gen))
        L = max(R * per - int(torch.randint(2, 12, (1,), generator=gen)), 2)
        g = SplitGraph.from_placement(random_placement(gen, L, R, per))
        k = trial % 6
        loads = varied_loads(gen, L, k) if k < 4 else zipf_loads(gen, L, 1.0 + k / 4, 4096)
        if not emu.fits_exact_warp(g) or g.n_edges == 0:
            continue
        seen += 1
        mult += int(g.edge_mult.max()) > 1
        try:
            _compare(g, loads, ref_certifies=True)
        except AssertionError as err:
            raise AssertionError(trial) from err
    assert seen >= 100 and mult >= 10, (seen, mult)


def _mult2_any_placement() -> ExpertPlacement:
    """mult2_placement with expert 1's second copy (rank 6) given to expert 0: expert 0
    then sits on ranks 0, 6 and 7, with two slots on rank 7."""
    phy = list(range(36)) + [36, 37, 38, 39, 31, 0] + [0, 0, 7, 13, 19, 25]
    return ExpertPlacement.from_phy2log(torch.tensor(phy), 8, 40)


@pytest.mark.parametrize("which", ["two-copy", "three-copies"])
def test_edge_multiplicity_two_and_fallback(which):
    p = mult2_placement() if which == "two-copy" else _mult2_any_placement()
    g = SplitGraph.from_placement(p)
    a = ComponentArrays.from_graph(g)
    assert emu.fits_exact_warp(g) and int(g.edge_mult.max()) == 2 and a.two_copy == (which == "two-copy")
    gen = torch.Generator().manual_seed(2)
    for k in range(20):
        loads = (torch.rand(40, generator=gen, dtype=torch.float64) ** (1 + k % 4)) * 1000
        if k % 2:
            loads = loads.round()
        _compare(g, loads, max_rounds=1 + k % 5)
    # no certification round: the even split, reported as a fallback
    loads = loads.clamp_min(1.0)
    got, _ = _compare(g, loads, max_rounds=0)
    assert not bool(got.status.any()) and (got.iters == 0).all()
    assert torch.allclose(got.edge_flow, g.even_flow(loads), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("case", ["no-replica", "two-ranks", "three-copies", "one-rank-three-slots"])
def test_degenerate_placements(case):
    """No movable expert, one expert on two ranks, one on three ranks, one with all
    its copies on one rank plus one elsewhere; zero, small and one-hot loads."""
    p = {
        "no-replica": lambda: ExpertPlacement.from_phy2log(torch.arange(16), 4, 16),
        "two-ranks": lambda: ExpertPlacement.from_phy2log(torch.tensor([0, 1, 2, 0]), 2, 3),
        "three-copies": lambda: ExpertPlacement.from_phy2log(torch.tensor([0, 1, 0, 2, 0, 3]), 3, 4),
        "one-rank-three-slots": lambda: ExpertPlacement.from_phy2log(torch.tensor([0, 0, 0, 1, 0, 2]), 2, 3),
    }[case]()
    g = SplitGraph.from_placement(p)
    assert emu.fits_exact_warp(g)
    L = p.n_logical
    for loads in (torch.zeros(L, dtype=torch.float64), torch.arange(L, dtype=torch.float64) + 1,
                  torch.tensor([1e6] + [0.0] * (L - 1), dtype=torch.float64)):
        got, _ = _compare(g, loads)
        assert bool(got.status.all())


def test_components_too_large_are_refused():
    """The caller must route larger components to the general kernel (the CUDA
    launcher does); the CPU build says so instead of solving.  An EPLB placement over
    the edge limit alone (35 edges; a component over the rank or expert limit is over
    the edge limit too), a random one over every limit."""
    found = {}
    for inst in instances(400, seed=17):
        found.setdefault(inst.name.split("/")[0], inst)
    for name, over in (("eplb-g-ep32-288", [False, False, True]), ("random5", [True, True, True])):
        inst = found[name]
        a = ComponentArrays.from_graph(inst.graph)
        assert [n > 32 for n in (a.max_ranks, a.max_experts, a.max_edges)] == over, name
        with pytest.raises(AssertionError):
            emu.solve_host(inst.graph, inst.loads, "exact_warp")


def test_failed_attempts_stop_early():
    assert emu.failed_attempts_check("exact_warp", emu.fits_exact_warp) >= 1
