"""``lplb simulate``: replay per-batch routing through the Planner on a simulated EP
group and compare balancing policies.

Each batch draws every rank's router output (``tokens_per_rank x topk`` distinct
experts per token, Gumbel top-k on a real expert-load profile), sums the counts over
the simulated EP group, plans the split, rewrites every rank's ids through the same
redirect the Planner uses in training, and measures the load each rank really receives.

Policies:
    none        no replicas; rank r holds experts [r*L/R, (r+1)*L/R)
    eplb        EPLB placement (replicate + pack), each expert's tokens split evenly
                over its copies (static balancing only)
    lplb        upstream LPLB: topology placement (experts ordered by EPLB), split by a
                5-iteration affine-scaling IPM in float32 (its behaviour emulated)
    exact       the same topology placement, split by our exact solver
    ipm         the same topology placement, split by our converging IPM
    eplb+exact  the EPLB placement, split by our exact solver
Placements are built per layer from one profile and batches are drawn from another
(drift), as a deployment placed on yesterday's traffic would see.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import LPLBConfig
from .data import PROFILES, load_profile
from .errors import LPLBInputError
from .layout import ExpertPlacement
from .planner import Planner, SplitPlan, expert_order_by_load
from .placement import rebalance_experts
from .problem import SplitGraph
from .redirect import copy_fractions, redirect
from .topology import by_name

__all__ = ["SimulationSpec", "POLICIES", "run_simulation", "format_table", "load_trace"]

POLICIES = ("none", "eplb", "lplb", "exact", "ipm", "eplb+exact")
DEFAULT_POLICIES = ("none", "eplb", "lplb", "exact", "eplb+exact")


@dataclass
class SimulationSpec:
    """What to simulate (the CLI's flags).  The defaults are DeepSeek-V3's shape: 256
    experts, top-8, EP32 on 4 nodes, 2 redundant slots per rank."""

    n_experts: int = 256
    topk: int = 8
    ep_size: int = 32
    tokens_per_rank: int = 4096
    redundant_per_rank: int = 2
    topology: str = "cube"
    topology_shape: list[int] | None = None
    num_nodes: int = 4
    num_groups: int = 8
    batches: int = 32
    place_on: str = "decode"
    run_on: str = "prefill"
    trace: str | None = None
    policies: tuple[str, ...] = DEFAULT_POLICIES
    seed: int = 0
    lplb_iterations: int = 5

    def validate(self) -> None:
        for name in ("n_experts", "topk", "ep_size", "tokens_per_rank", "redundant_per_rank", "batches", "num_nodes", "num_groups", "lplb_iterations"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LPLBInputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.topk > self.n_experts:
            raise LPLBInputError(f"--topk={self.topk} must be <= --n-experts={self.n_experts}")
        if self.n_experts % self.ep_size:
            raise LPLBInputError(f"--n-experts={self.n_experts} must be a multiple of --ep-size={self.ep_size}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise LPLBInputError(f"--policies {','.join(self.policies)!s}: unknown {unknown}; expected a comma list of {', '.join(POLICIES)}")
        # the placement rules of the topology policy are the config's
        self.topology_config().placement.validate_for(self.n_experts, self.ep_size)

    def topology_config(self) -> LPLBConfig:
        return LPLBConfig.from_dict(
            {
                "placement": {
                    "policy": "topology",
                    "topology": self.topology,
                    "topology_shape": self.topology_shape,
                    "redundant_per_rank": self.redundant_per_rank,
                }
            },
            source="lplb simulate",
        )


@dataclass
class PolicyStats:
    name: str
    placement: str
    split: str
    max_over_mean: list[float] = field(default_factory=list)
    solve_ms: list[float] = field(default_factory=list)
    optimal: int = 0

    def summary(self) -> dict:
        mm = torch.tensor(self.max_over_mean, dtype=torch.float64)
        sm = torch.tensor(self.solve_ms or [0.0], dtype=torch.float64)
        return {
            "policy": self.name,
            "placement": self.placement,
            "split": self.split,
            "max_over_mean_mean": float(mm.mean()),
            "max_over_mean_p50": float(mm.quantile(0.5)),
            "max_over_mean_p99": float(mm.quantile(0.99)),
            "solve_ms_mean": float(sm.mean()),
            "solve_ms_p50": float(sm.quantile(0.5)),
            "solve_ms_p99": float(sm.quantile(0.99)),
            "optimal_batches": self.optimal,
            "batches": len(self.max_over_mean),
        }


def load_trace(path: str | Path, n_experts: int | None = None) -> torch.Tensor:
    """Per-batch global counts from a trace file.

    Formats (JSON): ``{"batches": [[c_0, ..., c_{L-1}], ...]}`` (one row per batch) or an
    expert-load profile ``{"logical_count": [[...], ...]}`` (rows read as batches,
    all-zero rows skipped).  Counts must be finite and non-negative.

    Returns:
        float64 ``[batches, L]``.
    """
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not ({"batches", "logical_count"} & set(data)):
        raise LPLBInputError(f"--trace {path}: expected a JSON object with key 'batches' (or 'logical_count')")
    rows = data.get("batches", data.get("logical_count"))
    try:
        counts = torch.tensor(rows, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise LPLBInputError(f"--trace {path}: 'batches' must be a list of equal-length lists of numbers ({exc})") from None
    if counts.dim() != 2 or counts.shape[0] == 0:
        raise LPLBInputError(f"--trace {path}: expected [batches, experts] counts, got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise LPLBInputError(f"--trace {path}: counts must be finite and non-negative")
    counts = counts[counts.sum(1) > 0]
    if n_experts is not None and counts.shape[1] != n_experts:
        raise LPLBInputError(f"--trace {path}: rows have {counts.shape[1]} experts, --n-experts is {n_experts}")
    return counts


# ---------------------------------------------------------------------- batches
def _sample_topk(gen: torch.Generator, weights: torch.Tensor, tokens: int, topk: int) -> torch.Tensor:
    """``[tokens, topk]`` distinct experts per token, drawn like sequential sampling
    without replacement with P(e) proportional to ``weights`` (exponential race: the
    ``topk`` smallest ``Exp(1) / w``), int64."""
    w = weights.to(torch.float32).clamp_min(1e-30)
    out = torch.empty(tokens, topk, dtype=torch.int64)
    step = 8192
    for s in range(0, tokens, step):
        n = min(step, tokens - s)
        # log(U) = -Exp(1), and rand + log is ~3x faster than exponential_ on CPU:
        # the largest log(U)/w are the smallest Exp/w
        race = torch.rand(n, w.numel(), generator=gen).clamp_(min=1e-38).log_().div_(w)
        out[s : s + n] = torch.topk(race, topk, dim=1).indices
    return out


def _split_counts(gen: torch.Generator, counts: torch.Tensor, n_ranks: int) -> list[torch.Tensor]:
    """Spread global counts of a trace row over ranks (uniformly at random) and return
    each rank's 1-D idx (its tokens in random order)."""
    L = counts.numel()
    c = counts.round().to(torch.int64)
    rank_of = torch.randint(0, n_ranks, (int(c.sum()),), generator=gen)
    ids = torch.repeat_interleave(torch.arange(L), c)
    out = []
    for r in range(n_ranks):
        mine = ids[rank_of == r]
        out.append(mine[torch.randperm(mine.numel(), generator=gen)])
    return out


# ---------------------------------------------------------------------- policies
class _Policy:
    """One balancing policy for one layer: a planner (or none) and a split rule."""

    def __init__(self, name: str, placement_label: str, split: str, planners: list[Planner | None]):
        self.name, self.placement_label, self.split = name, placement_label, split
        self.planners = planners

    def plan(self, layer: int, counts: torch.Tensor, lplb_iterations: int) -> tuple[Planner | None, SplitPlan | None]:
        planner = self.planners[layer]
        if planner is None:
            return None, None
        if self.split in ("exact", "ipm"):
            return planner, planner.plan(counts)
        graph: SplitGraph = planner._graph
        t0 = time.perf_counter()
        if self.split == "even":
            flow = graph.even_flow(counts)
            optimal = False
        else:  # upstream's 5-iteration IPM, emulated
            from .solvers.lplb_ipm import solve_lplb_ipm

            r = solve_lplb_ipm(graph, counts, iterations=lplb_iterations)
            flow, optimal = r.edge_flow, bool(r.accepted.all())
        seconds = time.perf_counter() - t0 if self.split != "even" else 0.0
        x = graph.slot_split(counts, flow)
        cum = copy_fractions(x, planner.log2phy, planner.logcnt)
        rl = graph.rank_loads(graph.fixed_loads(counts), flow)
        return planner, SplitPlan(counts, x, cum, rl, optimal, seconds)


def _build_policies(spec: SimulationSpec, place_profile: torch.Tensor) -> list[_Policy]:
    L, R = spec.n_experts, spec.ep_size
    n_layers = place_profile.shape[0]
    P = L + R * spec.redundant_per_rank
    r2o = by_name(spec.topology, spec.topology_shape)
    topo_label = f"{spec.topology} {r2o.shape[0]}x{r2o.shape[1]}, {P} slots"
    policies: list[_Policy] = []
    need_eplb = any(p in spec.policies for p in ("eplb", "eplb+exact"))
    need_topo = any(p in spec.policies for p in ("lplb", "exact", "ipm"))
    if need_eplb:
        groups, nodes = spec.num_groups, spec.num_nodes
        if L % groups or groups % nodes or R % nodes:
            groups, nodes = 1, 1  # EPLB's global policy
        phy2log, _, _ = rebalance_experts(place_profile, P, groups, nodes, R)
        eplb_planners = [
            Planner.from_placement(ExpertPlacement.from_phy2log(phy2log[i], R, L)) for i in range(n_layers)
        ]
        eplb_label = f"EPLB {'hierarchical' if nodes > 1 else 'global'}, {P} slots"
    if need_topo:
        topo_planners = {}
        for solver in ("exact", "ipm"):
            if solver == "ipm" and "ipm" not in spec.policies:
                continue
            topo_planners[solver] = [
                Planner.from_placement(
                    ExpertPlacement.from_r2o(r2o, P, L, R, expert_order_by_load(place_profile[i], R)),
                    solver=solver,
                )
                for i in range(n_layers)
            ]
    for name in spec.policies:
        if name == "none":
            policies.append(_Policy(name, f"contiguous, {L} slots", "-", [None] * n_layers))
        elif name == "eplb":
            policies.append(_Policy(name, eplb_label, "even", eplb_planners))
        elif name == "eplb+exact":
            policies.append(_Policy(name, eplb_label, "exact", eplb_planners))
        elif name == "lplb":
            policies.append(_Policy(name, topo_label, f"{spec.lplb_iterations}-iter IPM (upstream)", topo_planners["exact"]))
        elif name == "exact":
            policies.append(_Policy(name, topo_label, "exact", topo_planners["exact"]))
        elif name == "ipm":
            policies.append(_Policy(name, topo_label, "ipm (ours)", topo_planners["ipm"]))
    return policies


# ---------------------------------------------------------------------- main loop
def run_simulation(spec: SimulationSpec, progress: bool = True) -> dict:
    """Run the simulation; returns ``{"spec": ..., "policies": [summary...],
    "lp_optimum": ..., "series": {...}, "example": {...}}``."""
    spec.validate()
    gen = torch.Generator().manual_seed(spec.seed)
    L, R = spec.n_experts, spec.ep_size
    trace = load_trace(spec.trace, L) if spec.trace else None
    if trace is not None and spec.place_on == "trace":
        place_profile = trace.mean(0, keepdim=True)
    else:
        place_profile = _profile(spec.place_on, L)
    run_profile = None if trace is not None else _profile(spec.run_on, L)
    n_layers_run = trace.shape[0] if trace is not None else run_profile.shape[0]
    policies = _build_policies(spec, place_profile)
    stats = {p.name: PolicyStats(p.name, p.placement_label, p.split) for p in policies}
    n_batches = trace.shape[0] if trace is not None else spec.batches
    example: dict = {}
    bar = _progress(n_batches, progress)
    for b in range(n_batches):
        if trace is not None:
            rank_idx = _split_counts(gen, trace[b], R)
            place_layer = 0 if place_profile.shape[0] == 1 else b % place_profile.shape[0]
        else:
            layer = b % n_layers_run
            place_layer = layer % place_profile.shape[0]
            rank_idx = [_sample_topk(gen, run_profile[layer], spec.tokens_per_rank, spec.topk) for _ in range(R)]
        counts = torch.zeros(L, dtype=torch.float64)
        for idx in rank_idx:
            counts += torch.bincount(idx.reshape(-1), minlength=L).double()
        for policy in policies:
            planner, plan = policy.plan(place_layer, counts, spec.lplb_iterations)
            st = stats[policy.name]
            if planner is None:  # contiguous, no replicas
                loads = counts.view(R, L // R).sum(1)
            else:
                phys = _route_all_ranks(planner, plan, rank_idx)
                loads = torch.bincount(phys, minlength=planner.n_routed_experts).double().view(R, -1).sum(1)
                st.solve_ms.append(plan.solve_seconds * 1e3)
                st.optimal += int(plan.optimal)
            mean = float(loads.mean())
            st.max_over_mean.append(float(loads.max()) / mean if mean > 0 else 1.0)
            if b == 0:
                example[policy.name] = loads.tolist()
        bar.update(1)
    bar.close()
    return {
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        "policies": [stats[p.name].summary() for p in policies],
        "series": {name: s.max_over_mean for name, s in stats.items()},
        "example": example,
    }


def _route_all_ranks(planner: Planner, plan: SplitPlan, rank_idx: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's physical ids, flattened and concatenated.

    Runs the Planner's own redirect once over all ranks: rank ``r``'s ids are shifted
    to ``r * L + e`` and the tables repeated per rank, so sequence numbers stay per
    (rank, expert) exactly as if each rank called it alone, at the cost of one sort.
    """
    L = planner.n_logical_routed_experts
    shifted = torch.cat([
        torch.where(idx.reshape(-1) >= 0, idx.reshape(-1) + r * L, -1) for r, idx in enumerate(rank_idx)
    ])
    n = len(rank_idx)
    return redirect(shifted, plan.cum_frac.repeat(n, 1), planner.log2phy.repeat(n, 1), check=False)


def _profile(name_or_path: str, n_experts: int) -> torch.Tensor:
    try:
        prof = load_profile(name_or_path)
    except FileNotFoundError:
        raise LPLBInputError(
            f"profile {name_or_path!r}: not a shipped profile ({', '.join(PROFILES)}) nor an existing file"
        ) from None
    if prof.shape[1] != n_experts:
        raise LPLBInputError(f"profile {name_or_path!r} has {prof.shape[1]} experts per layer, --n-experts is {n_experts}")
    return prof


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="lplb simulate", unit="batch", leave=False)


# ---------------------------------------------------------------------- output
def format_table(result: dict) -> str:
    """Markdown table of the per-policy summaries."""
    s = result["spec"]
    head = (
        f"{s['n_experts']} experts, top-{s['topk']}, EP{s['ep_size']}, {s['tokens_per_rank']} tokens/rank, "
        f"{s['redundant_per_rank']} redundant slots/rank; placed on '{s['place_on']}', "
        f"run on '{s['trace'] or s['run_on']}'; {result['policies'][0]['batches']} batches"
    )
    rows = [
        head,
        "",
        "| policy | placement | split | max/mean mean | p50 | p99 | solve ms mean | p99 | solver status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["policies"]:
        solve = "-" if p["split"] in ("-", "even") else f"{p['solve_ms_mean']:.3f}"
        solve99 = "-" if p["split"] in ("-", "even") else f"{p['solve_ms_p99']:.3f}"
        if p["split"] in ("-", "even"):
            opt = "-"
        else:  # upstream's solver has an acceptance test, not an optimality proof
            word = "accepted" if p["policy"] == "lplb" else "optimal"
            opt = f"{word} {p['optimal_batches']}/{p['batches']}"
        rows.append(
            f"| {p['policy']} | {p['placement']} | {p['split']} | {p['max_over_mean_mean']:.4f} | "
            f"{p['max_over_mean_p50']:.4f} | {p['max_over_mean_p99']:.4f} | {solve} | {solve99} | {opt} |"
        )
    return "\n".join(rows)


def plot(result: dict, path: str | Path) -> None:
    """Per-rank load of the first batch (no balancing vs each policy) and max/mean over
    batches, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8))
    ex = result["example"]
    names = list(ex)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        loads = ex[name]
        mean = sum(loads) / len(loads)
        ax1.bar([r + i * width for r in range(len(loads))], [v / mean for v in loads], width=width, label=name)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("EP rank")
    ax1.set_ylabel("load / mean (batch 0)")
    ax1.set_title("Per-rank load before and after balancing")
    ax1.legend(ncol=len(names), fontsize=8)
    for name, series in result["series"].items():
        ax2.plot(series, label=name, marker=".", lw=1)
    ax2.set_xlabel("batch")
    ax2.set_ylabel("max / mean rank load")
    ax2.set_title("Imbalance over batches")
    ax2.legend(ncol=len(names), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
