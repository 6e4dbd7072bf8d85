"""lplb_plugin.replicas: replica gradient sums, home -> copy sync and the divergence
check, single process and over a real 2-process gloo group."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lplb_plugin.errors import LPLBInputError
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.replicas import copy_home_to_replicas, replica_max_abs_diff, sum_replica_grads

# 2 ranks x 4 slots; expert 0 has 3 copies (two on rank 1), expert 3 has 2
PHY2LOG = torch.tensor([0, 1, 2, 3, 0, 4, 3, 0])
SHAPES = [(3, 2), (5,)]


def _slot_tensors(seed, n_slots):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g) for s in SHAPES] for _ in range(n_slots)]


def _expected_sums(all_slots):
    """all_slots: global slot -> tensors; returns global slot -> summed tensors."""
    out = {}
    for slot, e in enumerate(PHY2LOG.tolist()):
        same = [s for s, x in enumerate(PHY2LOG.tolist()) if x == e]
        out[slot] = [sum(all_slots[s][j] for s in same) for j in range(len(SHAPES))]
    return out


def test_single_process_all_slots_local():
    placement = ExpertPlacement.from_phy2log(PHY2LOG, 1)
    grads = _slot_tensors(0, 8)
    want = _expected_sums({s: [t.clone() for t in grads[s]] for s in range(8)})
    sum_replica_grads(placement, 0, grads)
    for s in range(8):
        for got, exp in zip(grads[s], want[s]):
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)
    params = _slot_tensors(1, 8)
    assert replica_max_abs_diff(placement, 0, params) > 0
    copy_home_to_replicas(placement, 0, params)
    assert replica_max_abs_diff(placement, 0, params) == 0.0
    assert torch.equal(params[7][0], params[0][0]) and not torch.equal(params[1][0], params[0][0])


def test_bad_inputs():
    placement = ExpertPlacement.from_phy2log(PHY2LOG, 2)
    with pytest.raises(LPLBInputError, match="4 per rank"):
        sum_replica_grads(placement, 0, _slot_tensors(0, 3))
    with pytest.raises(LPLBInputError, match="ep_rank"):
        sum_replica_grads(placement, 2, _slot_tensors(0, 4))
    bad = _slot_tensors(0, 4)
    bad[2][1] = torch.zeros(6)
    with pytest.raises(LPLBInputError, match="shapes differ"):
        sum_replica_grads(placement, 0, bad)


def _worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    placement = ExpertPlacement.from_phy2log(PHY2LOG, 2)
    everyone = _slot_tensors(0, 8)  # every rank knows all slots' values, owns 4
    want = _expected_sums(everyone)
    mine = [[t.clone() for t in everyone[rank * 4 + i]] for i in range(4)]
    sum_replica_grads(placement, rank, mine, dist.group.WORLD)
    err = max(float((g - w).abs().max()) for i in range(4) for g, w in zip(mine[i], want[rank * 4 + i]))
    params = [[t.clone() for t in everyone[rank * 4 + i]] for i in range(4)]
    before = replica_max_abs_diff(placement, rank, params, dist.group.WORLD)
    copy_home_to_replicas(placement, rank, params, dist.group.WORLD)
    after = replica_max_abs_diff(placement, rank, params, dist.group.WORLD)
    home_of_0 = everyone[0][0]
    copies_of_0 = [params[i][0] for i in range(4) if int(PHY2LOG[rank * 4 + i]) == 0]
    exact = all(torch.equal(c, home_of_0) for c in copies_of_0)
    out.put((rank, err, before, after, exact))
    dist.destroy_process_group()


def test_two_ranks_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for rank, err, before, after, exact in results:
        assert err <= 1e-6, (rank, err)
        assert before > 0 and after == 0.0 and exact, (rank, before, after, exact)
