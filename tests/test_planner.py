"""Planner: upstream-compatible API, general constructors, balance end to end."""

import pytest
import torch

from lplb_plugin import LPLBConfig, Planner, topology
from lplb_plugin.data import load_profile
from lplb_plugin.errors import LPLBInputError
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.placement import rebalance_experts
from lplb_plugin.solvers.highs import solve_highs

PROFILE = load_profile("prefill")


def rank_batches(gen, n_ranks, tokens, topk=8, layer=7, n_logical=256):
    """Each rank's router output: distinct experts per token drawn from a real profile."""
    logw = torch.log(PROFILE[layer] / PROFILE[layer].sum()).float()
    out = []
    for _ in range(n_ranks):
        g = -torch.log(-torch.log(torch.rand(tokens, n_logical, generator=gen).clamp_(1e-20, 1)))
        out.append(torch.topk(logw + g, topk, dim=1).indices)
    return out


def route(planner, rank_idx):
    counts = sum(planner.count_workload(idx, 1)[0].to(torch.int64) for idx in rank_idx)
    plan = planner.plan(counts)
    received = torch.zeros(planner.n_routed_experts, dtype=torch.int64)
    for idx in rank_idx:
        phys = planner.redirect(idx, plan)
        assert phys.shape == idx.shape and phys.dtype == idx.dtype
        assert torch.equal(planner.phy2log[phys], idx)  # own expert, always
        received += torch.bincount(phys.reshape(-1), minlength=planner.n_routed_experts)
    return counts, plan, received


CASES = [
    ("ring", topology.ring(8), 1, [16, 32, 64]),
    ("cube", topology.cube(), 2, [16, 32, 64]),
    ("hypercube", topology.hypercube(), 2, [16, 32, 64]),
    ("torus8x4", topology.torus_2d(8, 4), 2, [32, 64]),
]


@pytest.mark.parametrize("name, r2o, n_red, ep", [(n, r, k, e) for n, r, k, eps in CASES for e in eps])
def test_upstream_constructor_balances_to_lp_optimum(name, r2o, n_red, ep):
    gen = torch.Generator().manual_seed(ep)
    P = 256 + ep * n_red
    planner = Planner(r2o, P, 256, ep_size=ep)
    assert planner.n_group == ep // r2o.shape[0]
    assert planner.combined_redundant_experts == 1
    rank_idx = rank_batches(gen, ep, tokens=256)
    counts, plan, received = route(planner, rank_idx)
    assert plan.optimal
    assert int(received.sum()) == int(counts.sum())  # no token lost
    loads = received.view(ep, -1).sum(1).double()
    t_opt, _ = solve_highs(planner._graph, counts.double())
    # each rank rounds each copy by < 1 token: a slot is off by < ep tokens
    slack = planner.n_local_routed_experts * ep
    assert float(loads.max()) <= t_opt + slack
    mean = float(loads.mean())
    assert float(loads.max()) / mean <= t_opt / mean + slack / mean
    # and per slot the realised tokens follow the plan
    assert float((received.double() - plan.x).abs().max()) < ep


def test_run_keeps_shape_dtype_and_minus_one():
    planner = Planner(topology.cube(), 80, 64, ep_size=8)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.int32, torch.int64):
        for shape in [(37, 4), (5, 3, 2), (11,), (0, 8)]:
            idx = torch.randint(-1, 64, shape, generator=gen).to(dtype)
            counter = torch.zeros((), dtype=torch.int32)
            out = planner.run(idx, counter)
            assert out.shape == idx.shape and out.dtype == dtype
            assert torch.equal(out < 0, idx < 0)
            valid = idx >= 0
            assert torch.equal(planner.phy2log[out[valid].long()], idx[valid].long())
            assert int(counter) == planner.n_group
            assert torch.equal(planner.run(idx), out)  # deterministic


def test_stage_methods_have_upstream_shapes_and_agree_with_run():
    planner = Planner(topology.cube(), 320, 256, ep_size=32)
    gen = torch.Generator().manual_seed(1)
    idx = rank_batches(gen, 1, tokens=2048)[0]
    counts, by_sm = planner.count_workload(idx, n_sms=16)
    assert counts.dtype == torch.int32 and counts.shape == (256,)
    assert by_sm.shape == (16, 256) and torch.equal(by_sm[-1], counts)
    assert bool((by_sm[1:] >= by_sm[:-1]).all())  # inclusive prefix sums
    counter = torch.zeros((), dtype=torch.int32)
    o_weight, global_workload = planner.solve_probs(counts, counter)
    assert o_weight.shape == (4, 8, 2) and o_weight.dtype == torch.float32
    assert bool(((o_weight >= 0) & (o_weight <= 1)).all())
    assert torch.equal(global_workload, counts) and int(counter) == 4
    phys = planner.weighted_select_target(idx, o_weight, by_sm, 16)
    # with one combined expert per column, o_weight is the exact split up to float32
    out = planner.run(idx)
    assert float((phys != out).float().mean()) < 1e-3


