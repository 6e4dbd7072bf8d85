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

Also here, for adapters whose checkpoints and start-up weights come in the plain
(non-replicated) layout, where EP rank ``r`` owns the logical experts
``[r*L/ep, (r+1)*L/ep)`` (used by the DeepSpeed adapter):

- :func:`fill_slots_from_logical`: every local slot (home and replicas) takes the weights
  of its logical expert, given each rank's owned logical experts (bit-exact);
- :func:`gather_owned_logical`: the inverse, each rank gets its owned experts' weights
  from whichever rank holds a copy;
- :func:`with_replica_grad_sum`: :func:`sum_replica_grads` inside autograd (an identity
  in forward whose backward sums), so ``param.grad`` and any framework gradient hook
  (e.g. ZeRO's) already see the summed gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import LPLBInputError
from .layout import ExpertPlacement

__all__ = [
    "sum_replica_grads",
    "copy_home_to_replicas",
    "replica_max_abs_diff",
    "owned_experts",
    "fill_slots_from_logical",
    "gather_owned_logical",
    "with_replica_grad_sum",
]


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


# ----------------------------------------------------------------------------- plain layout
def owned_experts(placement: ExpertPlacement, ep_rank: int) -> range:
    """Logical experts EP rank ``ep_rank`` owns in the plain (non-replicated) layout:
    ``[ep_rank*L/ep, (ep_rank+1)*L/ep)``; plain checkpoints store them on that rank."""
    if placement.n_logical % placement.n_ranks:
        raise LPLBInputError(
            f"n_logical={placement.n_logical} must be a multiple of n_ranks={placement.n_ranks}"
        )
    if not isinstance(ep_rank, int) or isinstance(ep_rank, bool) or not 0 <= ep_rank < placement.n_ranks:
        raise LPLBInputError(f"ep_rank must be an int in [0, {placement.n_ranks}), got {ep_rank!r}")
    n = placement.n_logical // placement.n_ranks
    return range(ep_rank * n, (ep_rank + 1) * n)


def _byte_sizes(slot_tensors: Sequence[Sequence[torch.Tensor]], n_slots: int) -> list[int]:
    if len(slot_tensors) != n_slots:
        raise LPLBInputError(f"slot_tensors has {len(slot_tensors)} local slots, the placement has {n_slots} per rank")
    first = [(tuple(t.shape), t.dtype) for t in slot_tensors[0]]
    for i, ts in enumerate(slot_tensors):
        if [(tuple(t.shape), t.dtype) for t in ts] != first:
            raise LPLBInputError(
                f"slot_tensors[{i}] has tensors {[(tuple(t.shape), t.dtype) for t in ts]}, slot_tensors[0] has "
                f"{first}: every slot must hold the same tensors in the same order"
            )
    return [t.numel() * t.element_size() for t in slot_tensors[0]]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _write_bytes(tensors: Sequence[torch.Tensor], row: torch.Tensor, sizes: list[int]) -> None:
    offset = 0
    with torch.no_grad():
        for t, n in zip(tensors, sizes):
            t.copy_(row[offset:offset + n].view(t.dtype).view(t.shape))
            offset += n


def _share_rows(rows: dict, n_rows: int, sizes: list[int], device, group) -> torch.Tensor:
    """uint8 ``[n_rows, sum(sizes)]`` holding every row on every rank; each row is
    written by exactly one rank.  Summed as bytes: adding zero bytes is exact for any
    dtype (a float sum would turn -0.0 into +0.0)."""
    buf = torch.zeros(n_rows, sum(sizes), dtype=torch.uint8, device=device)
    for r, tensors in rows.items():
        buf[r] = torch.cat([_as_bytes(t).to(device) for t in tensors])
    _all_reduce(buf, group)
    return buf


def fill_slots_from_logical(
    placement: ExpertPlacement,
    ep_rank: int,
    slot_tensors: Sequence[Sequence[torch.Tensor]],
    owned: Sequence[Sequence[torch.Tensor]],
    group=None,
) -> None:
    """Overwrite every local slot, home and replicas, with its logical expert's values
    (in place, bit-exact), given the experts each rank owns in the plain layout.

    Args:
        placement, ep_rank, group: as :func:`sum_replica_grads`.
        slot_tensors: per local slot, its tensors (parameters, and buffers if wanted);
            any dtypes, the same structure for every slot.
        owned: ``L/ep`` entries, the values of :func:`owned_experts` in order, with a
            slot's structure (e.g. the plain model's local experts at start-up, or the
            experts a plain checkpoint gave this rank).

    Memory and traffic: one uint8 all-reduce of the layer's ``L`` experts.
    """
    sizes = _byte_sizes(slot_tensors, placement.slots_per_rank)
    mine = owned_experts(placement, ep_rank)
    if len(owned) != len(mine):
        raise LPLBInputError(f"owned must list {len(mine)} experts (L/ep), got {len(owned)}")
    for j, tensors in enumerate(owned):
        if [t.numel() * t.element_size() for t in tensors] != sizes:
            raise LPLBInputError(f"owned[{j}] does not have the structure of a slot")
    device = slot_tensors[0][0].device
    buf = _share_rows({e: owned[j] for j, e in enumerate(mine)}, placement.n_logical, sizes, device, group)
    S = placement.slots_per_rank
    for i in range(S):
        _write_bytes(slot_tensors[i], buf[int(placement.phy2log[ep_rank * S + i])], sizes)


def gather_owned_logical(
    placement: ExpertPlacement,
    ep_rank: int,
    slot_tensors: Sequence[Sequence[torch.Tensor]],
    group=None,
) -> list[list[torch.Tensor]]:
    """The inverse of :func:`fill_slots_from_logical`: new tensors (a slot's structure)
    holding the values of this rank's :func:`owned_experts`, each taken from the lowest
    physical slot that holds it (bit-exact).  Used to write plain-layout checkpoints."""
    sizes = _byte_sizes(slot_tensors, placement.slots_per_rank)
    S = placement.slots_per_rank
    P = placement.n_physical
    first = torch.full((placement.n_logical,), P, dtype=torch.int64)
    first.scatter_reduce_(0, placement.phy2log, torch.arange(P), "amin")
    rows = {e: slot_tensors[slot - ep_rank * S] for e, slot in enumerate(first.tolist()) if slot // S == ep_rank}
    buf = _share_rows(rows, placement.n_logical, sizes, slot_tensors[0][0].device, group)
    out = []
    for e in owned_experts(placement, ep_rank):
        tensors = [torch.empty_like(t) for t in slot_tensors[0]]
        _write_bytes(tensors, buf[e], sizes)
        out.append(tensors)
    return out


class _ReplicaGradSum(torch.autograd.Function):
    """Identity on the slots' parameters; backward runs :func:`sum_replica_grads`."""

    @staticmethod
    def forward(ctx, placement, ep_rank, group, enabled, n_per_slot, *params):
        ctx.args = (placement, ep_rank, group, enabled, n_per_slot)
        ctx.metas = [(p.shape, p.dtype, p.device) for p in params]
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        placement, ep_rank, group, enabled, n = ctx.args
        # fresh tensors: incoming gradients may be shared or expanded views
        grads = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g.clone()
            for g, (shape, dtype, device) in zip(grads, ctx.metas)
        ]
        if enabled:
            sum_replica_grads(placement, ep_rank, [grads[i:i + n] for i in range(0, len(grads), n)], group)
        return (None, None, None, None, None, *grads)


def with_replica_grad_sum(
    placement: ExpertPlacement,
    ep_rank: int,
    slot_params: Sequence[Sequence[torch.Tensor]],
    group=None,
    *,
    enabled: bool = True,
) -> list[list[torch.Tensor]]:
    """Tensors to compute the local experts with, in place of ``slot_params``.

    Forward: the same values.  Backward: one autograd node receives the gradients of all
    local slots and runs :func:`sum_replica_grads` (one all-reduce over ``group``) before
    they reach the parameters, so ``param.grad`` and any framework hook on it (e.g.
    ZeRO's reduction hooks) see the summed gradient.  Every rank runs the same layer
    code, so the node runs at the same point of every rank's backward and the
    collective's order stays consistent.

    Args:
        placement, ep_rank, group: as :func:`sum_replica_grads`.
        slot_params: per local slot, its parameters (one dtype per slot).
        enabled: ``False`` makes the node a plain identity (experiments and negative
            controls only: replicas then drift apart).
    """
    if len(slot_params) != placement.slots_per_rank:
        raise LPLBInputError(
            f"slot_params has {len(slot_params)} local slots, the placement has {placement.slots_per_rank} per rank"
        )
    n = len(slot_params[0])
    flat = [p for slot in slot_params for p in slot]
    out = _ReplicaGradSum.apply(placement, ep_rank, group, enabled, n, *flat)
    return [list(out[i:i + n]) for i in range(0, len(out), n)]
