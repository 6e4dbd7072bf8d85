"""CUDA solve kernels (exact, ipm) and the sync-free Planner.run against the torch /
numpy references (skipped without CUDA)."""

import logging

import pytest
import torch

from instances import (
    SMALL_EPLB_CONFIGS,
    assert_warp_rounds,
    chain_placement,
    eplb_placements,
    instances,
    random_placement,
    rel_diff,
    sample_batch,
    two_copy_placements,
    varied_loads,
)
from lplb_plugin.data import load_profile
from lplb_plugin import Planner, kernels, topology
from lplb_plugin.errors import LPLBInputError
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.problem import SplitGraph
from lplb_plugin.redirect import copy_fractions, redirect
from lplb_plugin.solvers.exact import solve_exact
from lplb_plugin.solvers.ipm import solve_ipm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _solver(inst_or_placement, graph=None):
    p = getattr(inst_or_placement, "placement", inst_or_placement)
    g = graph if graph is not None else SplitGraph.from_placement(p)
    assert kernels.get() is not None, "CUDA is available but the kernels did not build"
    return kernels.DeviceSolver(g, p.log2phy, p.logcnt, torch.device("cuda")), g, p


def _assert_slot_split(split, g, p, loads, tag=""):
    """x and the copy shares the solve wrote are the reference's functions of its own
    flow (the shares bit for bit)."""
    x = g.slot_split(loads, split.edge_flow.cpu())
    assert torch.allclose(split.x.cpu(), x, rtol=1e-15, atol=0), tag
    assert torch.equal(split.cum_frac.cpu(), copy_fractions(split.x.cpu(), p.log2phy, p.logcnt)), tag


@pytest.mark.parametrize("use_warp", [True, False], ids=["one-warp", "block"])
def test_exact_kernel_matches_reference_on_300_instances(use_warp):
    worst = 0.0
    for inst in instances(300, seed=21):
        ds, g, p = _solver(inst, inst.graph)
        ds.use_warp = use_warp
        split = ds.solve(inst.loads.cuda(), "exact")
        ref = solve_exact(g, inst.loads)
        scale = float(inst.loads.max())
        assert bool(split.status.all()) == ref.certified, inst.name
        d = rel_diff(split.edge_flow.cpu(), ref.edge_flow, scale)
        worst = max(worst, d)
        assert d <= 1e-9, (inst.name, d)
        assert rel_diff(split.rank_loads.cpu(), ref.rank_loads, scale) <= 1e-9
        # x and the copy shares are the reference's functions of the kernel's flow
        _assert_slot_split(split, g, p, inst.loads, inst.name)
    print(f"exact kernel: worst relative flow difference {worst:.2e}")


def _warp_equals_block_and_reference(ds, g, loads, tag):
    """The one-warp exact solver (ds.use_warp) against the general kernel and the
    reference on one load vector: the same status, flows and bounds as the general
    kernel, and the reference's unique answer where it certifies (elsewhere a valid
    fallback split).  Returns both kernels' splits."""
    ds.use_warp = True
    a = ds.solve(loads.cuda())
    ds.use_warp = False
    b = ds.solve(loads.cuda())
    ref = solve_exact(g, loads)
    scale = float(loads.max())
    assert torch.equal(a.status, b.status) and bool(a.status.all()) == ref.certified, tag
    assert rel_diff(a.edge_flow.cpu(), b.edge_flow.cpu(), scale) <= 1e-10, tag
    assert torch.allclose(a.bound, b.bound, rtol=1e-12, atol=0), tag
    if ref.certified:  # the unique answer
        assert rel_diff(a.edge_flow.cpu(), ref.edge_flow, scale) <= 1e-9, tag
        assert rel_diff(a.rank_loads.cpu(), ref.rank_loads, scale) <= 1e-9, tag
    else:  # (loads spanning ~27 orders of magnitude) a fallback: valid, not unique
        flow = a.edge_flow.cpu()
        sums = torch.zeros(g.n_movable, dtype=torch.float64).index_add_(0, g.edge_expert, flow)
        assert bool((flow >= 0).all()) and torch.allclose(sums, g.demands(loads), rtol=1e-9, atol=1e-9)
    return a, b


