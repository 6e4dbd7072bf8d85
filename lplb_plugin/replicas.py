"""Keeping replicated experts identical during training (framework-neutral).

A logical expert with ``logcnt[e] > 1`` has several physical copies, possibly on
different EP ranks.  For training to equal the non-replicated model, every copy must
start from the same weights and take the same optimizer step, i.e. receive the *sum* of
the gradients of all copies (each copy only saw the tokens routed to it).

All three functions take the parameters (or gradients) of this rank's local slots as
``slot_tensors``: a sequence with one entry per local slot ``i`` (global slot
``ep_rank * S + i``, ``S = placement.slots_per_rank``), each entry a sequence of tensors
in the same order and with the same shapes for every slot (e.g. ``list(expert.parameters())``
of each local expert module).  They are collective over ``group`` (the EP group); every
rank must call them in the same order.  ``group=None`` means a single process
(``placement.n_ranks == 1``).

Only experts with more than one copy are touched and communicated: one all-reduce of a
``[n_replicated, numel_per_expert]`` buffer per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import LPLBInputError
from .layout import ExpertPlacement

__all__ = ["sum_replica_grads", "copy_home_to_replicas", "replica_max_abs_diff"]


def _replicated_local(placement: ExpertPlacement, ep_rank: int, n_local: int):
    """``(local_slot, row, is_home)`` for this rank's slots of replicated experts;
    ``row`` indexes the replicated experts in logical order."""
    S = placement.slots_per_rank
    if n_local != S:
        raise LPLBInputError(f"slot_tensors has {n_local} local slots, the placement has {S} per rank")
    if not 0 <= ep_rank < placement.n_ranks:
        raise LPLBInputError(f"ep_rank must lie in [0, {placement.n_ranks}), got {ep_rank}")
    replicated = placement.logcnt > 1
    row_of = torch.cumsum(replicated.to(torch.int64), 0) - 1
    home = placement.log2phy[:, 0]
    out = []
    for i in range(S):
        slot = ep_rank * S + i
        e = int(placement.phy2log[slot])
        if bool(replicated[e]):
            out.append((i, int(row_of[e]), int(home[e]) == slot))
    return out, int(replicated.sum())


def _flat_layout(slot_tensors: Sequence[Sequence[torch.Tensor]]):
    first = list(slot_tensors[0])
    if not first:
        raise LPLBInputError("slot_tensors entries must hold at least one tensor")
    dtypes = {t.dtype for t in first}
    if len(dtypes) != 1:
        raise LPLBInputError(f"all tensors of one slot must share a dtype, got {sorted(map(str, dtypes))}")
    shapes = [tuple(t.shape) for t in first]
    for i, ts in enumerate(slot_tensors):
        if [tuple(t.shape) for t in ts] != shapes:
            raise LPLBInputError(f"slot_tensors[{i}] shapes differ from slot_tensors[0]: expected {shapes}")
    numel = sum(t.numel() for t in first)
    return numel, first[0].dtype, first[0].device


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _write(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def _all_reduce(buf: torch.Tensor, group, op: str = "sum") -> None:
    if group is None:
        return
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    if not buf.is_cuda and dist.get_backend(group) == "nccl":
        # e.g. weights still on the host at model construction (use_cpu_initialization)
        staged = buf.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=reduce_op, group=group)
        buf.copy_(staged.cpu())
        return
    dist.all_reduce(buf, op=reduce_op, group=group)


def _home_values(placement, ep_rank, slot_tensors, group):
    local, n_rep = _replicated_local(placement, ep_rank, len(slot_tensors))
    numel, dtype, device = _flat_layout(slot_tensors)
    buf = torch.zeros(n_rep, numel, dtype=dtype, device=device)
    for i, row, is_home in local:
        if is_home:
            buf[row] = _flatten(slot_tensors[i])
    # exactly one rank holds each home copy, so the sum is that copy (bit for bit)
    _all_reduce(buf, group)
    return local, buf


def sum_replica_grads(
    placement: ExpertPlacement,
    ep_rank: int,
    slot_grads: Sequence[Sequence[torch.Tensor]],
    group=None,
) -> None:
    """Replace each replicated copy's gradients by the sum over all its copies, in place.

    Args:
        placement: the layer's placement.
        ep_rank: this rank's index in ``group``.
        slot_grads: per local slot, its gradient tensors (``param.grad`` or Megatron's
            ``param.main_grad``), one dtype per slot.
        group: EP process group (``None``: single process).

    After the call every copy of an expert holds the identical summed gradient on every
    rank (one all-reduce result, written to all copies), so identical optimizer steps
    keep the copies bit-identical.
    """
    local, n_rep = _replicated_local(placement, ep_rank, len(slot_grads))
    if n_rep == 0:
        return
    numel, dtype, device = _flat_layout(slot_grads)
    buf = torch.zeros(n_rep, numel, dtype=dtype, device=device)
    for i, row, _ in local:
        buf[row] += _flatten(slot_grads[i])
    _all_reduce(buf, group)
    for i, row, _ in local:
        _write(slot_grads[i], buf[row])


def copy_home_to_replicas(
    placement: ExpertPlacement,
    ep_rank: int,
    slot_params: Sequence[Sequence[torch.Tensor]],
    group=None,
) -> None:
    """Overwrite every non-home copy with its home copy's values, in place (at init and
    after loading a checkpoint).

    Args: as :func:`sum_replica_grads`, with the slots' parameters.
    """
    if int((placement.logcnt > 1).sum()) == 0:
        return
    local, buf = _home_values(placement, ep_rank, slot_params, group)
    for i, row, is_home in local:
        if not is_home:
            _write(slot_params[i], buf[row])


def replica_max_abs_diff(
    placement: ExpertPlacement,
    ep_rank: int,
    slot_params: Sequence[Sequence[torch.Tensor]],
    group=None,
) -> float:
    """Largest ``|copy - home|`` over all copies of all replicated experts, on every rank
    (0.0 means bit-identical replicas).

    Args: as :func:`copy_home_to_replicas`.
    """
    if int((placement.logcnt > 1).sum()) == 0:
        return 0.0
    local, buf = _home_values(placement, ep_rank, slot_params, group)
    diff = torch.zeros(1, dtype=torch.float64, device=buf.device)
    for i, row, is_home in local:
        if not is_home:
            d = (_flatten(slot_params[i]).to(torch.float64) - buf[row].to(torch.float64)).abs().max()
            diff = torch.maximum(diff, d.reshape(1))
    _all_reduce(diff, group, op="max")
    return float(diff.item())
