"""Pretrain a tiny GPT-MoE with megatron-core, LPLB on or off from the config.

    torchrun --nproc-per-node 2 integration/megatron/pretrain_gpt_moe.py \
        --config configs/megatron_tiny_moe.yaml --steps 20
    # LPLB off, or overrides of the YAML's lplb: block:
    ... --lplb-enabled false
    ... --lplb-placement-policy eplb --lplb-placement-redundant-per-rank 2

On a machine without CUDA it runs on the CPU over gloo with the documented test shims
(``integration/megatron/cpu_shims.py``); with CUDA it uses NCCL, one GPU per rank.  The
YAML has three blocks: ``model`` (``TransformerConfig`` fields), ``train`` (steps,
sizes, learning rate, injected router skew, logging) and ``lplb`` (the plugin; absent or
``enabled: false`` = plain Megatron).  Data is synthetic (random tokens, seeded per step
and data-parallel rank), so an LPLB run and a plain run see the same batches.

The training step is Megatron's: forward, backward, ``config.finalize_model_grads_func``
(Megatron's ``finalize_model_grads``: DP reduction; wrapped by the plugin to sum replica
gradients first), optimizer step on the reduced ``main_grad``.  It is written out here
rather than through ``pipeline_parallel.schedules`` (whose token counter hard-codes
``device="cuda"``) so the same code runs on CPU and GPU.

Functions are importable (the tests drive :func:`build`, :func:`train_step`,
:func:`save_checkpoint`, :func:`load_checkpoint` in spawned gloo jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from integration.megatron import cpu_shims  # noqa: E402

cpu_shims.apply()  # no-op with CUDA; must precede the first megatron import on CPU

import yaml  # noqa: E402
from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from lplb_plugin import LPLBConfig  # noqa: E402
from lplb_plugin.megatron import (  # noqa: E402
    add_lplb_args,
    install_replica_grad_sync,
    lplb_config_from_args,
    lplb_layers,
    log_balance_metrics,
    with_lplb,
)

TRAIN_DEFAULTS = {
    "steps": 20,
    "lr": 1.0e-3,
    "seq_length": 16,
    "micro_batch_size": 2,
    "vocab_size": 64,
    "seed": 1234,
    "router_skew": 0.0,  # expert_bias[e] = skew * (1 - e / (L - 1)): expert 0 hottest
    "log_interval": 5,
    "check_replicas_interval": 0,  # 0: off; n: check copies are bit-identical every n steps
}


def model_config(model: dict[str, Any], ep: int) -> TransformerConfig:
    """The run's ``TransformerConfig`` (fp32, no dropout, SequentialMLP experts)."""
    fields = dict(
        params_dtype=torch.float32, bf16=False, fp16=False, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, moe_grouped_gemm=False,
        use_cpu_initialization=True, expert_model_parallel_size=ep,
    )
    fields.update(model)
    return TransformerConfig(**fields)


def build(
    model: dict, train: dict, lplb: Optional[LPLBConfig], ep: int, *,
    overlap_grad_reduce: bool = False, use_distributed_optimizer: bool = False,
):
    """Build the DDP-wrapped GPT-MoE and its optimizer.

    The DDP options exist for the tests (the optimizer here is ``torch.optim.Adam`` on
    ``main_grad``; Megatron's distributed optimizer needs CUDA).

    Returns:
        ``(ddp_model, optimizer, config)``; ``config.finalize_model_grads_func`` is
        Megatron's ``finalize_model_grads``, wrapped by the replica sum when LPLB is on.
    """
    config = model_config(model, ep)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    if lplb is not None and lplb.enabled:
        spec = with_lplb(spec, lplb)
    gpt = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=train["vocab_size"],
        max_sequence_length=train["seq_length"],
    )
    if train["router_skew"]:
        inject_router_skew(gpt, train["router_skew"])
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            overlap_grad_reduce=overlap_grad_reduce, use_distributed_optimizer=use_distributed_optimizer
        ),
        gpt,
    )
    config.finalize_model_grads_func = finalize_model_grads
    if lplb is not None and lplb.enabled:
        install_replica_grad_sync(config)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=train["lr"])
    return ddp, optimizer, config


def inject_router_skew(model: torch.nn.Module, skew: float) -> None:
    """Skew routing the same way in plain and LPLB models: a fixed expert bias that
    makes low expert ids hot (``moe_router_enable_expert_bias`` with update rate 0)."""
    for module in model.modules():
        bias = getattr(module, "expert_bias", None)
        if isinstance(bias, torch.Tensor) and bias.ndim == 1:
            L = bias.numel()
            with torch.no_grad():
                bias.copy_(skew * (1 - torch.arange(L, dtype=torch.float32) / max(L - 1, 1)))


