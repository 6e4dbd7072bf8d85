"""``lplb report``: how well each balancing policy does on real expert loads, across
EP sizes and node counts, with and without replicas crossing nodes.

For every EP size (default 16, 32, 64 ranks = 2, 4, 8 nodes of 8 GPUs) each policy
places the experts per layer on one load profile (``--place-on``) and is evaluated on
batches drawn from another (``--eval-on``: drift) and, for reference, from the same
one (no drift).  A batch is ``tokens_per_rank * topk * ep`` routed tokens drawn from a
layer's loads (multinomial).  The measure is max / mean rank load of the planned split
(the LP's objective; the token-level rewrite adds at most one token per rank and copy,
see ``lplb simulate``), averaged over batches, and its p99.

Policies (``/node``: replicas stay inside a node; ``/global``: they may cross nodes):
    none            no replicas, contiguous experts
    eplb/node       EPLB hierarchical placement, tokens split evenly over copies
    eplb/global     EPLB global placement, even split
    lplb5/node      upstream LPLB: cube 8x2 groups (one node each), 5-step IPM
    exact-cube/node the same cube placement, our exact split
    exact/node      EPLB hierarchical placement, our exact split
    exact/global    EPLB global placement, our exact split
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import LPLBConfig
from .data import load_profile
from .errors import LPLBInputError
from .layout import ExpertPlacement
from .planner import eplb_groups_and_nodes, expert_order_by_load
from .placement import rebalance_experts
from .problem import SplitGraph
from .solvers import solve_graph
from .topology import cube

__all__ = ["ReportSpec", "REPORT_POLICIES", "run_report", "write_report"]

REPORT_POLICIES = ("none", "eplb/node", "eplb/global", "lplb5/node", "exact-cube/node", "exact/node", "exact/global")


@dataclass
class ReportSpec:
    """What ``lplb report`` evaluates (the CLI's flags)."""

    place_on: str = "decode"
    eval_on: str = "prefill"
    ep_sizes: tuple[int, ...] = (16, 32, 64)
    gpus_per_node: int = 8
    redundant_per_rank: int = 2
    num_groups: int = 8
    tokens_per_rank: int = 4096
    topk: int = 8
    batches: int = 16
    seed: int = 0
    policies: tuple[str, ...] = REPORT_POLICIES

    def validate(self, n_logical: int) -> None:
        for name in ("gpus_per_node", "redundant_per_rank", "num_groups", "tokens_per_rank", "topk", "batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LPLBInputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        bad = [p for p in self.policies if p not in REPORT_POLICIES]
        if bad or not self.policies:
            raise LPLBInputError(f"--policies: unknown {bad}; expected a comma list of {', '.join(REPORT_POLICIES)}")
        for ep in self.ep_sizes:
            if ep < 2 or ep % self.gpus_per_node or n_logical % ep:
                raise LPLBInputError(
                    f"--ep {ep}: must be a multiple of --gpus-per-node={self.gpus_per_node} and divide the "
                    f"{n_logical} experts of the profiles"
                )
        if any(p.startswith(("lplb5", "exact-cube")) for p in self.policies) and self.gpus_per_node % 8:
            raise LPLBInputError(f"the cube policies need --gpus-per-node to be a multiple of 8, got {self.gpus_per_node}")


@dataclass
class _Stats:
    mm: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)

    def row(self) -> dict:
        t = torch.tensor(self.mm, dtype=torch.float64)
        return {
            "max_over_mean": float(t.mean()),
            "max_over_mean_p99": float(t.quantile(0.99)),
            "solve_ms": float(torch.tensor(self.ms).mean()) if self.ms else 0.0,
        }


def _config(scope: str, nodes: int, groups: int, red: int) -> LPLBConfig:
    return LPLBConfig.from_dict(
        {"placement": {"policy": "eplb", "num_nodes": nodes, "num_groups": groups, "redundant_per_rank": red},
         "lp": {"scope": scope}},
        source="lplb report",
    )


def _placements(spec: ReportSpec, profile: torch.Tensor, ep: int) -> dict[str, list[ExpertPlacement]]:
    """Per policy family, one placement per layer of ``profile``."""
    L = profile.shape[1]
    nodes = ep // spec.gpus_per_node
    P = L + ep * spec.redundant_per_rank
    out: dict[str, list[ExpertPlacement]] = {}
    for scope in ("node", "global"):
        if not any(p.endswith("/" + scope) and p.split("/")[0] in ("eplb", "exact") for p in spec.policies):
            continue
        groups, n = eplb_groups_and_nodes(_config(scope, nodes, spec.num_groups, spec.redundant_per_rank), L)
        phy2log, _, _ = rebalance_experts(profile, P, groups, n, ep)
        out[scope] = [ExpertPlacement.from_phy2log(phy2log[i], ep, L) for i in range(profile.shape[0])]
    if any(p.startswith(("lplb5", "exact-cube")) for p in spec.policies):
        n_red = cube().shape[1]
        if spec.redundant_per_rank % n_red == 0:
            out["cube"] = [
                ExpertPlacement.from_r2o(cube(), P, L, ep, expert_order_by_load(profile[i], ep))
                for i in range(profile.shape[0])
            ]
    return out


def _evaluate(spec: ReportSpec, place: torch.Tensor, run: torch.Tensor, ep: int, gen: torch.Generator) -> dict:
    L = run.shape[1]
    placements = _placements(spec, place, ep)
    graphs: dict[tuple[str, int], SplitGraph] = {}
    stats = {p: _Stats() for p in spec.policies}
    tokens = spec.tokens_per_rank * spec.topk * ep
    for b in range(spec.batches):
        layer = b % run.shape[0]
        w = run[layer] / run[layer].sum()
        loads = torch.bincount(torch.multinomial(w, tokens, replacement=True, generator=gen), minlength=L).double()
        mean = float(loads.sum()) / ep
        for policy in spec.policies:
            if policy == "none":
                stats[policy].mm.append(float(loads.view(ep, -1).sum(1).max()) / mean)
                continue
            family = "cube" if policy.startswith(("lplb5", "exact-cube")) else policy.split("/")[1]
            if family not in placements:
                continue
            key = (family, layer % place.shape[0])
            g = graphs.get(key)
            if g is None:
                g = graphs[key] = SplitGraph.from_placement(placements[family][key[1]])
            t0 = time.perf_counter()
            if policy.startswith("eplb/"):
                flow = g.even_flow(loads)
            elif policy.startswith("lplb5"):
                from .solvers.lplb_ipm import solve_lplb_ipm

                flow = solve_lplb_ipm(g, loads).edge_flow
            else:
                flow = solve_graph(g, loads, "exact").edge_flow
            ms = (time.perf_counter() - t0) * 1e3
            rl = g.rank_loads(g.fixed_loads(loads), flow)
            stats[policy].mm.append(float(rl.max()) / mean)
            if not policy.startswith("eplb/"):
                stats[policy].ms.append(ms)
    return {p: s.row() for p, s in stats.items() if s.mm}


def run_report(spec: ReportSpec, progress: bool = True) -> dict:
    """Evaluate every policy at every EP size, with drift and without."""
    place = load_profile(spec.place_on)
    run = load_profile(spec.eval_on)
    if place.shape[1] != run.shape[1]:
        raise LPLBInputError(
            f"--place-on has {place.shape[1]} experts per layer, --eval-on has {run.shape[1]}"
        )
    spec.validate(place.shape[1])
    gen = torch.Generator().manual_seed(spec.seed)
    results = []
    todo = [(ep, drift) for ep in spec.ep_sizes for drift in (True, False)]
    from tqdm import tqdm

    for ep, drift in tqdm(todo, desc="lplb report", disable=not progress, leave=False):
        rows = _evaluate(spec, place if drift else run, run, ep, gen)
        for policy, row in rows.items():
            results.append({"ep": ep, "nodes": ep // spec.gpus_per_node, "drift": drift, "policy": policy, **row})
    return {"spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(spec).items()}, "results": results}


def format_markdown(report: dict) -> str:
    """One table per drift setting: policies x EP sizes, max/mean (p99)."""
    spec = report["spec"]
    eps = spec["ep_sizes"]
    lines = [
        f"Placed on `{spec['place_on']}`, evaluated on `{spec['eval_on']}`; {spec['batches']} batches of "
        f"{spec['tokens_per_rank']} tokens/rank x top-{spec['topk']} per EP size; "
        f"{spec['redundant_per_rank']} redundant slots per rank, {spec['gpus_per_node']} GPUs per node. "
        f"Cells: mean max/mean rank load over batches (p99 in brackets); solve ms is the mean per batch.",
    ]
    for drift in (True, False):
        title = "With drift (placed on one profile, run on the other)" if drift else "Without drift (placed and run on the same profile)"
        lines += ["", f"### {title}", ""]
        head = "| policy | " + " | ".join(f"EP{ep} ({ep // spec['gpus_per_node']} nodes)" for ep in eps) + " | solve ms (EP" + str(eps[-1]) + ") |"
        lines += [head, "|---" * (len(eps) + 2) + "|"]
        for policy in spec["policies"]:
            cells, ms = [], "-"
            for ep in eps:
                r = [x for x in report["results"] if x["ep"] == ep and x["drift"] == drift and x["policy"] == policy]
                cells.append(f"{r[0]['max_over_mean']:.3f} ({r[0]['max_over_mean_p99']:.3f})" if r else "n/a")
                if r and ep == eps[-1] and r[0]["solve_ms"]:
                    ms = f"{r[0]['solve_ms']:.2f}"
            lines.append(f"| {policy} | " + " | ".join(cells) + f" | {ms} |")
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.md``, ``report.json`` and ``max_over_mean.png`` into
    ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text("# lplb report\n\n" + format_markdown(report) + "\n")
    js = out / "report.json"
    js.write_text(json.dumps(report, indent=1))
    png = out / "max_over_mean.png"
    _plot(report, png)
    return [md, js, png]


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = report["spec"]
    eps, policies = spec["ep_sizes"], spec["policies"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / len(policies)
    for ax, drift in zip(axes, (True, False)):
        for i, policy in enumerate(policies):
            ys = []
            for ep in eps:
                r = [x for x in report["results"] if x["ep"] == ep and x["drift"] == drift and x["policy"] == policy]
                ys.append(r[0]["max_over_mean"] if r else float("nan"))
            ax.bar([k + i * width for k in range(len(eps))], ys, width=width, label=policy)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(eps))])
        ax.set_xticklabels([f"EP{ep}\n{ep // spec['gpus_per_node']} nodes" for ep in eps])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title("with drift" if drift else "without drift")
        ax.set_ylabel("mean max / mean rank load")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
