"""lplb_plugin.replicas, the plain-layout helpers: fill slots from logical experts,
gather them back, and the gradient sum inside autograd (single process; the multi-rank
paths run in tests/deepspeed over real gloo groups)."""

import pytest
import torch

from lplb_plugin.errors import LPLBInputError
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.replicas import (
    fill_slots_from_logical,
    gather_owned_logical,
    owned_experts,
    replica_max_abs_diff,
    with_replica_grad_sum,
)

# 3 logical experts, 5 slots on one rank: expert 0 twice, expert 2 twice
PLACEMENT = ExpertPlacement.from_phy2log(torch.tensor([0, 1, 2, 0, 2]), n_ranks=1, n_logical=3)
SLOT_EXPERT = [0, 1, 2, 0, 2]


def slots(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # mixed dtypes: a slot may carry parameters and buffers
    return [[torch.randn(2, 3, generator=g), torch.randn(4, generator=g).double()] for _ in range(n)]


def test_owned_experts():
    assert list(owned_experts(PLACEMENT, 0)) == [0, 1, 2]
    with pytest.raises(LPLBInputError, match="ep_rank"):
        owned_experts(PLACEMENT, 1)


def test_fill_is_bit_exact_and_gather_inverts_it():
    owned = slots(3, seed=1)
    owned[1][0][0, 0] = -0.0  # a float sum would turn it into +0.0
    s = slots()
    fill_slots_from_logical(PLACEMENT, 0, s, owned)
    for slot, e in zip(s, SLOT_EXPERT):
        for a, b in zip(slot, owned[e]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.signbit(s[1][0][0, 0])
    assert replica_max_abs_diff(PLACEMENT, 0, [[t.float() for t in slot] for slot in s]) == 0.0
    back = gather_owned_logical(PLACEMENT, 0, s)
    for a_slot, b_slot in zip(back, owned):
        for a, b in zip(a_slot, b_slot):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_grad_sum_inside_autograd():
    params = [[torch.randn(2, 3, requires_grad=True)] for _ in range(5)]
    weights = with_replica_grad_sum(PLACEMENT, 0, params)
    sum((w[0] * (i + 1)).sum() for i, w in enumerate(weights)).backward()
    # slot i's own gradient is i+1; every copy of an expert gets the sum over its copies
    want = {0: 1 + 4, 1: 2, 2: 3 + 5}
    for s, e in enumerate(SLOT_EXPERT):
        assert torch.equal(params[s][0].grad, torch.full((2, 3), float(want[e])))

    params = [[torch.randn(2, 3, requires_grad=True)] for _ in range(5)]
    weights = with_replica_grad_sum(PLACEMENT, 0, params, enabled=False)
    sum((w[0] * (i + 1)).sum() for i, w in enumerate(weights)).backward()
    assert torch.equal(params[3][0].grad, torch.full((2, 3), 4.0))


def test_bad_inputs():
    with pytest.raises(LPLBInputError, match="4 local slots"):
        fill_slots_from_logical(PLACEMENT, 0, slots(4), slots(3))
    bad = slots()
    bad[2] = [torch.zeros(3, 2), torch.zeros(4).double()]
    with pytest.raises(LPLBInputError, match=r"slot_tensors\[2\]"):
        gather_owned_logical(PLACEMENT, 0, bad)
    with pytest.raises(LPLBInputError, match="owned must list 3"):
        fill_slots_from_logical(PLACEMENT, 0, slots(), slots(2))
    with pytest.raises(LPLBInputError, match="slot_params has 4"):
        with_replica_grad_sum(PLACEMENT, 0, slots(4))