def _fallback_is_even_split(ds, g, loads, name):
    """No certification round (one-warp solver): the even split, reported as a fallback
    (every expert loaded: a component with no demand is trivially certified)."""
    ds.use_warp = True
    loads = loads.clamp_min(1.0)
    fb = ds.solve(loads.cuda(), max_rounds=0)
    has_edges = (ds.arrays.comp_edge_off[1:] > ds.arrays.comp_edge_off[:-1]).cpu()
    assert not bool(fb.status.cpu()[has_edges].any()), name
    assert torch.allclose(fb.edge_flow.cpu(), g.even_flow(loads), rtol=1e-12, atol=1e-9), name


def test_one_warp_two_copy_solver_equals_general_kernel():
    """Same answer, certificate and bound as the general exact kernel and the reference,
    on every two-copy placement, with random and profile-like loads; the component
    sizes cover the one-warp solver (8 and 9-32 ranks) and the general kernel (> 32
    ranks) beside it."""
    gen = torch.Generator().manual_seed(5)
    seen_pair = 0
    for name, p in two_copy_placements():
        ds, g, _ = _solver(p)
        assert ds.arrays.two_copy, name
        seen_pair += ds.arrays.max_ranks <= 32
        for k in range(6):
            loads = varied_loads(gen, p.n_logical, k)
            _warp_equals_block_and_reference(ds, g, loads, (name, k))
        _fallback_is_even_split(ds, g, loads, name)
    assert seen_pair >= 10


def test_one_warp_exact_solver_any_placement_equals_general_kernel():
    """csrc/solve_exact_warp.cuh (one warp, experts with any number of copies) runs
    exact::solve's steps: against the general exact kernel (use_warp = False) and the
    reference on EPLB placements (tests/instances.py's, on the decode profile, and the
    prefill ones above; placements whose components have at most 32 ranks, experts and
    edges take the warp kernel, the others the general kernel on both sides), with
    varied loads and prefill batches: same status, rounds and (to one) Newton
    iterations (components of at most SUBSET_RANKS ranks: one round, from the
    enumerated bound), flows and bounds equal to rounding; and the fallback path."""
    gen = torch.Generator().manual_seed(7)
    prof = load_profile("prefill")
    seen_any = 0
    prefill = [("prefill-" + n, p) for n, p in eplb_placements(prof[10], SMALL_EPLB_CONFIGS[:3])]
    for name, p in eplb_placements(load_profile("decode")[5]) + prefill:
        ds, g, _ = _solver(p)
        arr = ds.arrays
        seen_any += not arr.two_copy and max(arr.max_ranks, arr.max_experts, arr.max_edges) <= 32
        batches = [varied_loads(gen, p.n_logical, k) for k in range(6)]
        batches += [sample_batch(gen, prof[layer], 16384 * 8) for layer in (3, 30)]
        for k, loads in enumerate(batches):
            a, b = _warp_equals_block_and_reference(ds, g, loads, (name, k))
            assert_warp_rounds(a.iters, b.iters, a.status, ds.arrays, (name, k))
            assert rel_diff(a.rank_loads.cpu(), b.rank_loads.cpu(), float(loads.max())) <= 1e-10, (name, k)
        _fallback_is_even_split(ds, g, loads, name)
    assert seen_any >= 5, seen_any


