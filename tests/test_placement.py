"""Tests of lplb_plugin.placement: the vectorised EPLB-style placement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_loop_reference import rebalance_experts_loop
from lplb_plugin.errors import LPLBInputError
from lplb_plugin.placement import rebalance_experts

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]


# --------------------------------------------------------------------------- helpers
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_case(rng: np.random.Generator) -> tuple[int, int, int, int, int]:
    """Random valid ``(num_logical, num_replicas, num_groups, num_nodes, num_gpus)``."""
    experts = int(rng.choice([2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96]))
    gpus = int(rng.choice([1, 2, 3, 4, 6, 8, 12, 16]))
    nodes = int(rng.choice(divisors(gpus)))
    groups = int(rng.choice(divisors(experts)))
    per_gpu = -(-experts // gpus) + int(rng.choice([0, 0, 1, 2, 4]))
    if rng.random() < 0.15 and experts % gpus == 0:
        per_gpu = experts // gpus  # no redundant slot at all
    return experts, per_gpu * gpus, groups, nodes, gpus


def tie_free_weight(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    """Continuous random loads of assorted skew (ties have probability ~0)."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.random((layers, experts)) * 1000
    if kind == 1:
        return rng.exponential(size=(layers, experts))
    return rng.lognormal(0.0, 1.5, size=(layers, experts)) * 1e5


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for name, g, w in zip(("phy2log", "log2phy", "logcnt"), got, want):
        assert g.dtype == torch.int64 and g.device.type == "cpu", name
        assert torch.equal(g, w), f"{name} differs:\n{g}\nvs\n{w}"


def check_invariants(out, weight, num_replicas, num_groups, num_nodes, num_gpus) -> None:
    phy2log, log2phy, logcnt = out
    weight = torch.as_tensor(np.asarray(weight, dtype=np.float32))
    layers, experts = weight.shape
    assert phy2log.shape == (layers, num_replicas)
    assert logcnt.shape == (layers, experts)
    assert log2phy.shape == (layers, experts, int(logcnt.max()))
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < experts
    # Every expert has a copy; the counts match phy2log and fill every slot.
    assert int(logcnt.min()) >= 1
    assert torch.equal(logcnt.sum(1), torch.full((layers,), num_replicas))
    for layer in range(layers):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=experts), logcnt[layer])
    # log2phy lists exactly the slots of each expert, then -1.
    k = torch.arange(log2phy.shape[2])
    valid = k < logcnt.unsqueeze(-1)
    assert bool((log2phy[~valid] == -1).all())
    slots = log2phy[valid].view(-1)
    assert bool((slots >= 0).all())
    owner = torch.arange(experts).expand(layers, experts).unsqueeze(-1).expand_as(log2phy)[valid]
    layer_of = torch.arange(layers).view(-1, 1, 1).expand_as(log2phy)[valid]
    assert torch.equal(phy2log[layer_of, slots], owner)
    for layer in range(layers):
        got = log2phy[layer][valid[layer]]
        assert torch.equal(got.sort().values, torch.arange(num_replicas))
    # Each GPU holds num_replicas / num_gpus slots by layout, heaviest copy first when
    # it holds several.
    per_gpu = num_replicas // num_gpus
    copy_load = (weight / logcnt).gather(1, phy2log).view(layers, num_gpus, per_gpu)
    assert bool((copy_load[:, :, :-1] >= copy_load[:, :, 1:]).all())
    # Hierarchical placements keep each node's slots to whole groups, num_groups /
    # num_nodes of them.
    if num_groups % num_nodes == 0:
        per_node = num_replicas // num_nodes
        group_size = experts // num_groups
        for layer in range(layers):
            node_groups = phy2log[layer].view(num_nodes, per_node) // group_size
            seen = set()
            for node in range(num_nodes):
                groups = set(node_groups[node].tolist())
                assert len(groups) == num_groups // num_nodes
                assert not groups & seen
                seen |= groups


