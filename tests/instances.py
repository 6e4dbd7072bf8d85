"""Split-LP instances shared by the solver tests: topology and EPLB placements, with
real (DeepSeek-V3 profile) and synthetic loads, plus degenerate ones; and the
relative difference the tests compare splits by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from lplb_plugin import topology
from lplb_plugin.data import load_profile
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.placement import rebalance_experts
from lplb_plugin.problem import SplitGraph


@dataclass
class Instance:
    name: str
    placement: ExpertPlacement
    graph: SplitGraph
    loads: torch.Tensor  # float64 [L]


def rel_diff(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """max |a - b| over max(scale, 1) (0 for empty tensors)."""
    return float((a - b).abs().max()) / max(scale, 1.0) if a.numel() else 0.0


# csrc/solve_pair.cuh's kSubsetRanks: when no component has more ranks than this (nor
# more than 32 movable experts), the one-warp exact solvers bound every component by
# enumerating its rank sets, which gives the optimum itself, so each certifies in its
# first round (the general kernel may need more).
SUBSET_RANKS = 8


def takes_subsets(arrays) -> bool:
    """csrc/solve_pair.cuh's ``takes_subsets``: whether the one-warp exact solvers take
    the enumerated bound on these components (``arrays``: their ComponentArrays)."""
    return arrays.max_ranks <= SUBSET_RANKS and arrays.max_experts <= 32


def assert_warp_rounds(warp_iters, block_iters, status, arrays, tag=None) -> None:
    """Rounds of a one-warp exact solver (``warp_iters``, int ``[C, 2]``: rounds, Newton
    iterations) against the general kernel's (``block_iters``) on the same components
    (``arrays``: their ComponentArrays; ``status``: the warp solver's, ``[C]``): the
    same rounds and, to one, Newton iterations, unless the components take the
    enumerated bound (:func:`takes_subsets`); then one round where a component
    certifies (none where neither solver needs one: no demand)."""
    w = torch.as_tensor(warp_iters).cpu()
    b = torch.as_tensor(block_iters).cpu()
    if not takes_subsets(arrays):
        assert torch.equal(w[:, 0], b[:, 0]), tag
        assert bool(((w[:, 1] - b[:, 1]).abs() <= 1).all()), tag
        return
    done = torch.as_tensor(status).cpu().bool()
    assert torch.equal(w[done, 0], b[done, 0].clamp(max=1)), tag  # (0: nothing to solve)


def topology_placements(n_logical: int = 256) -> list[tuple[str, ExpertPlacement]]:
    """Upstream topologies at the EP sizes the issue names, plus small ones."""
    out = []
    for name, r2o, ep, extra in [
        ("ring8x1-ep8", topology.ring(8), 8, 1),
        ("ring8x1-ep32", topology.ring(8), 32, 1),
        ("ring8x1-ep64", topology.ring(8), 64, 1),
        ("cube-ep8", topology.cube(), 8, 2),
        ("cube-ep32", topology.cube(), 32, 2),
        ("cube-ep64", topology.cube(), 64, 2),
        ("cube-ep32-x2", topology.cube(), 32, 4),
        ("hypercube-ep16", topology.hypercube(), 16, 2),
        ("hypercube-ep32", topology.hypercube(), 32, 2),
        ("torus8x4-ep32", topology.torus_2d(8, 4), 32, 2),
        ("torus4x4-ep16", topology.torus_2d(4, 4), 16, 2),
        ("torus8x8-ep64", topology.torus_2d(8, 8), 64, 2),
    ]:
        p = ExpertPlacement.from_r2o(r2o, n_logical + ep * extra, n_logical, ep)
        out.append((name, p))
    return out


def mult2_placement() -> ExpertPlacement:
    """A two-copy placement with an edge of multiplicity 2: 8 ranks x 6 slots, experts
    0..39 in order, then expert 0 twice more on rank 7 (two slots there), 7, 13, 19, 25
    once more on rank 7, 31 and 1 once more on rank 6, so every replicated expert sits
    on exactly two ranks."""
    phy = list(range(36)) + [36, 37, 38, 39, 31, 1] + [0, 0, 7, 13, 19, 25]
    return ExpertPlacement.from_phy2log(torch.tensor(phy), 8, 40)


def chain_placement(n_ranks: int = 17) -> ExpertPlacement:
    """One component of n_ranks (>= 4) ranks with few edges: expert 0 on ranks 0, 1, 2,
    and expert r - 2 on ranks r - 1 and r for r = 3 .. n_ranks - 1 (a chain), the other
    slots (3 per rank) local experts.  2 n_ranks - 3 edges: 31 at 17 ranks, so that a
    component of more than 16 ranks fits the one-warp IPM for any placement
    (csrc/solve_ipm_warp.cuh, which takes its helper warps beyond 16 ranks)."""
    ranks: list[list[int]] = [[0] for _ in range(3)] + [[] for _ in range(n_ranks - 3)]
    for r in range(3, n_ranks):
        ranks[r - 1].append(r - 2)
        ranks[r].append(r - 2)
    nxt = n_ranks - 2
    for slots in ranks:
        while len(slots) < 3:
            slots.append(nxt)
            nxt += 1
    return ExpertPlacement.from_phy2log(torch.tensor([e for slots in ranks for e in slots]), n_ranks, nxt)


def two_copy_placements() -> list[tuple[str, ExpertPlacement]]:
    """Two-copy placements the one-warp solver takes: upstream topologies, and one with an
    expert holding two slots on one of its two ranks (edge multiplicity 2)."""
    out = [(n, p) for n, p in topology_placements() if SplitGraph.from_placement(p).n_ranks <= 64]
    p = mult2_placement()
    g = SplitGraph.from_placement(p)
    assert bool((torch.diff(g.expert_edge_ptr) == 2).all()) and int(g.edge_mult.max()) == 2
    out.append(("mult2", p))
    return out


def varied_loads(gen: torch.Generator, n_logical: int, k: int) -> torch.Tensor:
    """Load vector k of 6: steeper with k (up to ~27 orders of magnitude), rounded for
    odd k, 30% zeros for k = 5."""
    loads = (torch.rand(n_logical, generator=gen, dtype=torch.float64) ** (1 + 3 * k)) * 10 ** (2 + k % 3)
    if k % 2:
        loads = loads.round()
    if k == 5:
        loads[torch.rand(n_logical, generator=gen) < 0.3] = 0.0
    return loads


EPLB_CONFIGS = [  # (name, slots, groups, nodes, gpus)
    ("eplb-h-ep32-288", 288, 8, 4, 32),
    ("eplb-g-ep32-288", 288, 1, 1, 32),
    ("eplb-h-ep64-320", 320, 8, 8, 64),
    ("eplb-g-ep16-320", 320, 1, 1, 16),
    ("eplb-g-ep8-264", 264, 1, 1, 8),
]
# small enough for the one-warp solvers on the prefill profile: benchmarks/bench_planner.py's
# eplb-ep32-288, and 320 slots at EP32 and 272 at EP16
SMALL_EPLB_CONFIGS = [
    ("eplb-h-ep32-288", 288, 8, 4, 32),
    ("eplb-h-ep32-320", 320, 8, 4, 32),
    ("eplb-h-ep16-272", 272, 8, 2, 16),
    ("eplb-g-ep16-272", 272, 1, 1, 16),
]


def eplb_placements(profile: torch.Tensor, configs=EPLB_CONFIGS) -> list[tuple[str, ExpertPlacement]]:
    """EPLB placements (hierarchical and global) built on one profile row, one per
    (name, slots, groups, nodes, gpus) of ``configs``."""
    out = []
    for name, slots, groups, nodes, gpus in configs:
        phy2log, _, _ = rebalance_experts(profile.unsqueeze(0), slots, groups, nodes, gpus)
        out.append((name, ExpertPlacement.from_phy2log(phy2log[0], gpus, profile.numel())))
    return out


def random_placement(gen: torch.Generator, n_logical: int, n_ranks: int, per_rank: int) -> ExpertPlacement:
    """Any-number-of-copies placement: every expert once, the rest random (a rank may
    hold two copies of one expert)."""
    n_phys = n_ranks * per_rank
    base = torch.randperm(n_logical, generator=gen)
    rest = torch.randint(0, n_logical, (n_phys - n_logical,), generator=gen)
    phy2log = torch.cat([base, rest])[torch.randperm(n_phys, generator=gen)]
    return ExpertPlacement.from_phy2log(phy2log, n_ranks, n_logical)


def sample_batch(gen: torch.Generator, weights: torch.Tensor, tokens: int) -> torch.Tensor:
    """Multinomial draw of ``tokens`` routed tokens with ``weights`` as probabilities."""
    idx = torch.multinomial(weights / weights.sum(), tokens, replacement=True, generator=gen)
    return torch.bincount(idx, minlength=weights.numel()).to(torch.float64)


def zipf_loads(gen: torch.Generator, n: int, s: float, total: int) -> torch.Tensor:
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    w = w[torch.randperm(n, generator=gen)]
    return sample_batch(gen, w, total)


def instances(count: int, seed: int = 0, n_logical: int = 256) -> Iterator[Instance]:
    """``count`` instances cycling over placements and load kinds, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    prefill = load_profile("prefill")
    decode = load_profile("decode")
    placements = topology_placements(n_logical) + eplb_placements(decode[5])
    for i in range(6):
        placements.append((f"random{i}", random_placement(gen, n_logical, [8, 16, 32, 4, 12, 64][i], [40, 20, 9, 72, 24, 5][i])))
    graphs = {name: SplitGraph.from_placement(p) for name, p in placements}
    kinds = ["profile", "profile-drift", "zipf", "zipf-steep", "uniform", "zero", "one-hot", "sparse", "fractional"]
    for i in range(count):
        name, p = placements[i % len(placements)]
        kind = kinds[(i // len(placements)) % len(kinds)]
        layer = int(torch.randint(0, prefill.shape[0], (1,), generator=gen))
        tokens = int(torch.randint(512, 65536, (1,), generator=gen)) * 8
        if kind == "profile":
            loads = sample_batch(gen, prefill[layer], tokens)
        elif kind == "profile-drift":
            loads = sample_batch(gen, decode[layer], tokens)
        elif kind == "zipf":
            loads = zipf_loads(gen, n_logical, 1.0, tokens)
        elif kind == "zipf-steep":
            loads = zipf_loads(gen, n_logical, 2.0, tokens)
        elif kind == "uniform":
            loads = sample_batch(gen, torch.ones(n_logical, dtype=torch.float64), tokens)
        elif kind == "zero":
            loads = torch.zeros(n_logical, dtype=torch.float64)
        elif kind == "one-hot":
            loads = torch.zeros(n_logical, dtype=torch.float64)
            loads[int(torch.randint(0, n_logical, (1,), generator=gen))] = tokens
        elif kind == "sparse":
            loads = zipf_loads(gen, n_logical, 1.2, 64)
        else:  # non-integer loads (a cost model, not token counts)
            loads = torch.rand(n_logical, generator=gen, dtype=torch.float64) ** 3 * 1000
        yield Instance(f"{name}/{kind}/{i}", p, graphs[name], loads)
