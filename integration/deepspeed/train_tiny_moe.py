"""Train a tiny MoE language model with DeepSpeed and LPLB.

CPU (gloo) or GPU (NCCL), any world size that is a multiple of ``--ep-size``::

    torchrun --nproc_per_node 2 integration/deepspeed/train_tiny_moe.py \
        --config configs/deepspeed_tiny_moe.json --steps 50
    deepspeed --num_gpus 8 integration/deepspeed/train_tiny_moe.py --ep-size 8 --experts 64

The ds_config's top-level ``"lplb"`` block turns the plugin on (``--no-lplb`` drops it,
for a plain DeepSpeed baseline).  Rank 0 prints one JSON line per step: loss and, per
MoE layer, the max/mean rank load with LPLB and with plain DeepSpeed's layout.  The
token stream is skewed (Zipf) so that the router is imbalanced.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn


def parse_args() -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(here, "..", "..", "configs", "deepspeed_tiny_moe.json"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--experts", type=int, default=8, help="logical experts per MoE layer")
    p.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    p.add_argument("--k", type=int, default=2, help="top-k")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--no-lplb", action="store_true", help="drop the lplb block (plain DeepSpeed)")
    p.add_argument("--save-dir", default=None, help="save a checkpoint here at the end")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args()


class Block(nn.Module):
    def __init__(self, hidden: int, experts: int, ep_size: int, k: int):
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        expert = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        # dropless routing: LPLB requires it
        self.moe = MoE(hidden, expert, num_experts=experts, ep_size=ep_size, k=k, drop_tokens=False,
                       min_capacity=0, use_rts=False)

    def forward(self, x):
        h, l_aux, _ = self.moe(self.norm(x))
        return x + h, l_aux


class TinyMoELM(nn.Module):
    def __init__(self, args, ep_size: int):
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.hidden)
        self.blocks = nn.ModuleList(Block(args.hidden, args.experts, ep_size, args.k) for _ in range(args.layers))
        self.head = nn.Linear(args.hidden, args.vocab)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        aux = 0.0
        for block in self.blocks:
            x, l_aux = block(x)
            aux = aux + l_aux
        loss = nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())
        return loss + 0.01 * aux


def batch(step: int, rank: int, args, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    zipf = 1.0 / torch.arange(1, args.vocab + 1, dtype=torch.float64) ** 1.1
    tokens = torch.multinomial(zipf, n * (args.seq + 1), replacement=True, generator=g).view(n, args.seq + 1)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def main() -> None:
    args = parse_args()
    import deepspeed

    import lplb_plugin.deepspeed as lplb_ds

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ep_size = args.ep_size or world
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    if args.no_lplb:
        config.pop("lplb", None)
    torch.manual_seed(0)
    model = TinyMoELM(args, ep_size)
    engine, _, _, _ = lplb_ds.initialize(model=model, config=config, model_parameters=model.parameters())
    layers = lplb_ds.lplb_layers(engine.module)
    micro = engine.train_micro_batch_size_per_gpu()
    for step in range(args.steps):
        t0 = time.perf_counter()
        tokens, targets = batch(step, rank, args, micro, engine.device)
        loss = engine(tokens, targets)
        engine.backward(loss)
        stats = [m.balance_stats() for m in layers]  # before step() resets them
        engine.step()
        if rank == 0:
            line = {"step": step, "loss": round(loss.item(), 5), "seconds": round(time.perf_counter() - t0, 4)}
            if stats:
                line["max_over_mean_lplb"] = [round(s["max_over_mean"], 4) for s in stats]
                line["max_over_mean_plain"] = [round(s["max_over_mean_plain"], 4) for s in stats]
            print(json.dumps(line), flush=True)
    if layers:
        identical = [m.lplb_experts.replicas_identical() for m in layers]
        if rank == 0:
            print(json.dumps({"replicas_identical": identical}), flush=True)
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    # leave together: a rank that exits while others still talk to the rendezvous store
    # (a multi-node launch hosts it on node 0) can abort the job at teardown
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