def test_one_warp_ipm_equals_general_ipm_kernel():
    """The IPM's one-warp solvers run the block IPM kernel's iteration: same iteration
    counts and status, objective and flows equal to rounding, on every two-copy
    placement (components of 8-32 ranks take solve_ipm_pair.cuh, larger ones the block
    kernel) and on EPLB placements (components of at most 32 edges take
    solve_ipm_warp.cuh), with varied loads, zero loads and iteration caps 0 and 2.
    Components beyond 16 ranks (torus 8x4; the 17-rank chain in the any-placement
    kernel) solve their Newton systems on helper warps (csrc/team_inverse.cuh)."""
    gen = torch.Generator().manual_seed(6)
    seen_pair = seen_any = 0
    placements = two_copy_placements() + eplb_placements(load_profile("decode")[5])
    for name, p in placements + [("chain17", chain_placement(17))]:
        ds, g, _ = _solver(p)
        seen_pair += ds.arrays.two_copy and ds.arrays.max_ranks <= 32
        seen_any += not ds.arrays.two_copy and ds.arrays.max_edges <= 32
        for k in range(6):
            loads = varied_loads(gen, p.n_logical, k)
            for cap in (100, 0, 2):
                ds.use_warp = True
                a = ds.solve(loads.cuda(), "ipm", ipm_max_iters=cap)
                ds.use_warp = False
                b = ds.solve(loads.cuda(), "ipm", ipm_max_iters=cap)
                scale = max(float(b.bound.max()), 1e-12)
                assert torch.equal(a.status, b.status) and torch.equal(a.iters, b.iters), (name, k, cap)
                assert rel_diff(a.edge_flow.cpu(), b.edge_flow.cpu(), scale) <= 1e-10, (name, k, cap)
                assert float((a.bound - b.bound).abs().max()) <= 1e-12 * scale, (name, k, cap)
                _assert_slot_split(a, g, p, loads, (name, k, cap))
                _assert_slot_split(b, g, p, loads, (name, k, cap))
        zero = ds.solve(torch.zeros(p.n_logical, dtype=torch.float64, device="cuda"), "ipm")
        assert bool(zero.status.all()) and float(zero.edge_flow.abs().max()) == 0.0, name
    assert seen_pair >= 10 and seen_any >= 3, (seen_pair, seen_any)


def test_int32_and_float64_loads_agree():
    inst = next(iter(instances(1, seed=3)))
    ds, _, _ = _solver(inst, inst.graph)
    a = ds.solve(inst.loads.round().to(torch.int32).cuda())
    b = ds.solve(inst.loads.round().cuda())
    assert torch.equal(a.edge_flow, b.edge_flow) and torch.equal(a.cum_frac, b.cum_frac)


@pytest.mark.parametrize(
    "n_ranks, per_rank, where",
    [(64, 6, "shared"), (160, 6, "matrix global"), (128, 32, "all global")],
    ids=["64-shared", "160-matrix-global", "128x32-all-global"],
)
def test_large_components(n_ranks, per_rank, where):
    """One large component per placement, both methods against the references: at 64
    ranks the kernels' scratch is in shared memory; at 160 ranks the Newton matrix
    moves to global memory; at 128 ranks with 32 slots each (a component of ~4,000
    edges, more than a block's shared memory holds even without the matrix) all of
    it does."""
    gen = torch.Generator().manual_seed(n_ranks)
    p = random_placement(gen, 4 * n_ranks, n_ranks, per_rank)
    ds, g, _ = _solver(p)
    R = ds.sizes[1]
    for method in ("exact", "ipm"):
        doubles = ds.global_scratch(method)
        got = "shared" if doubles == 0 else "matrix global" if doubles == R * R else "all global"
        assert got == where, (method, ds.sizes, doubles)
    loads = ((torch.rand(4 * n_ranks, generator=gen, dtype=torch.float64) ** 4) * 1e5).round()
    split = ds.solve(loads.cuda())
    ref = solve_exact(g, loads)
    assert bool(split.status.all()) == ref.certified
    assert rel_diff(split.edge_flow.cpu(), ref.edge_flow, float(loads.max())) <= 1e-9
    _assert_slot_split(split, g, p, loads, "exact")
    split = ds.solve(loads.cuda(), "ipm")
    _assert_slot_split(split, g, p, loads, "ipm")
    ref = solve_ipm(g, loads)
    fixed = g.fixed_loads(loads)
    ref_obj = float(g.rank_loads(fixed, ref.edge_flow).max())
    assert bool(split.status.all()) == bool(ref.converged)
    assert abs(float(split.rank_loads.max()) - ref_obj) <= 1e-5 * ref_obj
    flow = split.edge_flow.cpu()
    sums = torch.zeros(g.n_movable, dtype=torch.float64).index_add_(0, g.edge_expert, flow)
    assert bool((flow >= 0).all()) and torch.allclose(sums, g.demands(loads), rtol=1e-9, atol=1e-6)


