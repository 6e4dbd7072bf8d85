"""Replica gradient summation inside Megatron's training step.

Megatron calls ``config.finalize_model_grads_func(model_chunks, ...)`` once per step,
after the backward passes of all micro-batches and before the optimizer; its default
(``finalize_model_grads``) performs the data-parallel reduction.  The plugin wraps that
function: it first sums, for every replicated logical expert, the gradients of all its
copies over the EP group (:func:`lplb_plugin.replicas.sum_replica_grads`), then calls the
wrapped function, so Megatron's own reduction and the optimizer see identical gradients
on every copy.

Supported: Megatron's ``DistributedDataParallel`` (gradients in ``param.main_grad``) with
or without the distributed optimizer, and plain modules (``param.grad``).  Rejected:
``overlap_grad_reduce=True`` (the DP reduction of expert gradients would start during
backward, before the copies are summed).
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


def sync_replica_grads(model) -> None:
    """Sum each replicated expert's gradients over all its copies (collective over each
    layer's EP group).  Call after backward, before any data-parallel reduction."""
    for chunk in _chunks(model):
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and getattr(ddp_config, "overlap_grad_reduce", False):
            raise LPLBConfigError(
                "DistributedDataParallelConfig.overlap_grad_reduce=True is not supported with LPLB "
                "(expert gradients would be reduced before the replicas are summed); set it to False"
            )
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
        sync_replica_grads(model)
        if previous is not None:
            return previous(model, *args, **kwargs)
        return None

    finalize_model_grads_with_replicas._lplb_wrapped = True
    finalize_model_grads_with_replicas.wrapped = previous
    config.finalize_model_grads_func = finalize_model_grads_with_replicas