# --------------------------------------------------------------------------- README
def test_readme_example_exact():
    phy2log, log2phy, logcnt = rebalance_experts(
        README_WEIGHT, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8
    )
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert logcnt.tolist() == [
        [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
    ]
    # As printed by EPLB itself on this input.
    assert log2phy[0].tolist() == [
        [12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2],
        [1, -1], [3, -1], [4, -1], [9, -1], [8, 10], [14, -1],
    ]
    assert log2phy[1].tolist() == [
        [13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12],
        [2, 4], [0, -1], [6, 3], [7, -1], [1, -1], [5, -1],
    ]
    check_invariants((phy2log, log2phy, logcnt), README_WEIGHT, 16, 4, 2, 8)


def test_readme_example_global_policy_matches_reference():
    # 4 groups over 3 nodes is not hierarchical-compatible -> global policy.
    out = rebalance_experts(README_WEIGHT, 18, 4, 3, 6)
    assert_same(out, rebalance_experts_loop(README_WEIGHT, 18, 4, 3, 6))
    check_invariants(out, README_WEIGHT, 18, 4, 3, 6)


# --------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("chunk", range(12))
def test_matches_loop_reference_on_random_tie_free_inputs(chunk):
    """25 random cases per chunk, 300 in all, both policies."""
    rng = np.random.default_rng(1000 + chunk)
    for _ in range(25):
        experts, replicas, groups, nodes, gpus = random_case(rng)
        layers = int(rng.integers(1, 6))
        weight = tie_free_weight(rng, layers, experts)
        out = rebalance_experts(weight, replicas, groups, nodes, gpus)
        assert_same(out, rebalance_experts_loop(weight, replicas, groups, nodes, gpus))
        check_invariants(out, weight, replicas, groups, nodes, gpus)


@pytest.mark.parametrize(
    "experts,replicas,groups,nodes,gpus",
    [
        (64, 64, 8, 4, 16),   # hierarchical, no redundant slot
        (48, 48, 8, 3, 6),    # global, no redundant slot
        (64, 80, 8, 4, 16),   # hierarchical
        (64, 80, 4, 8, 16),   # global: groups % nodes != 0
        (64, 80, 1, 1, 16),   # global, spelled out
        (64, 72, 8, 8, 8),    # one GPU per node
        (64, 72, 8, 1, 8),    # one node: groups sorted by load on it
        (64, 72, 4, 4, 8),    # one group per node: groups stay in order
        (32, 32, 4, 2, 32),   # one slot per GPU: copies stay in creation order
        (32, 40, 4, 2, 40),   # one slot per GPU, with copies
        (16, 40, 4, 2, 2),    # many copies per expert
        (8, 64, 2, 2, 4),     # up to 8+ copies of an expert
        (12, 16, 4, 2, 8),    # README shape
        (1, 4, 1, 1, 2),      # one expert
    ],
)
def test_matches_loop_reference_on_edge_shapes(experts, replicas, groups, nodes, gpus):
    rng = np.random.default_rng(experts * 1000 + replicas)
    for layers in (1, 4):
        weight = tie_free_weight(rng, layers, experts)
        out = rebalance_experts(weight, replicas, groups, nodes, gpus)
        assert_same(out, rebalance_experts_loop(weight, replicas, groups, nodes, gpus))
        check_invariants(out, weight, replicas, groups, nodes, gpus)


def test_deepseek_v3_scale_matches_loop_reference():
    rng = np.random.default_rng(7)
    weight = rng.lognormal(0.0, 1.0, size=(4, 256)) * 1e4
    for groups, nodes in ((8, 4), (1, 4)):
        out = rebalance_experts(weight, 288, groups, nodes, 32)
        assert_same(out, rebalance_experts_loop(weight, 288, groups, nodes, 32))
        check_invariants(out, weight, 288, groups, nodes, 32)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_tie_breaking_matches_loop_reference(data):
    """With heavy ties (small integers, zeros) both follow the same documented rules:
    first index wins argmax/argmin, stable descending packing order."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    experts, replicas, groups, nodes, gpus = random_case(rng)
    high = data.draw(st.sampled_from([1, 2, 4, 16]))
    weight = rng.integers(0, high, size=(int(rng.integers(1, 4)), experts))
    out = rebalance_experts(weight, replicas, groups, nodes, gpus)
    assert_same(out, rebalance_experts_loop(weight, replicas, groups, nodes, gpus))
    check_invariants(out, weight, replicas, groups, nodes, gpus)


def test_tall_inputs_are_split_and_still_match():
    # 8200 rows x 16 experts and x 8 GPUs overflow the 16-bit cell ids of the greedy
    # keys, so both greedy loops run on row chunks.
    rng = np.random.default_rng(3)
    weight = rng.random((8200, 16))
    out = rebalance_experts(weight, 32, 1, 1, 8)
    assert_same(out, rebalance_experts_loop(weight, 32, 1, 1, 8))


def test_all_zero_weight_is_deterministic():
    out = rebalance_experts(torch.zeros(2, 16), 24, 4, 2, 8)
    check_invariants(out, np.zeros((2, 16)), 24, 4, 2, 8)
    # All loads tie: each extra copy goes to expert 0 of its node first.
    assert out[2][0].tolist() == [5, 1, 1, 1, 1, 1, 1, 1, 5, 1, 1, 1, 1, 1, 1, 1]
    assert_same(out, rebalance_experts_loop(torch.zeros(2, 16), 24, 4, 2, 8))


# --------------------------------------------------------------------------- inputs
def test_accepts_tensors_arrays_and_lists_of_any_real_dtype():
    want = rebalance_experts(torch.tensor(README_WEIGHT, dtype=torch.float32), 16, 4, 2, 8)
    for weight in (
        README_WEIGHT,
        np.array(README_WEIGHT, dtype=np.int32),
        np.array(README_WEIGHT, dtype=np.float64),
        torch.tensor(README_WEIGHT),
        torch.tensor(README_WEIGHT, dtype=torch.float16),
        torch.tensor(README_WEIGHT, dtype=torch.bfloat16),
        torch.tensor(README_WEIGHT, dtype=torch.float64, requires_grad=True),
        torch.tensor(README_WEIGHT, dtype=torch.float64).t().contiguous().t(),
    ):
        assert_same(rebalance_experts(weight, 16, 4, 2, 8), want)
    # numpy integer sizes are fine.
    assert_same(rebalance_experts(README_WEIGHT, np.int64(16), 4, 2, np.int32(8)), want)


def test_does_not_modify_input():
    weight = torch.tensor(README_WEIGHT, dtype=torch.float32)
    before = weight.clone()
    rebalance_experts(weight, 16, 4, 2, 8)
    assert torch.equal(weight, before)


def test_float64_loads_are_rounded_to_float32_like_eplb():
    # Two loads that differ only below float32 resolution tie, as in EPLB.
    weight = [[1.0, 1.0 + 1e-12, 0.5, 0.25]]
    out = rebalance_experts(weight, 5, 1, 1, 1)
    assert out[2].tolist() == [[2, 1, 1, 1]]


# --------------------------------------------------------------------------- errors
GOOD = dict(num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)


@pytest.mark.parametrize(
    "weight,pattern",
    [
        ([1.0, 2.0, 3.0], r"weight must be 2-D .*got shape \(3,\)"),
        (torch.ones(2, 3, 4), r"weight must be 2-D .*got shape \(2, 3, 4\)"),
        (torch.ones(0, 12), r"at least one layer and one expert, got shape \(0, 12\)"),
        ([[1.0, 2.0], [3.0]], r"weight must be a \[num_layers, num_logical\] array"),
        ([["a", "b"]], r"weight must hold real numbers, got dtype <U1"),
        (torch.ones(2, 12, dtype=torch.complex64), r"must have a real dtype, got torch.complex64"),
        (torch.ones(2, 12, dtype=torch.bool), r"weight must have a real dtype, got torch.bool"),
        ([[1.0] * 11 + [-2.0]], r"weight must be non-negative, got -2.0 at index \(0, 11\)"),
        ([[1.0] * 5 + [math.nan] + [1.0] * 6], r"weight must be finite, got nan at index \(0, 5\)"),
        ([[1.0] * 5 + [math.inf] + [1.0] * 6], r"weight must be finite, got inf at index \(0, 5\)"),
        ([[1e38] * 12], r"weight: layer 0 sums to 1.2e\+39"),
    ],
)
def test_rejects_bad_weight(weight, pattern):
    with pytest.raises(LPLBInputError, match=pattern):
        rebalance_experts(weight, **GOOD)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(num_replicas=8), r"num_replicas must be >= the number of logical experts \(12\), "
                               r"got 8"),
        (dict(num_replicas=20), r"num_replicas must be a multiple of num_gpus \(8\), got 20"),
        (dict(num_nodes=3), r"num_gpus must be a multiple of num_nodes \(3\), got 8"),
        (dict(num_groups=5), r"num_groups must divide the number of logical experts \(12\), got 5"),
        (dict(num_replicas=65536), r"num_replicas must be at most 65535, got 65536"),
        (dict(num_gpus=0), r"num_gpus must be a positive integer, got 0"),
        (dict(num_nodes=-2), r"num_nodes must be a positive integer, got -2"),
        (dict(num_groups=2.0), r"num_groups must be a positive integer, got 2.0 \(float\)"),
        (dict(num_replicas=True), r"num_replicas must be a positive integer, got True"),
        (dict(num_replicas="16"), r"num_replicas must be a positive integer, got '16' \(str\)"),
    ],
)
def test_rejects_bad_sizes(overrides, pattern):
    with pytest.raises(LPLBInputError, match=pattern):
        rebalance_experts(README_WEIGHT, **{**GOOD, **overrides})


def test_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        rebalance_experts(README_WEIGHT, 8, 4, 2, 8)