def test_fallback_is_reported_and_valid():
    inst = next(iter(instances(3, seed=4)))
    ds, g, _ = _solver(inst, inst.graph)
    split = ds.solve(inst.loads.cuda(), max_rounds=0)
    has_edges = (ds.arrays.comp_edge_off[1:] > ds.arrays.comp_edge_off[:-1]).cpu()
    assert not bool(split.status.cpu()[has_edges].any())
    assert torch.allclose(split.edge_flow.cpu(), g.even_flow(inst.loads), rtol=1e-12, atol=1e-9)
    # the kernels count fallback components into a running total when asked
    totals = torch.tensor([3, 5], dtype=torch.int64, device="cuda")
    ds.solve(inst.loads.cuda(), max_rounds=0, totals=totals)
    ds.solve(inst.loads.cuda(), totals=totals)  # certified: adds nothing
    n_bad = int((split.status.cpu() == 0).sum())
    assert n_bad > 0 and totals.cpu().tolist() == [3, 5 + n_bad]


@pytest.mark.parametrize("use_warp", [True, False], ids=["one-warp", "block"])
def test_ipm_kernel_matches_torch_ipm(use_warp):
    worst = 0.0
    for inst in instances(120, seed=8):
        ds, g, p = _solver(inst, inst.graph)
        ds.use_warp = use_warp
        split = ds.solve(inst.loads.cuda(), "ipm")
        _assert_slot_split(split, g, p, inst.loads, inst.name)
        ref = solve_ipm(g, inst.loads)
        fixed = g.fixed_loads(inst.loads)
        ref_obj = float(g.rank_loads(fixed, ref.edge_flow).max())
        got_obj = float(split.rank_loads.max())
        scale = max(ref_obj, 1.0)
        worst = max(worst, abs(got_obj - ref_obj) / scale)
        assert abs(got_obj - ref_obj) <= 1e-5 * scale, inst.name
        assert bool(split.status.all()) == bool(ref.converged), inst.name
        flow = split.edge_flow.cpu()
        assert bool((flow >= 0).all())
        sums = torch.zeros(g.n_movable, dtype=torch.float64).index_add_(0, g.edge_expert, flow)
        assert torch.allclose(sums, g.demands(inst.loads), rtol=1e-9, atol=1e-6)
    print(f"ipm kernel: worst relative objective difference {worst:.2e}")


# ------------------------------------------------------------------ Planner.run
def _idx(gen, tokens, n_logical=256, topk=8):
    w = torch.rand(n_logical, generator=gen) ** 3
    logits = torch.log(w).unsqueeze(0) - torch.log(-torch.log(torch.rand(tokens, n_logical, generator=gen)))
    idx = torch.topk(logits, topk, dim=1).indices
    idx[torch.rand(tokens, topk, generator=gen) < 0.02] = -1
    return idx


