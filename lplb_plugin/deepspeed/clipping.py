"""Gradient clipping that counts every logical expert once.

DeepSpeed clips by default (``gradient_clipping: 1.0``).  Its norm for MoE models is a
per-rank norm (the rank's own experts plus the non-expert parameters) averaged over the
data-parallel group.  With replicas a rank holds extra copies whose gradients would
enter that norm, so the clip factor, and training, would differ from the plain model.

Replica slots (every copy but the home copy, ``log2phy[e, 0]``) are therefore marked
``ds_pipe_replicated = True``: DeepSpeed's ZeRO 1/2 and bf16/fp16 norms already skip
such parameters (it is how pipeline-tied weights are counted once).  The ZeRO-0 fp32
path (``engine.clip_fp32_gradients``) does not look at the flag, so :func:`clip_fp32_gradients`
replaces it on the engine: the same formula, the flagged parameters left out of the norm
but scaled like every other gradient.

Exact parity with the plain model's clip factor holds when each rank's home copies are
the experts it owns in the plain layout (topology placements); with EPLB placements every
logical expert still counts once overall, but DeepSpeed's per-rank averaging then sees a
different split between ranks.
"""

from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.utils import groups

__all__ = ["mark_replicas", "clip_fp32_gradients"]


def mark_replicas(slot_params, home: list[bool]) -> None:
    """Flag the parameters of every non-home slot as replicated (left out of norms)."""
    for params, is_home in zip(slot_params, home):
        for p in params:
            setattr(p, PIPE_REPLICATED, not is_home)


def clip_fp32_gradients(engine) -> torch.Tensor:
    """``engine.clip_fp32_gradients`` for ZeRO 0 in fp32, replica-aware (see module doc).

    Returns the norm DeepSpeed would return (after the data-parallel averaging)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    mpu = engine.mpu
    norms = []
    for p in params:
        if getattr(p, PIPE_REPLICATED, False):
            continue
        if mpu is None or mpu.get_model_parallel_rank() == 0 or getattr(p, "model_parallel", False) \
                or getattr(p, "tensor_model_parallel", False):
            norms.append(p.grad.data.detach().float().norm(2))
    device = params[0].device if params else torch.device("cpu")
    total = torch.stack(norms).pow(2).sum().float() if norms else torch.zeros((), dtype=torch.float32, device=device)
    if mpu is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    total = total.pow(0.5)
    pg = groups._get_data_parallel_group()
    total = total * 1.0 / float(dist.get_world_size(group=pg))
    dist.all_reduce(total, group=pg)
    coef = torch.min(torch.tensor([1.0], device=total.device),
                     torch.tensor([float(engine.gradient_clipping())], device=total.device) / (total + 1e-6))
    for p in params:
        p.grad.data.mul_(coef.to(p.grad.device))
    return total