def test_o_weight_means_share_kept_by_originals():
    planner = Planner(topology.ring(4), 12, 8, ep_size=4)
    # every rank's hot expert (local slot 0) is copied to the next-lower rank
    counts = torch.tensor([100, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32)
    o_weight, _ = planner.solve_probs(counts)
    # rank 0's hot expert (expert 0) has all the load: half stays, half moves
    assert abs(float(o_weight[0, 0, 0]) - 0.5) < 1e-6
    idx = torch.zeros(100, 1, dtype=torch.int64)
    phys = planner.weighted_select_target(idx, o_weight)
    assert sorted(torch.bincount(phys.reshape(-1)).nonzero().flatten().tolist()) == planner.log2phy[0].sort().values.tolist()


def test_update_redundancy_mapping_orders_hot_experts_first():
    planner = Planner(topology.cube(), 320, 256, ep_size=32)
    workload = PROFILE[10]
    phy2log, log2phy, logcnt = planner.update_redundancy_mapping(workload)
    slots = phy2log.view(32, 10)
    originals = slots[:, :8]
    # each rank's originals sorted by load, hottest first; the hottest is replicated
    assert bool((workload[originals][:, :-1] >= workload[originals][:, 1:]).all())
    assert sorted(originals.reshape(-1).tolist()) == list(range(256))
    assert int((logcnt == 2).sum()) == 64
    assert set(slots[:, 8:].reshape(-1).tolist()) == set(originals[:, :2].reshape(-1).tolist())
    # EPLB spreads load: max per-rank original load well below the contiguous layout's
    contiguous = workload.view(32, 8).sum(1).max()
    assert float(workload[originals].sum(1).max()) < float(contiguous)
    # back to identity
    phy2log2, _, _ = planner.update_redundancy_mapping()
    assert phy2log2.view(32, 10)[:, :8].reshape(-1).tolist() == list(range(256))


def test_general_planner_from_eplb_placement():
    phy2log, _, _ = rebalance_experts(PROFILE[3:4], 288, 8, 4, 32)
    placement = ExpertPlacement.from_phy2log(phy2log[0], 32, 256)
    planner = Planner.from_placement(placement)
    assert planner.r2o is None and planner.n_group >= 1
    gen = torch.Generator().manual_seed(2)
    rank_idx = rank_batches(gen, 32, tokens=128, layer=3)
    counts, plan, received = route(planner, rank_idx)
    assert plan.optimal and int(received.sum()) == int(counts.sum())
    with pytest.raises(LPLBInputError, match="needs an r2o planner"):
        planner.solve_probs(counts)


def test_from_config_topology_and_eplb():
    cfg = LPLBConfig.from_dict({"placement": {"topology": "torus", "topology_shape": [4, 2], "redundant_per_rank": 2}})
    planner = Planner.from_config(cfg, 64, ep_size=8)
    assert planner.n_routed_experts == 80 and planner.solver == "exact"
    cfg = LPLBConfig.from_dict({"solver": "ipm", "placement": {"policy": "eplb", "num_nodes": 2, "num_groups": 4, "redundant_per_rank": 1}})
    planner = Planner.from_config(cfg, 64, ep_size=8, workload=PROFILE[5, :64])
    assert planner.n_routed_experts == 72 and planner.solver == "ipm"
    out = planner.run(torch.randint(0, 64, (50, 2)))
    assert out.max() < 72


def test_input_errors():
    planner = Planner(topology.ring(8), 72, 64, ep_size=8)
    with pytest.raises(LPLBInputError, match=r"values must lie in \[-1, 64\)"):
        planner.run(torch.tensor([0, 64]))
    with pytest.raises(LPLBInputError, match="int32 or int64"):
        planner.run(torch.tensor([0.0, 1.0]))
    with pytest.raises(LPLBInputError, match="avail_counter must be an int32"):
        planner.run(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(LPLBInputError, match="avail_counter must be an int32"):
        planner.run(torch.tensor([0, 1]), torch.zeros((), dtype=torch.float32))
    with pytest.raises(LPLBInputError, match="ep_size is required"):
        Planner(topology.ring(8), 72, 64)
    with pytest.raises(LPLBInputError, match="solver='fast'"):
        Planner(topology.ring(8), 72, 64, ep_size=8, solver="fast")
    with pytest.raises(LPLBInputError, match="o_weight must have shape"):
        planner.weighted_select_target(torch.tensor([0]), torch.zeros(3))
    with pytest.raises(LPLBInputError, match="global_counts must be 1-D with 64"):
        planner.plan(torch.zeros(63))
    with pytest.raises(LPLBInputError, match="finite and non-negative"):
        planner.plan(torch.full((64,), -1.0))
    with pytest.raises(LPLBInputError, match="n_sms must be"):
        planner.count_workload(torch.tensor([0]), 0)


def test_int64_counter_is_accepted():
    planner = Planner(topology.ring(8), 72, 64, ep_size=8)
    counter = torch.zeros((), dtype=torch.int64)
    planner.run(torch.tensor([[0, 1]]), counter)
    assert int(counter) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_run_on_cuda_matches_cpu():
    planner = Planner(topology.cube(), 320, 256, ep_size=32)
    gen = torch.Generator().manual_seed(3)
    idx = rank_batches(gen, 1, tokens=4096)[0]
    assert torch.equal(planner.run(idx.cuda()).cpu(), planner.run(idx))


def test_warn_on_fallback_is_honoured(caplog):
    """lplb.warn_on_fallback: false silences the fallback warning, not the status."""
    import logging

    from lplb_plugin.solvers import exact

    gen = torch.Generator().manual_seed(9)
    idx = rank_batches(gen, 1, tokens=512)[0]
    saved = exact._ROUNDS
    try:
        exact._ROUNDS = ()  # no certification attempt: always the fallback
        for warn in (True, False):
            cfg = LPLBConfig.from_dict({"warn_on_fallback": warn})
            planner = Planner.from_config(cfg, 256, ep_size=32)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="lplb_plugin"):
                plan = planner.plan(planner.count_workload(idx, 1)[0])
            assert not plan.optimal
            assert ("not certified" in caplog.text) == warn
    finally:
        exact._ROUNDS = saved
