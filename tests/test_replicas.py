"""lplb_plugin.replicas on one rank (group=None): weight fill / gather, gradient sum,
identity check.  The multi-rank paths run in tests/deepspeed (real gloo groups)."""

import pytest
import torch

from lplb_plugin.errors import LPLBInputError
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.replicas import (
    ReplicaLayout,
    fill_slots_from_logical,
    gather_owned_logical,
    replicas_identical,
    sum_replica_grads,
    with_replica_grad_sum,
)

# 3 logical experts, 5 slots on one rank: expert 0 twice, expert 2 twice
PLACEMENT = ExpertPlacement.from_phy2log(torch.tensor([0, 1, 2, 0, 2]), n_ranks=1, n_logical=3)


def slots(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(2, 3, generator=g), torch.randn(4, generator=g).double()] for _ in range(n)]


def test_layout():
    lay = ReplicaLayout.from_placement(PLACEMENT, 0)
    assert lay.slot_expert.tolist() == [0, 1, 2, 0, 2]
    assert lay.n_shared == 2 and lay.shared_row.tolist() == [0, -1, 1, 0, 1]
    assert list(lay.owned_experts) == [0, 1, 2]
    with pytest.raises(LPLBInputError, match="ep_rank"):
        ReplicaLayout.from_placement(PLACEMENT, 1)


def test_fill_is_bit_exact_and_gather_inverts_it():
    lay = ReplicaLayout.from_placement(PLACEMENT, 0)
    owned = slots(3, seed=1)
    owned[1][0][0, 0] = -0.0  # a float sum would turn it into +0.0
    s = slots()
    fill_slots_from_logical(s, lay, owned)
    for slot, e in zip(s, lay.slot_expert.tolist()):
        for a, b in zip(slot, owned[e]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.signbit(s[1][0][0, 0])
    assert replicas_identical(s, lay)
    back = gather_owned_logical(s, lay)
    for a_slot, b_slot in zip(back, owned):
        for a, b in zip(a_slot, b_slot):
            assert torch.equal(a, b)
    s[3][1][0] += 1e-12
    assert not replicas_identical(s, lay)


def test_grad_sum_and_autograd_node():
    lay = ReplicaLayout.from_placement(PLACEMENT, 0)
    g = slots(seed=3)
    out = sum_replica_grads(g, lay)
    for s, e in enumerate(lay.slot_expert.tolist()):
        copies = [i for i, x in enumerate(lay.slot_expert.tolist()) if x == e]
        for t in range(2):
            want = sum(g[i][t] for i in copies)
            torch.testing.assert_close(out[s][t], want)
    assert out[1][0] is g[1][0]  # single copy: untouched
    assert torch.equal(out[0][0], out[3][0])

    params = [[torch.randn(2, 3, requires_grad=True)] for _ in range(5)]
    weights = with_replica_grad_sum(params, lay)
    sum((w[0] * (i + 1)).sum() for i, w in enumerate(weights)).backward()
    # slot i's own gradient is (i+1); copies of one expert get the sum over its copies
    want = {0: 1 + 4, 1: 2, 2: 3 + 5}
    for s, e in enumerate(lay.slot_expert.tolist()):
        assert torch.equal(params[s][0].grad, torch.full((2, 3), float(want[e])))

    params = [[torch.randn(2, 3, requires_grad=True)] for _ in range(5)]
    weights = with_replica_grad_sum(params, lay, enabled=False)
    sum((w[0] * (i + 1)).sum() for i, w in enumerate(weights)).backward()
    assert torch.equal(params[3][0].grad, torch.full((2, 3), 4.0))


def test_bad_inputs():
    lay = ReplicaLayout.from_placement(PLACEMENT, 0)
    with pytest.raises(LPLBInputError, match="must list 5 slots"):
        sum_replica_grads(slots(4), lay)
    bad = slots()
    bad[2] = [torch.zeros(3, 2), torch.zeros(4).double()]
    with pytest.raises(LPLBInputError, match=r"slot_tensors\[2\]"):
        replicas_identical(bad, lay)
    with pytest.raises(LPLBInputError, match="owned must list 3"):
        fill_slots_from_logical(slots(), lay, slots(2))
