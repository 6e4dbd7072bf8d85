"""Replica gradient summation inside Megatron's training step.

Megatron calls ``config.finalize_model_grads_func(model_chunks, ...)`` once per step,
after the backward passes of all micro-batches and before the optimizer; its default
(``finalize_model_grads``) performs the data-parallel reduction.  The plugin wraps that
function: it first sums, for every replicated logical expert, the gradients of all its
copies over the EP group (:func:`lplb_plugin.replicas.sum_replica_grads`), then calls the
wrapped function, so Megatron's own reduction and the optimizer see identical gradients
on every copy.

Supported: Megatron's ``DistributedDataParallel`` (gradients in ``param.main_grad``) and
plain modules (``param.grad``):

- ``overlap_grad_reduce=False`` (with or without the distributed optimizer): the replica
  sum runs first, on the full gradient buffers, then Megatron's reduction;
- ``overlap_grad_reduce=True`` without the distributed optimizer: Megatron's all-reduce of
  the expert gradients has already started during backward, so the replica sum runs
  after the wrapped function has finished it.  Both the DP all-reduce (over the
  expert-data-parallel group, a sum with a fixed scale) and the optional ``num_tokens``
  scaling are linear, so summing the copies afterwards gives the same gradients.

Rejected: ``overlap_grad_reduce=True`` with ``use_distributed_optimizer=True`` (after the
overlapped reduce-scatter each rank holds only a shard of its buffer, and the copies of
an expert sit at different buffer offsets on different EP ranks).
"""

from __future__ import annotations

import torch

from ..errors import LPLBConfigError
from ..replicas import sum_replica_grads
from .moe_layer import LPLBMoELayer

__all__ = ["install_replica_grad_sync", "sync_replica_grads", "lplb_layers"]


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def lplb_layers(model) -> list[LPLBMoELayer]:
    """All :class:`LPLBMoELayer` modules of a model or a list of model chunks."""
    return [m for chunk in _chunks(model) for m in chunk.modules() if isinstance(m, LPLBMoELayer)]


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    if grad is not None:
        return grad
    if param.grad is None:
        # a slot that received no token in any micro-batch still takes part in the sum
        param.grad = torch.zeros_like(param)
    return param.grad


def _overlapped(model) -> bool:
    """True if Megatron DDP reduces gradients during backward; rejects the combination
    with the distributed optimizer."""
    overlapped = False
    for chunk in _chunks(model):
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and getattr(ddp_config, "overlap_grad_reduce", False):
            if getattr(ddp_config, "use_distributed_optimizer", False):
                raise LPLBConfigError(
                    "DistributedDataParallelConfig.overlap_grad_reduce=True with "
                    "use_distributed_optimizer=True is not supported with LPLB (the expert gradients "
                    "are reduce-scattered before the replicas can be summed); set overlap_grad_reduce=False"
                )
            overlapped = True
    return overlapped


def sync_replica_grads(model) -> None:
    """Sum each replicated expert's gradients over all its copies (collective over each
    layer's EP group).  Call after backward, before the data-parallel reduction, or after
    a completed all-reduce (not after a reduce-scatter)."""
    for layer in lplb_layers(model):
        slot_grads = [[_grad_of(p) for p in params] for params in layer.local_slot_params()]
        sum_replica_grads(layer.placement, layer.ep_rank, slot_grads, layer._ep_group_or_none)


def install_replica_grad_sync(config) -> None:
    """Wrap ``config.finalize_model_grads_func`` (keeping any existing function) so the
    replica sum runs first.  Idempotent.

    Args:
        config: the model's ``TransformerConfig`` (Megatron's training loop calls
            ``config.finalize_model_grads_func(model_chunks, ...)``).  When no function
            is set yet, only the replica sum runs (the caller reduces over DP itself).
    """
    previous = getattr(config, "finalize_model_grads_func", None)
    if getattr(previous, "_lplb_wrapped", False):
        return

    def finalize_model_grads_with_replicas(model, *args, **kwargs):
        if _overlapped(model):
            out = previous(model, *args, **kwargs) if previous is not None else None
            sync_replica_grads(model)
            return out
        sync_replica_grads(model)
        return previous(model, *args, **kwargs) if previous is not None else None

    finalize_model_grads_with_replicas._lplb_wrapped = True
    finalize_model_grads_with_replicas.wrapped = previous
    config.finalize_model_grads_func = finalize_model_grads_with_replicas
