"""Topologies (upstream r2o tensors), placements and the split graph."""

import pytest
import torch

from lplb_plugin import topology
from lplb_plugin.errors import LPLBInputError
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.problem import SplitGraph


def test_topologies_match_upstream_tables():
    # upstream prints r2o transposed: one row per redundant slot
    assert topology.ring(8).t().tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert topology.cube().t().tolist() == [[3, 0, 1, 2, 7, 4, 5, 6], [6, 7, 4, 5, 0, 1, 2, 3]]
    hc = topology.hypercube().t().tolist()
    assert hc[0] == [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14]
    assert hc[1] == [(i + 12) % 16 for i in range(16)]
    t = topology.torus_2d(8, 4)
    for i in range(8):
        for j in range(4):
            assert t[i * 4 + j].tolist() == [((i + 1) % 8) * 4 + j, i * 4 + (j + 1) % 4]
    for r2o in (topology.ring(5), topology.cube(), topology.hypercube(), topology.torus_2d(3, 5)):
        assert r2o.dtype == torch.int64
        topology.validate_r2o(r2o)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([1, 0]), "2-D"),
        (torch.tensor([[1.0], [0.0]]), "integer"),
        (torch.tensor([[1], [1]]), r"redundant_to_original\[:, 0\]"),
        (torch.tensor([[0], [1]]), "own expert"),
        (torch.zeros(0, 1, dtype=torch.int64), "group_size >= 1"),
    ],
)
def test_validate_r2o_errors(bad, match):
    with pytest.raises(LPLBInputError, match=match):
        topology.validate_r2o(bad)


def test_topology_argument_errors():
    with pytest.raises(LPLBInputError, match="n must be an integer >= 2"):
        topology.ring(1)
    with pytest.raises(LPLBInputError, match="m must be"):
        topology.torus_2d(1, 4)
    with pytest.raises(LPLBInputError, match="unknown"):
        topology.by_name("mesh")
    with pytest.raises(LPLBInputError, match=r"shape=\[m, n\]"):
        topology.by_name("torus")


@pytest.mark.parametrize("r2o, ep, extra", [(topology.ring(8), 16, 1), (topology.cube(), 32, 2), (topology.cube(), 8, 4), (topology.torus_2d(4, 2), 8, 2)])
def test_from_r2o_follows_upstream_layout(r2o, ep, extra):
    L = 64
    gen = torch.Generator().manual_seed(ep)
    order = torch.randperm(L, generator=gen)
    p = ExpertPlacement.from_r2o(r2o, L + ep * extra, L, ep, expert_order=order)
    gs, n_red = r2o.shape
    nll, nlp = L // ep, (L + ep * extra) // ep
    comb = extra // n_red
    slots = p.phy2log.view(ep, nlp)
    for r in range(ep):
        assert slots[r, :nll].tolist() == order[r * nll : (r + 1) * nll].tolist()
        base, g = (r // gs) * gs, r % gs
        for c in range(comb):
            for d in range(n_red):
                src = base + int(r2o[g, d])
                assert slots[r, nll + c * n_red + d] == slots[src, c * n_red + d]
    # log2phy: home (original) first, then the copy
    home = p.log2phy[:, 0]
    assert bool((home % nlp < nll).all())
    assert torch.equal(p.phy2log[home], torch.arange(L))
    assert int(p.logcnt.sum()) == p.n_physical


def test_from_r2o_errors():
    with pytest.raises(LPLBInputError, match="multiple of the topology's group_size"):
        ExpertPlacement.from_r2o(topology.cube(), 300, 256, 12)
    with pytest.raises(LPLBInputError, match="multiples of ep_size"):
        ExpertPlacement.from_r2o(topology.cube(), 321, 256, 32)
    with pytest.raises(LPLBInputError, match="positive multiple of n_redundant=2"):
        ExpertPlacement.from_r2o(topology.cube(), 288, 256, 32)
    with pytest.raises(LPLBInputError, match="exceed"):
        ExpertPlacement.from_r2o(topology.cube(), 8 * 8, 8 * 2, 8)
    with pytest.raises(LPLBInputError, match="permutation"):
        ExpertPlacement.from_r2o(topology.cube(), 320, 256, 32, expert_order=torch.zeros(256, dtype=torch.int64))


def test_from_phy2log_any_copies():
    # EPLB README example, layer 0: two copies of experts on one GPU are allowed
    phy2log = torch.tensor([5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1])
    p = ExpertPlacement.from_phy2log(phy2log, 8)
    assert p.logcnt.tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]
    assert p.log2phy[5].tolist() == [0, 2]
    assert p.slot_rank.tolist() == [r for r in range(8) for _ in range(2)]
    g = SplitGraph.from_placement(p)
    assert g.movable.tolist() == [1, 4, 5, 10]
    loads = torch.arange(12, dtype=torch.float64)
    assert float(g.fixed_loads(loads).sum() + g.demands(loads).sum()) == float(loads.sum())
    # two copies of expert 2 on rank 0 and one on rank 1: one edge of multiplicity 2
    q = ExpertPlacement.from_phy2log(torch.tensor([2, 2, 0, 2, 1, 3]), 2)
    gq = SplitGraph.from_placement(q)
    assert gq.movable.tolist() == [2]
    assert gq.edge_rank.tolist() == [0, 1] and gq.edge_mult.tolist() == [2, 1]
    x = gq.slot_split(torch.tensor([1.0, 1.0, 9.0, 1.0]), torch.tensor([6.0, 3.0]))
    assert x.tolist() == [3.0, 3.0, 1.0, 3.0, 1.0, 1.0]


def test_from_phy2log_errors():
    with pytest.raises(LPLBInputError, match="multiple of n_ranks"):
        ExpertPlacement.from_phy2log(torch.arange(10), 4)
    with pytest.raises(LPLBInputError, match="missing experts"):
        ExpertPlacement.from_phy2log(torch.tensor([0, 0, 2, 2]), 2, 3)
    with pytest.raises(LPLBInputError, match=r"values must lie in \[0, 3\)"):
        ExpertPlacement.from_phy2log(torch.tensor([0, 1, 2, 3]), 2, 3)
    with pytest.raises(LPLBInputError, match="integer"):
        ExpertPlacement.from_phy2log(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(LPLBInputError, match="n_ranks"):
        ExpertPlacement.from_phy2log(torch.arange(4), 0)
    with pytest.raises(LPLBInputError, match="home_slots"):
        ExpertPlacement.from_phy2log(torch.tensor([0, 1, 0, 1]), 2, home_slots=torch.tensor([1, 1]))


def test_home_slots_move_to_front():
    p = ExpertPlacement.from_phy2log(torch.tensor([0, 1, 0, 1]), 2, home_slots=torch.tensor([2, 1]))
    assert p.log2phy.tolist() == [[2, 0], [1, 3]]


def test_components_and_slot_split_round_trip():
    p = ExpertPlacement.from_r2o(topology.cube(), 320, 256, 32)
    g = SplitGraph.from_placement(p)
    assert g.component.tolist() == [8 * (r // 8) for r in range(32)]
    assert g.n_movable == 64 and g.n_edges == 128
    gen = torch.Generator().manual_seed(0)
    loads = torch.rand(256, generator=gen, dtype=torch.float64) * 100
    flow = torch.rand(g.n_edges, generator=gen, dtype=torch.float64)
    x = g.slot_split(loads, flow)
    assert torch.allclose(g.edge_flow_from_slots(x), flow)
    assert torch.allclose(g.rank_loads(g.fixed_loads(loads), flow), x.view(32, 10).sum(1) + 0 * x.view(32, 10).sum(1))
