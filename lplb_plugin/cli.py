"""The ``lplb`` command."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LPLBError
from .report import REPORT_POLICIES, ReportSpec, format_markdown, run_report, write_report
from .simulate import DEFAULT_POLICIES, POLICIES, SimulationSpec, format_table, plot, run_simulation


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _policies(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown policies {bad}; choose from {', '.join(POLICIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lplb", description="LP load balancing of redundant MoE experts.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = SimulationSpec()
    sim = sub.add_parser(
        "simulate",
        help="replay routing through the Planner on a simulated EP group and compare policies",
        description="Replay per-batch routing through the Planner on a simulated EP group. "
        "Default: DeepSeek-V3 shape (256 experts, top-8, EP32, 2 redundant slots per rank), "
        "placed on the shipped 'decode' profile, batches drawn from the 'prefill' profile.",
    )
    sim.add_argument("--n-experts", type=int, default=d.n_experts, help="logical routed experts (default %(default)s)")
    sim.add_argument("--topk", type=int, default=d.topk, help="experts per token (default %(default)s)")
    sim.add_argument("--ep-size", type=int, default=d.ep_size, help="EP ranks (default %(default)s)")
    sim.add_argument("--tokens-per-rank", type=int, default=d.tokens_per_rank, help="tokens per rank per batch (default %(default)s)")
    sim.add_argument("--redundant-per-rank", type=int, default=d.redundant_per_rank, help="copy slots per rank (default %(default)s)")
    sim.add_argument("--topology", choices=("ring", "cube", "hypercube", "torus"), default=d.topology, help="redundancy graph of the lplb/exact/ipm policies (default %(default)s)")
    sim.add_argument("--topology-shape", type=_int_list, default=None, help="[n] for ring, m,n for torus")
    sim.add_argument("--num-nodes", type=int, default=d.num_nodes, help="nodes, for EPLB's hierarchical policy (default %(default)s)")
    sim.add_argument("--num-groups", type=int, default=d.num_groups, help="expert groups, for EPLB (default %(default)s)")
    sim.add_argument("--batches", type=int, default=d.batches, help="batches to replay (default %(default)s; one layer each, cycling)")
    sim.add_argument("--place-on", default=d.place_on, help="profile the placements are built on: 'decode', 'prefill', a file, or 'trace' (default %(default)s)")
    sim.add_argument("--run-on", default=d.run_on, help="profile batches are drawn from (default %(default)s)")
    sim.add_argument("--trace", default=None, help="replay your own per-batch counts (JSON, see docs/simulate.md)")
    sim.add_argument("--policies", type=_policies, default=DEFAULT_POLICIES, help=f"comma list of {', '.join(POLICIES)} (default: {','.join(DEFAULT_POLICIES)})")
    sim.add_argument("--seed", type=int, default=d.seed)
    sim.add_argument("--plot", default=None, metavar="OUT.png", help="draw per-rank loads and max/mean over batches")
    sim.add_argument("--json", default=None, metavar="OUT.json", help="write the full results as JSON")
    sim.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    r = ReportSpec()
    rep = sub.add_parser(
        "report",
        help="evaluate balancing policies on expert-load files across EP sizes and nodes",
        description="Evaluate no balancing, EPLB, upstream LPLB and the exact split, with replicas kept "
        "inside a node or allowed across nodes, at several EP sizes, placing on one load profile and "
        "evaluating on batches from another (drift). Writes report.md, report.json and a PNG.",
    )
    rep.add_argument("--place-on", default=r.place_on, help="profile to place on: 'decode', 'prefill' or a file (default %(default)s)")
    rep.add_argument("--eval-on", default=r.eval_on, help="profile batches are drawn from (default %(default)s)")
    rep.add_argument("--ep", type=_int_list, default=list(r.ep_sizes), help="EP sizes, comma list (default 16,32,64)")
    rep.add_argument("--gpus-per-node", type=int, default=r.gpus_per_node, help="(default %(default)s)")
    rep.add_argument("--redundant-per-rank", type=int, default=r.redundant_per_rank, help="(default %(default)s)")
    rep.add_argument("--num-groups", type=int, default=r.num_groups, help="expert groups for EPLB (default %(default)s)")
    rep.add_argument("--tokens-per-rank", type=int, default=r.tokens_per_rank, help="(default %(default)s)")
    rep.add_argument("--topk", type=int, default=r.topk, help="(default %(default)s)")
    rep.add_argument("--batches", type=int, default=r.batches, help="batches per EP size and drift setting (default %(default)s)")
    rep.add_argument("--policies", default=",".join(REPORT_POLICIES), help=f"comma list of {', '.join(REPORT_POLICIES)}")
    rep.add_argument("--seed", type=int, default=r.seed)
    rep.add_argument("--out", default="lplb_report", help="output folder (default %(default)s)")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        spec = ReportSpec(
            place_on=args.place_on, eval_on=args.eval_on, ep_sizes=tuple(args.ep),
            gpus_per_node=args.gpus_per_node, redundant_per_rank=args.redundant_per_rank,
            num_groups=args.num_groups, tokens_per_rank=args.tokens_per_rank, topk=args.topk,
            batches=args.batches, seed=args.seed,
            policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        )
        try:
            report = run_report(spec, progress=not args.no_progress)
        except (LPLBError, FileNotFoundError) as exc:
            print(f"lplb report: error: {exc}", file=sys.stderr)
            return 2
        paths = write_report(report, args.out)
        print(format_markdown(report))
        print("written: " + ", ".join(str(p) for p in paths))
        return 0
    if args.command == "simulate":
        spec = SimulationSpec(
            n_experts=args.n_experts, topk=args.topk, ep_size=args.ep_size,
            tokens_per_rank=args.tokens_per_rank, redundant_per_rank=args.redundant_per_rank,
            topology=args.topology, topology_shape=args.topology_shape, num_nodes=args.num_nodes,
            num_groups=args.num_groups, batches=args.batches, place_on=args.place_on,
            run_on=args.run_on, trace=args.trace, policies=args.policies, seed=args.seed,
        )
        try:
            result = run_simulation(spec, progress=not args.no_progress)
        except LPLBError as exc:
            print(f"lplb simulate: error: {exc}", file=sys.stderr)
            return 2
        print(format_table(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.plot:
            plot(result, args.plot)
            print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
