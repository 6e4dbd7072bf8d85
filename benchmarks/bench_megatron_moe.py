"""Megatron MoE layer forward+backward time, plain vs LPLB, under skewed routing.

    torchrun --nproc-per-node 4 benchmarks/bench_megatron_moe.py            # GPUs, NCCL
    torchrun --nproc-per-node 2 benchmarks/bench_megatron_moe.py --tokens 512 --hidden 64   # CPU, gloo

Builds one plain ``MoELayer`` and one ``LPLBMoELayer`` (same logical experts, same gate
with a skew: the first experts get a positive gate bias, inputs carry a constant offset),
copies the plain experts into every LPLB copy, checks the outputs agree, then times
``--iters`` forward+backward passes of each, alternating, after ``--warmup``.  Prints one
JSON object from rank 0: median / p90 ms per pass for each, the measured max/mean
per-rank token load of each (tokens the dispatcher delivers per EP rank), and the LPLB
layer's own metrics (planned load, solve time).  Expert-parallel size = world size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from integration.megatron import cpu_shims  # noqa: E402

cpu_shims.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from lplb_plugin import LPLBConfig  # noqa: E402
from lplb_plugin.megatron import balance_metrics, with_lplb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--redundant-per-rank", type=int, default=2)
    ap.add_argument("--policy", choices=("eplb", "topology"), default="topology", help="topology: ring over the EP ranks, 1 copy slot per rank; eplb: EPLB slots on uniform loads")
    ap.add_argument("--skew", type=float, default=3.0, help="gate logit bias of the hottest expert (linear down to 0)")
    ap.add_argument("--dispatcher", default="alltoall", choices=("alltoall", "allgather"))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    ws, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=ws)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn,
        num_attention_heads=8, num_moe_experts=args.experts, moe_router_topk=args.topk,
        moe_token_dispatcher_type=args.dispatcher, add_bias_linear=False, moe_aux_loss_coeff=1e-2,
        expert_model_parallel_size=ws, use_cpu_initialization=True, params_dtype=torch.float32,
        moe_grouped_gemm=False, bf16=False, fp16=False,
    )
    if args.policy == "eplb":
        placement = {"policy": "eplb", "redundant_per_rank": args.redundant_per_rank}
    else:
        placement = {"policy": "topology", "topology": "ring", "topology_shape": [ws], "redundant_per_rank": 1}
    lplb_cfg = LPLBConfig.from_dict({"placement": placement})
    builder = get_gpt_layer_local_spec(num_experts=args.experts).submodules.mlp
    plain = builder(config=config)
    layer = with_lplb(builder, lplb_cfg)(config=config)
    with torch.no_grad():
        # skew: gate bias decreasing with the expert id, along the input offset direction
        bias = args.skew * (1 - torch.arange(args.experts, dtype=torch.float32) / (args.experts - 1))
        plain.router.weight += bias.unsqueeze(1) / args.hidden
        layer.router.weight.copy_(plain.router.weight)
        mine = {plain.local_expert_indices[i]: [p.detach().clone() for p in ex.parameters()]
                for i, ex in enumerate(plain.experts.local_experts)}
        gathered = [None] * ws
        dist.all_gather_object(gathered, mine)
        experts = {k: v for d in gathered for k, v in d.items()}
        S = layer.placement.slots_per_rank
        for i, params in enumerate(layer.local_slot_params()):
            for p, src in zip(params, experts[int(layer.placement.phy2log[rank * S + i])]):
                p.copy_(src)
    plain.to(device)
    layer.to(device)

    loads = {"plain": [], "lplb": []}

    def hook(name, owner):
        def fn(module, inputs, output):
            per_expert = output[1].sum(0).to("cpu", torch.float64)
            loads[name].append(torch.zeros(ws, dtype=torch.float64).index_add_(0, owner, per_expert))
        return fn

    plain.router.register_forward_hook(hook("plain", torch.arange(args.experts) // (args.experts // ws)))
    layer.router.register_forward_hook(hook("lplb", layer.placement.slot_rank))

    g = torch.Generator().manual_seed(100 + rank)
    x = (torch.randn(args.tokens, 1, args.hidden, generator=g) + 1.0).to(device)
    w = torch.randn(args.tokens, 1, args.hidden, generator=g).to(device)

    def step(module):
        inp = x.clone().requires_grad_(True)
        out, _ = module(inp)
        (out * w).sum().backward()
        return out.detach()

    max_diff = float((step(plain) - step(layer)).abs().max())

    def timed(module):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step(module)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return 1e3 * (time.perf_counter() - t0)

    for _ in range(args.warmup):
        timed(plain)
        timed(layer)
    balance_metrics([layer])  # drop warm-up statistics
    for k in loads:
        loads[k].clear()
    times = {"plain": [], "lplb": []}
    for _ in range(args.iters):
        times["plain"].append(timed(plain))
        times["lplb"].append(timed(layer))
    metrics = balance_metrics([layer])

    def ratio(per_call):
        total = torch.stack(per_call).to(device)
        dist.all_reduce(total)
        total = total.cpu()
        return float((total.max(1).values / total.mean(1)).mean())

    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "world_size": ws, "experts": args.experts, "physical_experts": layer.placement.n_physical,
        "topk": args.topk, "hidden": args.hidden, "ffn": args.ffn, "tokens_per_rank": args.tokens,
        "dispatcher": args.dispatcher, "policy": args.policy, "skew": args.skew, "iters": args.iters,
        "output_max_abs_diff": max_diff,
    }
    for name in ("plain", "lplb"):
        ts = sorted(times[name])
        result[f"{name}_ms_median"] = round(statistics.median(ts), 3)
        result[f"{name}_ms_p90"] = round(ts[int(0.9 * (len(ts) - 1))], 3)
        result[f"{name}_rank_max_over_mean"] = round(ratio(loads[name]), 4)
    result["lplb_planned_max_over_mean"] = round(metrics.get("lplb/all/max_over_mean_after", float("nan")), 4)
    result["lplb_solve_ms"] = round(metrics.get("lplb/all/solve_ms", float("nan")), 3)
    if rank == 0:
        print(json.dumps(result))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
