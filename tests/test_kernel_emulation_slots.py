"""The per-slot split the solve kernels write (csrc/slot_split.cuh), built for the CPU:
from the copy table and each component's local flows, ``x`` and the copy shares are
the reference's functions of the flow, bit for bit (tests/gpu checks the CUDA build the
same way)."""

import pytest
import torch

from instances import instances
from kernel_emulation import compiler, slot_split_host
from lplb_plugin.redirect import copy_fractions
from lplb_plugin.solvers.exact import solve_exact

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler")


def test_slot_split_equals_the_reference():
    gen = torch.Generator().manual_seed(17)
    seen_zero = 0
    for inst in instances(80, seed=13):
        g, p = inst.graph, inst.placement
        flows = [solve_exact(g, inst.loads).edge_flow]
        # and a flow where whole experts carry nothing (their copies then split evenly)
        rnd = torch.rand(g.n_edges, generator=gen, dtype=torch.float64) * 1e3
        dead = torch.rand(g.n_movable, generator=gen) < 0.3
        rnd[dead[g.edge_expert]] = 0.0
        seen_zero += int(dead.sum())
        flows.append(rnd)
        for k, flow in enumerate(flows):
            x, cum = slot_split_host(g, p.log2phy, p.logcnt, inst.loads, flow)
            assert torch.equal(x, g.slot_split(inst.loads, flow)), (inst.name, k)
            assert torch.equal(cum, copy_fractions(x, p.log2phy, p.logcnt)), (inst.name, k)
    assert seen_zero > 0
