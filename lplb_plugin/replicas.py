"""Keeping redundant expert replicas correct for training (framework-neutral).

With LPLB a logical expert may have several physical copies (slots) on different EP
ranks.  Training stays identical to the non-replicated model when

1. every copy starts from the same weights (those of the logical expert), and
2. after backward, every copy's gradient is replaced by the sum of the gradients of
   all copies of its logical expert over the EP group, *before* the framework's own
   (expert-)data-parallel reduction, so all copies take the identical optimizer step.

This module does both with plain ``torch.distributed`` collectives over the EP process
group; it knows nothing about Megatron or DeepSpeed.

Conventions: a rank's experts of one MoE layer are ``S`` *local slots* (the physical
layout is rank-major: EP rank ``r`` holds slots ``[r*S, (r+1)*S)``).  A slot is given as
a list of tensors (its parameters, in a fixed order that is the same for every slot;
every slot has the same shapes and dtypes).  :class:`ReplicaLayout` says which logical
expert each local slot holds.

API (all functions are collective over ``group`` when it has more than one rank; every
rank of the group must call them in the same order):

- :meth:`ReplicaLayout.from_placement(placement, ep_rank)`
- :func:`fill_slots_from_logical(slot_tensors, layout, owned, group)`: copy the weights
  of logical experts (each rank passes the ones it "owns", ``ep_rank*L/ep + j``) into
  every slot holding them, bit-exact;
- :func:`gather_owned_logical(slot_tensors, layout, group)`: the inverse: each rank gets
  the weights of the logical experts it owns, from whichever rank holds a copy;
- :func:`sum_replica_grads(slot_grads, layout, group)`: gradient sum over copies;
- :func:`with_replica_grad_sum(slot_params, layout, group)`: the same inside autograd (an
  identity in forward whose backward sums), so the parameters' ``.grad`` (and any
  framework hook on it) already sees the summed gradient;
- :func:`replicas_identical(slot_tensors, layout, group)`: whether every copy of every
  replicated expert is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import LPLBInputError
from .layout import ExpertPlacement

__all__ = [
    "ReplicaLayout",
    "fill_slots_from_logical",
    "gather_owned_logical",
    "sum_replica_grads",
    "with_replica_grad_sum",
    "replicas_identical",
]

SlotTensors = Sequence[Sequence[torch.Tensor]]


@dataclass(frozen=True)
class ReplicaLayout:
    """Which logical expert each local slot of one EP rank holds.

    Attributes:
        slot_expert: int64 ``[S]`` (CPU), logical expert of each local slot.
        n_logical: logical experts ``L`` of the layer.
        ep_rank, ep_size: this rank's index in the EP group and the group size.
        shared_row: int64 ``[S]``, row of the slot's expert among the replicated
            experts (``logcnt > 1``, in increasing logical id), ``-1`` for a slot whose
            expert has a single copy.
        n_shared: number of replicated experts.
        phy2log: int64 ``[P]``, the whole placement's slot -> expert map.
    """

    slot_expert: torch.Tensor
    n_logical: int
    ep_rank: int
    ep_size: int
    shared_row: torch.Tensor
    n_shared: int
    phy2log: torch.Tensor

    @classmethod
    def from_placement(cls, placement: ExpertPlacement, ep_rank: int) -> "ReplicaLayout":
        """Layout of EP rank ``ep_rank`` under ``placement``."""
        if not isinstance(placement, ExpertPlacement):
            raise LPLBInputError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
        if not isinstance(ep_rank, int) or isinstance(ep_rank, bool) or not 0 <= ep_rank < placement.n_ranks:
            raise LPLBInputError(f"ep_rank must be an int in [0, {placement.n_ranks}), got {ep_rank!r}")
        if placement.n_logical % placement.n_ranks:
            raise LPLBInputError(
                f"n_logical={placement.n_logical} must be a multiple of n_ranks={placement.n_ranks}"
            )
        S = placement.slots_per_rank
        slot_expert = placement.phy2log[ep_rank * S:(ep_rank + 1) * S].clone()
        replicated = placement.logcnt > 1
        row_of_expert = torch.full((placement.n_logical,), -1, dtype=torch.int64)
        row_of_expert[replicated] = torch.arange(int(replicated.sum()))
        return cls(slot_expert, placement.n_logical, ep_rank, placement.n_ranks,
                   row_of_expert[slot_expert], int(replicated.sum()), placement.phy2log.clone())

    @property
    def n_slots(self) -> int:
        return self.slot_expert.numel()

    @property
    def owned_experts(self) -> range:
        """Logical experts this rank owns in the plain (non-replicated) layout:
        ``[ep_rank*L/ep, (ep_rank+1)*L/ep)``; checkpoints store them on this rank."""
        n = self.n_logical // self.ep_size
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)


# ----------------------------------------------------------------------------- helpers
def _check_slots(name: str, slots: SlotTensors, n_slots: int) -> None:
    if len(slots) != n_slots:
        raise LPLBInputError(f"{name} must list {n_slots} slots (the layout's S), got {len(slots)}")
    first = [(tuple(t.shape), t.dtype) for t in slots[0]]
    for s, tensors in enumerate(slots):
        got = [(tuple(t.shape), t.dtype) for t in tensors]
        if got != first:
            raise LPLBInputError(
                f"{name}[{s}] has tensors {got}, slot 0 has {first}: every slot must hold the same "
                f"tensors (shapes and dtypes) in the same order"
            )


def _nbytes(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.numel() * t.element_size() for t in tensors]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _write_bytes(dst: torch.Tensor, row: torch.Tensor, sizes: list[int]) -> None:
    """Copy the bytes of one buffer row into a list of tensors (``torch.no_grad``)."""
    off = 0
    for t, n in zip(dst, sizes):
        src = row[off:off + n].view(t.dtype).view(t.shape)
        with torch.no_grad():
            t.copy_(src)
        off += n


def _group_size(group) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce(buf: torch.Tensor, group, op: str = "sum") -> None:
    if _group_size(group) == 1:
        return
    import torch.distributed as dist

    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op.upper()), group=group)


def _share_rows(rows: dict[int, Sequence[torch.Tensor]], n_rows: int, sizes: list[int],
                device: torch.device, group) -> torch.Tensor:
    """Every rank passes the rows it writes; each row must be written by exactly one rank
    of the group.  Returns uint8 ``[n_rows, sum(sizes)]`` with every row on every rank,
    bit-exact: the rows are summed as bytes, and adding zero bytes changes nothing
    (a float sum would turn -0.0 into +0.0)."""
    buf = torch.zeros(n_rows, sum(sizes), dtype=torch.uint8, device=device)
    for r, tensors in rows.items():
        buf[r] = torch.cat([_as_bytes(t).to(device) for t in tensors])
    _all_reduce(buf, group)
    return buf


# ----------------------------------------------------------------------------- weights
def fill_slots_from_logical(
    slot_tensors: SlotTensors,
    layout: ReplicaLayout,
    owned: Sequence[Sequence[torch.Tensor]],
    group=None,
) -> None:
    """Overwrite every local slot with the weights of its logical expert.

    Args:
        slot_tensors: ``S`` lists of tensors (the slots' parameters / buffers), written
            in place without autograd.
        layout: this rank's :class:`ReplicaLayout`.
        owned: ``L/ep`` lists of tensors, the weights of the logical experts this rank
            owns (:attr:`ReplicaLayout.owned_experts`, in order), same structure as a
            slot.  Used at start-up (the plain model's experts) and after loading a
            checkpoint (which stores logical experts).
        group: the EP process group (``None`` or size 1: single rank).

    Memory: one uint8 buffer of ``L`` experts' bytes (the layer's logical experts).
    """
    _check_slots("slot_tensors", slot_tensors, layout.n_slots)
    owned_range = layout.owned_experts
    if len(owned) != len(owned_range):
        raise LPLBInputError(f"owned must list {len(owned_range)} experts (L/ep), got {len(owned)}")
    sizes = _nbytes(slot_tensors[0])
    for j, tensors in enumerate(owned):
        if _nbytes(tensors) != sizes or len(tensors) != len(sizes):
            raise LPLBInputError(f"owned[{j}] does not have the structure of a slot")
    device = slot_tensors[0][0].device
    buf = _share_rows({e: owned[j] for j, e in enumerate(owned_range)}, layout.n_logical, sizes, device, group)
    for s in range(layout.n_slots):
        _write_bytes(slot_tensors[s], buf[int(layout.slot_expert[s])], sizes)


def gather_owned_logical(slot_tensors: SlotTensors, layout: ReplicaLayout, group=None) -> list[list[torch.Tensor]]:
    """The weights of this rank's owned logical experts (``L/ep`` lists of new tensors
    shaped like a slot), fetched from whichever slot holds each one (its lowest slot on
    the rank with the lowest such slot).  Inverse of :func:`fill_slots_from_logical`;
    used to write checkpoints in the plain (logical) layout."""
    _check_slots("slot_tensors", slot_tensors, layout.n_slots)
    sizes = _nbytes(slot_tensors[0])
    device = slot_tensors[0][0].device
    # The writer of expert e is the first slot (global, rank-major) holding it: that
    # rank writes it, nobody else does.
    n_slots = layout.n_slots
    first_slot = torch.full((layout.n_logical,), layout.phy2log.numel(), dtype=torch.int64)
    first_slot.scatter_reduce_(0, layout.phy2log, torch.arange(layout.phy2log.numel()), "amin")
    rows: dict[int, Sequence[torch.Tensor]] = {}
    for e, slot in enumerate(first_slot.tolist()):
        if slot // n_slots == layout.ep_rank:
            rows[e] = slot_tensors[slot - layout.ep_rank * n_slots]
    buf = _share_rows(rows, layout.n_logical, sizes, device, group)
    out = []
    for e in layout.owned_experts:
        tensors = [torch.empty_like(t) for t in slot_tensors[0]]
        _write_bytes(tensors, buf[e], sizes)
        out.append(tensors)
    return out


def replicas_identical(slot_tensors: SlotTensors, layout: ReplicaLayout, group=None) -> bool:
    """True when all copies of every replicated expert hold bit-identical tensors
    (over the whole EP group; the same answer on every rank)."""
    _check_slots("slot_tensors", slot_tensors, layout.n_slots)
    sizes = _nbytes(slot_tensors[0])
    device = slot_tensors[0][0].device
    # Per replicated expert: byte-wise max and min over its copies; identical iff equal.
    hi = torch.zeros(layout.n_shared, sum(sizes), dtype=torch.int32, device=device)
    lo = torch.full_like(hi, 255)
    for s in range(layout.n_slots):
        row = int(layout.shared_row[s])
        if row < 0:
            continue
        b = torch.cat([_as_bytes(t).to(device) for t in slot_tensors[s]]).to(torch.int32)
        hi[row] = torch.maximum(hi[row], b)
        lo[row] = torch.minimum(lo[row], b)
    _all_reduce(hi, group, "max")
    _all_reduce(lo, group, "min")
    return bool(torch.equal(hi, lo))


# ----------------------------------------------------------------------------- gradients
def sum_replica_grads(slot_grads: SlotTensors, layout: ReplicaLayout, group=None) -> list[list[torch.Tensor]]:
    """Replace each replicated slot's gradients by the sum over all copies of its
    expert in the EP group.

    Args:
        slot_grads: ``S`` lists of gradient tensors (same structure per slot).
        layout: this rank's :class:`ReplicaLayout`.
        group: the EP process group.

    Returns:
        New ``S`` lists: slots of single-copy experts keep their tensors; replicated
        slots get the sum (identical bits on every copy: one all-reduce, whose result
        is the same on all ranks, then copies of it).  The sum is accumulated in the
        promoted dtype of the gradients.

    Communication: one all-reduce of ``n_shared`` experts' gradients (zero rows where a
    rank holds no copy).
    """
    _check_slots("slot_grads", slot_grads, layout.n_slots)
    out = [list(g) for g in slot_grads]
    if layout.n_shared == 0:
        return out
    first = slot_grads[0]
    dtype = first[0].dtype
    for t in first[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    numels = [t.numel() for t in first]
    device = first[0].device
    buf = torch.zeros(layout.n_shared, sum(numels), dtype=dtype, device=device)
    rows = layout.shared_row.tolist()
    # Local copies are added in slot order before the all-reduce, the same on every rank.
    for s, row in enumerate(rows):
        if row >= 0:
            buf[row] += torch.cat([g.reshape(-1).to(dtype) for g in slot_grads[s]])
    _all_reduce(buf, group)
    for s, row in enumerate(rows):
        if row < 0:
            continue
        parts = torch.split(buf[row], numels)
        out[s] = [p.view(g.shape).to(g.dtype).clone() for p, g in zip(parts, slot_grads[s])]
    return out


class _ReplicaGradSum(torch.autograd.Function):
    """Identity on the slots' parameters; backward sums the replicas' gradients."""

    @staticmethod
    def forward(ctx, layout, group, enabled, n_per_slot, *params):
        ctx.layout, ctx.group, ctx.enabled, ctx.n_per_slot = layout, group, enabled, n_per_slot
        ctx.metas = [(p.shape, p.dtype, p.device) for p in params]
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        grads = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, ctx.metas)
        ]
        if ctx.enabled:
            n = ctx.n_per_slot
            slots = [grads[i:i + n] for i in range(0, len(grads), n)]
            grads = [g for slot in sum_replica_grads(slots, ctx.layout, ctx.group) for g in slot]
        return (None, None, None, None, *grads)


def with_replica_grad_sum(
    slot_params: SlotTensors, layout: ReplicaLayout, group=None, *, enabled: bool = True
) -> list[list[torch.Tensor]]:
    """Tensors to compute the experts with, in place of ``slot_params``.

    Forward: the same values.  Backward: one autograd node receives the gradients of all
    local slots, runs :func:`sum_replica_grads` (one all-reduce over ``group``) and passes
    the sums on to the parameters, so ``param.grad`` and any gradient hook of a training
    framework (e.g. ZeRO's reduction hooks) see the summed gradient.  The node runs at the
    same point of every rank's backward (the ranks run the same layer code), which keeps
    the collective's order consistent.

    Args:
        slot_params: ``S`` lists of parameters.
        layout, group: as in :func:`sum_replica_grads`.
        enabled: ``False`` makes the node a plain identity (for experiments and the
            tests' negative control: replicas then drift apart).
    """
    _check_slots("slot_params", slot_params, layout.n_slots)
    n = len(slot_params[0])
    flat = [p for slot in slot_params for p in slot]
    out = _ReplicaGradSum.apply(layout, group, enabled, n, *flat)
    return [list(out[i:i + n]) for i in range(0, len(out), n)]