@pytest.mark.parametrize("solver", ["exact", "ipm"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_run_is_reference_rewrite_of_kernel_split(solver, dtype):
    planner = Planner(topology.cube(), 320, 256, ep_size=32, solver=solver)
    idx = _idx(torch.Generator().manual_seed(2), 4096).to(dtype)
    out = planner.run(idx.cuda())
    split = planner.check_last_run()
    assert out.dtype == dtype and out.shape == idx.shape
    assert torch.equal(out.cpu(), redirect(idx, split.cum_frac.cpu(), planner.log2phy))
    ref = planner.plan(planner.count_workload(idx)[0])
    assert torch.allclose(split.cum_frac.cpu(), ref.cum_frac, rtol=0, atol=1e-5 if solver == "ipm" else 1e-12)
    # every token goes to a copy of its own logical expert; -1 stays -1
    o = out.cpu().long()
    assert torch.equal(o < 0, idx < 0)
    assert torch.equal(planner.phy2log[o[idx >= 0]], idx[idx >= 0].long())


def test_run_is_deterministic_and_counts_avail():
    planner = Planner(topology.torus_2d(8, 4), 320, 256, ep_size=32)
    idx = _idx(torch.Generator().manual_seed(4), 16384).cuda()
    counter = torch.zeros((), dtype=torch.int32, device="cuda")
    a = planner.run(idx, counter)
    b = planner.run(idx, counter)
    assert torch.equal(a, b)
    assert int(counter) == 2 * planner.n_group


def _captured_run(planner, static_idx, counter=None):
    """``planner.run(static_idx, counter)`` captured in a CUDA graph after three eager
    calls on a side stream (torch's warm-up before a capture); returns the graph and
    the captured output."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            planner.run(static_idx)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = planner.run(static_idx, counter)
    return graph, static_out


def test_run_captured_in_cuda_graph_replays_with_new_ids():
    prof = torch.rand(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2
    from lplb_plugin.placement import rebalance_experts

    phy2log, _, _ = rebalance_experts(prof.unsqueeze(0), 288, 8, 4, 32)
    planner = Planner.from_placement(ExpertPlacement.from_phy2log(phy2log[0], 32, 256))
    eager = Planner.from_placement(planner.placement)
    gen = torch.Generator().manual_seed(9)
    static_idx = _idx(gen, 4096).cuda()
    counter = torch.zeros((), dtype=torch.int64, device="cuda")
    graph, static_out = _captured_run(planner, static_idx, counter)
    for _ in range(3):
        new = _idx(gen, 4096)
        static_idx.copy_(new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager.run(new.cuda()))
    assert int(counter) == 3 * planner.n_group
    assert planner.check_last_run() is not None


@pytest.mark.parametrize("tokens, n_logical", [(4096, 256), (1 << 17, 256), (4096, 1024)])
def test_run_map_counts_while_the_solve_runs(tokens, n_logical):
    """In run() the map kernel follows the solve kernel directly (no avail_counter) and
    counts its chunk of idx before it waits for the solve (after_solve; with 256
    experts it also copies log2phy and counts to shared memory, with 1024 they do not
    fit its 48 KiB): replays of a graph with new ids give the reference rewrite of each
    replay's split, and the map launched the ordinary way (waiting before it reads
    anything) gives the same ids."""
    planner = Planner(topology.cube(), n_logical + 64, n_logical, ep_size=32)
    gen = torch.Generator().manual_seed(11)
    static_idx = _idx(gen, tokens, n_logical).cuda()
    graph, static_out = _captured_run(planner, static_idx)
    n_chunks = torch.cuda.get_device_properties(0).multi_processor_count
    l2p = planner.log2phy.cuda()
    for _ in range(3):
        new = _idx(gen, tokens, n_logical)
        static_idx.copy_(new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        cum = planner.check_last_run().cum_frac
        assert torch.equal(static_out.cpu(), redirect(new, cum.cpu(), planner.log2phy))
        counts, prefix = kernels.count_tokens(static_idx, n_logical, n_chunks)
        assert torch.equal(kernels.map_tokens(static_idx, prefix, counts, cum, l2p), static_out)


def test_invalid_ids_are_reported_without_a_sync_in_run():
    planner = Planner(topology.cube(), 320, 256, ep_size=32)
    bad = torch.randint(0, 256, (64, 8)).cuda()
    bad[3, 2] = 256
    out = planner.run(bad)
    assert int(out[3, 2]) == -1
    with pytest.raises(LPLBInputError, match=r"\[-1, 256\)"):
        planner.check_last_run()
    planner.run(bad)
    torch.cuda.synchronize()
    with pytest.raises(LPLBInputError, match="previous Planner.run batch"):
        planner.run(torch.zeros(4, 8, dtype=torch.int64, device="cuda"))


def test_fallback_warns_one_call_later(caplog):
    inst = next(iter(instances(1, seed=4)))
    planner = Planner.from_placement(inst.placement)
    idx = _idx(torch.Generator().manual_seed(1), 2048).cuda()
    planner.run(idx)
    split = planner.check_last_run()
    assert bool(split.status.all())
    # a fallback from the kernel (no certification round) is warned about
    ds = planner._device_solvers[idx.device]
    original = ds.solve
    ds.solve = lambda loads, method="exact", **kw: original(loads, method, **{**kw, "max_rounds": 0})
    with caplog.at_level(logging.WARNING, logger="lplb_plugin"):
        planner.run(idx)
        planner.check_last_run()
    assert any("not proven optimal" in r.message for r in caplog.records)


@pytest.mark.parametrize("solver", ["exact", "ipm"])
def test_run_never_synchronises(solver):
    """CUDA's sync debug mode turns any host synchronisation inside run() (an .item(),
    a blocking copy, a nonzero) into an error."""
    planner = Planner(topology.cube(), 320, 256, ep_size=32, solver=solver)
    idx = _idx(torch.Generator().manual_seed(6), 4096).cuda()
    counter = torch.zeros((), dtype=torch.int32, device="cuda")
    planner.run(idx, counter)  # first call: builds the device tables (host copies)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = planner.run(idx, counter)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert out.shape == idx.shape and int(counter) == 4 * planner.n_group
