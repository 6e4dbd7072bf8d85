"""Megatron helpers shared by the tests (run inside the spawned workers)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def init_parallel(ep: int, seed: int = 1234) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def moe_config(n_experts=8, topk=2, dispatcher="alltoall", ep=1, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=4,
        num_moe_experts=n_experts, moe_router_topk=topk, moe_token_dispatcher_type=dispatcher,
        moe_ffn_hidden_size=32, add_bias_linear=False, moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss", expert_model_parallel_size=ep,
        use_cpu_initialization=True, params_dtype=torch.float32, moe_grouped_gemm=False,
        bf16=False, fp16=False,
    )
    base.update(kw)
    return TransformerConfig(**base)


def gather_objects(obj, group=None):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
