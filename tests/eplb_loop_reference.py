"""Straightforward per-layer Python-loop version of the EPLB placement algorithm.

The oracle for ``tests/test_placement.py`` and the baseline of
``benchmarks/bench_placement.py``: one layer and one node at a time, plain lists, one
greedy choice per Python statement.  It follows the conventions documented in
``lplb_plugin.placement`` (float32 arithmetic, lower index wins ties, stable packing
order, group loads summed in float64 then rounded), so for any input the two must agree
exactly.  Float32 rounding is emulated by storing values in ``array('f')``: an add or
divide of two float32 values done in float64 and rounded once to float32 gives the
correctly rounded float32 result.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import torch


def _f32(values: list[float]) -> list[float]:
    """Round each value to float32 (kept as Python floats)."""
    return list(array("f", values))


def pack(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Greedy packing, ``len(weights) / num_packs`` items per pack.

    Returns ``(pack_of_item, rank_in_pack_of_item)``.
    """
    n = len(weights)
    capacity = n // num_packs
    if capacity == 1:
        return list(range(n)), [0] * n
    loads = array("f", [0.0] * num_packs)
    sizes = [0] * num_packs
    pack_of = [0] * n
    rank_of = [0] * n
    # sorted() is stable and keeps equal keys in index order even with reverse=True.
    for item in sorted(range(n), key=weights.__getitem__, reverse=True):
        best = -1
        for p in range(num_packs):
            if sizes[p] < capacity and (best < 0 or loads[p] < loads[best]):
                best = p
        pack_of[item] = best
        rank_of[item] = sizes[best]
        sizes[best] += 1
        loads[best] += weights[item]
    return pack_of, rank_of


def replicate(weights: list[float], num_phy: int) -> tuple[list[int], list[int], list[int]]:
    """Greedy replication to ``num_phy`` copies.

    Returns ``(expert_of_copy, copy_index_of_copy, count_of_expert)``.
    """
    n = len(weights)
    expert_of = list(range(n))
    rank_of = [0] * n
    counts = [1] * n
    per_copy = array("f", weights)
    for _ in range(n, num_phy):
        best = 0
        for e in range(1, n):
            if per_copy[e] > per_copy[best]:
                best = e
        expert_of.append(best)
        rank_of.append(counts[best])
        counts[best] += 1
        per_copy[best] = weights[best] / counts[best]
    return expert_of, rank_of, counts


def place_layer(
    weights: list[float], num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[list[int], list[int], list[int]]:
    """One layer: returns ``(phy2log, phy_rank, logcnt)`` as lists."""
    experts = len(weights)
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = experts // num_nodes
    replicas_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    group_loads = []
    for g in range(num_groups):
        total = 0.0
        for j in range(group_size):
            total += weights[g * group_size + j]
        group_loads.append(total)
    node_of_group, rank_of_group = pack(_f32(group_loads), num_nodes)

    # Node-major expert order: node n's experts, its groups in packing order.
    node_experts: list[list[int]] = [[0] * experts_per_node for _ in range(num_nodes)]
    for g in range(num_groups):
        start = rank_of_group[g] * group_size
        for j in range(group_size):
            node_experts[node_of_group[g]][start + j] = g * group_size + j

    phy2log = [0] * num_replicas
    phy_rank = [0] * num_replicas
    logcnt = [0] * experts
    for node in range(num_nodes):
        local = node_experts[node]
        local_weights = [weights[e] for e in local]
        expert_of, rank_of, counts = replicate(local_weights, replicas_per_node)
        per_copy = _f32([local_weights[e] / counts[e] for e in expert_of])
        gpu_of, rank_on_gpu = pack(per_copy, gpus_per_node)
        for c in range(replicas_per_node):
            slot = node * replicas_per_node + gpu_of[c] * slots_per_gpu + rank_on_gpu[c]
            phy2log[slot] = local[expert_of[c]]
            phy_rank[slot] = rank_of[c]
        for i, e in enumerate(local):
            logcnt[e] = counts[i]
    return phy2log, phy_rank, logcnt


def rebalance_experts_loop(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``lplb_plugin.placement.rebalance_experts`` (no input checks)."""
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().double().numpy()
    rows = np.asarray(weight, dtype=np.float32).tolist()
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    phy2log, phy_rank, logcnt = [], [], []
    for row in rows:
        p, r, c = place_layer(row, num_replicas, num_groups, num_nodes, num_gpus)
        phy2log.append(p)
        phy_rank.append(r)
        logcnt.append(c)
    max_count = max(max(c) for c in logcnt)
    log2phy = [[[-1] * max_count for _ in row] for row in logcnt]
    for layer, (p, r) in enumerate(zip(phy2log, phy_rank)):
        for slot, (e, k) in enumerate(zip(p, r)):
            log2phy[layer][e][k] = slot
    return (
        torch.tensor(phy2log, dtype=torch.int64),
        torch.tensor(log2phy, dtype=torch.int64),
        torch.tensor(logcnt, dtype=torch.int64),
    )