def batch(step: int, dp_rank: int, train: dict, device) -> torch.Tensor:
    """Synthetic tokens ``[micro_batch, seq]`` for one step and DP rank."""
    g = torch.Generator().manual_seed(train["seed"] * 1000 + step * 64 + dp_rank)
    return torch.randint(0, train["vocab_size"], (train["micro_batch_size"], train["seq_length"]), generator=g).to(device)


def train_step(ddp, optimizer, config, tokens: torch.Tensor) -> float:
    """One Megatron training step on one micro-batch; returns this rank's loss."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    labels = torch.roll(tokens, -1, dims=1)
    per_token = ddp(tokens, position_ids, None, labels=labels)
    loss = per_token.float().mean()
    loss.backward()
    config.finalize_model_grads_func([ddp], None)
    for p in ddp.parameters():
        p.grad = p.main_grad
    optimizer.step()
    return float(loss.detach())


def evaluate(ddp, tokens: torch.Tensor) -> float:
    """Loss on one micro-batch without updating anything."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        return float(ddp(tokens, position_ids, None, labels=torch.roll(tokens, -1, dims=1)).float().mean())


def save_checkpoint(ddp, directory: str) -> None:
    """Megatron distributed checkpoint of the model; with LPLB, only home copies under
    logical expert ids (loadable by plain Megatron), plus ``lplb_placement.json``."""
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(ddp.module.sharded_state_dict(), directory)
    layers = lplb_layers(ddp)
    if layers and dist.get_rank() == 0:
        placement = {
            f"layer_{layer.layer_number}" + ("_mtp" if layer.is_mtp_layer else ""): {
                "phy2log": layer.placement.phy2log.tolist(),
                "n_ranks": layer.placement.n_ranks,
                "home_slots": layer.placement.log2phy[:, 0].tolist(),
            }
            for layer in layers
        }
        with open(os.path.join(directory, "lplb_placement.json"), "w") as f:
            json.dump({"lplb": layers[0].lplb_config.to_dict(), "layers": placement}, f, indent=1)
    dist.barrier()


def load_checkpoint(ddp, directory: str) -> None:
    """Load a Megatron distributed checkpoint (from a plain or an LPLB run); every copy
    of an expert loads its logical shard, then copies are re-synced from home."""
    state = dist_checkpointing.load(ddp.module.sharded_state_dict(), directory)
    ddp.module.load_state_dict(state)
    for layer in lplb_layers(ddp):
        layer.copy_home_to_replicas()


def read_config(path: Optional[str]) -> dict:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def init_distributed(ep: int, seed: int) -> None:
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def main(argv: Optional[list[str]] = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "megatron_tiny_moe.yaml"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: world size)")
    parser.add_argument("--save", default=None, help="save a distributed checkpoint here at the end")
    parser.add_argument("--load", default=None, help="load a distributed checkpoint before training")
    parser.add_argument("--tensorboard-dir", default=None)
    add_lplb_args(parser)
    args = parser.parse_args(argv)

    if args.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            parser.error("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")
    raw = read_config(args.config)
    train = {**TRAIN_DEFAULTS, **(raw.get("train") or {})}
    if args.steps is not None:
        train["steps"] = args.steps
    lplb = lplb_config_from_args(args, raw.get("lplb"))
    world = int(os.environ.get("WORLD_SIZE", 1))
    ep = args.ep or world
    init_distributed(ep, train["seed"])
    rank = dist.get_rank()
    ddp, optimizer, config = build(raw.get("model") or {}, train, lplb, ep)
    if args.load:
        load_checkpoint(ddp, args.load)
    writer = None
    if args.tensorboard_dir and rank == 0:
        writer = SummaryWriter(args.tensorboard_dir)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dp_rank = parallel_state.get_data_parallel_rank()
    losses = []
    t0 = time.perf_counter()
    for step in range(1, train["steps"] + 1):
        loss = train_step(ddp, optimizer, config, batch(step, dp_rank, train, device))
        losses.append(loss)
        if train["check_replicas_interval"] and step % train["check_replicas_interval"] == 0:
            for layer in lplb_layers(ddp):
                diff = layer.replica_max_abs_diff()
                if diff != 0.0:
                    raise RuntimeError(f"LPLB: replicas of layer {layer.layer_number} diverged by {diff}")
        if step % train["log_interval"] == 0 or step == train["steps"]:
            metrics = log_balance_metrics(ddp, step, writer)
            if writer is not None:
                writer.add_scalar("lm loss", loss, step)
            if rank == 0:
                line = {"step": step, "loss": loss, "seconds": round(time.perf_counter() - t0, 3)}
                line.update({k: round(v, 4) for k, v in metrics.items() if k.startswith("lplb/all/")})
                print(json.dumps(line), flush=True)
    if args.save:
        save_checkpoint(ddp, args.save)
    if writer is not None:
        writer.close()
    # leave together: a rank that exits while others still talk to the rendezvous store
    # (a multi-node launch hosts it on node 0) can abort the job at teardown
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
