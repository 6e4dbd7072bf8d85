"""A multi-node EP job of the Planner alone, for torchrun.

Every rank builds the placement from the same ``lplb`` config (EPLB, node-scoped or
global), routes its own deterministic batch, sums counts over the EP group (the whole
world here), plans and rewrites; it writes what it saw to ``--out/rank{R}.pt``.  Run
it once as one node and once as ``--nnodes 2`` (two torchrun launches): every rank
must hold the same placement and split, equal to the single-node run's.

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port 29511 integration/multinode/planner_job.py --out /tmp/mn --num-nodes 2
    (and the same with --node_rank 1)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lplb_plugin import LPLBConfig, Planner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-nodes", type=int, default=1, help="nodes the EP group spans (lplb.placement.num_nodes)")
    ap.add_argument("--scope", default="node", choices=("node", "global"))
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LPLBConfig.from_dict(
        {
            "placement": {"policy": "eplb", "num_nodes": args.num_nodes, "num_groups": 4, "redundant_per_rank": 2},
            "lp": {"scope": args.scope},
        }
    )
    # the same historical load on every rank (as a shared workload file would give)
    workload = (torch.arange(args.experts, dtype=torch.float64) % 7 + 1) ** 2
    planner = Planner.from_config(cfg, args.experts, ep_size=world, group=dist.group.WORLD, workload=workload)
    record = {"phy2log": planner.phy2log, "x": [], "phys": [], "node_local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        # skewed routing: low expert ids are hot
        idx = (torch.rand(200, 2, generator=gen) ** 3 * args.experts).long()
        plan = planner.plan(planner.global_counts(planner.stats.local_counts(idx)))
        record["x"].append(plan.x)
        record["phys"].append(planner.redirect(idx, plan))
    os.makedirs(args.out, exist_ok=True)
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
