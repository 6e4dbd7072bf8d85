"""ComponentArrays: the per-component renumbering the solve kernels read."""

import torch

from instances import instances
from lplb_plugin.component_arrays import ComponentArrays


def _check(graph, a: ComponentArrays) -> None:
    R, E, M = graph.n_ranks, graph.n_edges, graph.n_movable
    assert a.comp_rank_off[-1] == R and a.comp_exp_off[-1] == M and a.comp_edge_off[-1] == E
    assert sorted(a.rank_global.tolist()) == list(range(R))  # every rank in one block
    assert sorted(a.edge_global.tolist()) == list(range(E))
    for c in range(a.n_comp):
        rb, re_ = int(a.comp_rank_off[c]), int(a.comp_rank_off[c + 1])
        mb, me = int(a.comp_exp_off[c]), int(a.comp_exp_off[c + 1])
        eb, ee = int(a.comp_edge_off[c]), int(a.comp_edge_off[c + 1])
        ranks = a.rank_global[rb:re_].long()
        assert bool((graph.component[ranks] == graph.component[ranks[0]]).all())
        assert ranks.tolist() == sorted(ranks.tolist())
        exp_ptr = a.exp_ptr[mb + c: me + c + 1].long()
        rank_ptr = a.rank_ptr[rb + c: re_ + c + 1].long()
        assert exp_ptr[0] == 0 and exp_ptr[-1] == ee - eb and rank_ptr[-1] == ee - eb
        for local in range(ee - eb):
            g = int(a.edge_global[eb + local])
            m_local = int(a.edge_exp[eb + local])
            assert exp_ptr[m_local] <= local < exp_ptr[m_local + 1]
            assert int(graph.edge_rank[g]) == int(ranks[int(a.edge_rank[eb + local])])
            assert int(graph.edge_mult[g]) == int(a.edge_mult[eb + local])
            assert int(graph.movable[graph.edge_expert[g]]) == int(a.exp_log[mb + m_local])
        # each rank's edges, by expert
        for r in range(re_ - rb):
            edges = a.rank_edges[eb + rank_ptr[r]: eb + rank_ptr[r + 1]].long()
            assert bool((a.edge_rank[eb + edges] == r).all())
            exps = a.edge_exp[eb + edges].tolist()
            assert exps == sorted(exps)
    # fixed slots: together with the edges, every slot of every rank is accounted for
    fixed_slots = int(a.fix_off[-1])
    assert fixed_slots == int((graph.slot_edge < 0).sum())


def test_arrays_describe_the_graph():
    seen = set()
    for inst in instances(60, seed=1):
        if id(inst.graph) in seen:
            continue
        seen.add(id(inst.graph))
        a = ComponentArrays.from_graph(inst.graph)
        assert all(t.dtype == torch.int32 for t in a.tensors())
        _check(inst.graph, a)


def test_copy_table_gives_the_reference_slot_split():
    """A copy's tokens read through the table (its local edge's flow over that edge's
    slots, as csrc/slot_split.cuh reads them) are SplitGraph.slot_split's, for every
    movable expert's copies in log2phy order; past an expert's copies the table holds
    -1."""
    gen = torch.Generator().manual_seed(5)
    seen = set()
    for inst in instances(60, seed=2):
        if id(inst.graph) in seen:
            continue
        seen.add(id(inst.graph))
        g, p = inst.graph, inst.placement
        a = ComponentArrays.from_graph(g)
        table = a.copy_table(g, p.log2phy, p.logcnt)
        C = p.log2phy.shape[1]
        assert table.dtype == torch.int32 and tuple(table.shape) == (g.n_movable, 1 + 2 * C)
        flow = torch.rand(g.n_edges, generator=gen, dtype=torch.float64) * 100
        x = g.slot_split(inst.loads, flow)
        for c in range(a.n_comp):
            mb, me, eb = int(a.comp_exp_off[c]), int(a.comp_exp_off[c + 1]), int(a.comp_edge_off[c])
            for m in range(mb, me):
                e, cnt = int(a.exp_log[m]), int(table[m, 0])
                assert cnt == int(p.logcnt[e])
                for k in range(C):
                    slot, local = int(table[m, 1 + 2 * k]), int(table[m, 2 + 2 * k])
                    if k >= cnt:
                        assert slot == -1 and local == -1
                        continue
                    assert slot == int(p.log2phy[e, k])
                    tokens = float(flow[int(a.edge_global[eb + local])]) / int(a.edge_mult[eb + local])
                    assert tokens == float(x[slot]), (inst.name, e, k)
