"""Summing per-rank counts over the EP group.

All reducers take this rank's int32 ``[L]`` counts and return the group's sum, same
dtype and device.  The sum of integers is exact and order-free, so every rank holds
bitwise-identical global counts, and from them (deterministic solver) the identical
split.

- :class:`NoReduce`: group of one rank (or the caller already has global counts).
- :class:`TorchAllReduce`: ``torch.distributed.all_reduce`` (NCCL on GPU tensors, gloo
  on CPU), optionally asynchronous so the caller can overlap it with other work.
- :class:`NvshmemReducer`: nvshmem4py's ``reduce`` on symmetric int32 buffers, launched
  on the current CUDA stream (no host involvement, capturable).
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import LPLBConfigError, LPLBInputError

__all__ = ["CountReducer", "NoReduce", "TorchAllReduce", "NvshmemReducer", "PendingCounts", "make_reducer"]

log = logging.getLogger("lplb_plugin")


class PendingCounts:
    """A reduction in flight; :meth:`wait` returns the global counts."""

    def __init__(self, result: torch.Tensor, work=None) -> None:
        self._result = result
        self._work = work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._result


class CountReducer:
    """Interface: ``reduce(counts) -> global``; ``reduce_async(counts) ->
    PendingCounts``."""

    name = "abstract"

    def reduce(self, counts: torch.Tensor) -> torch.Tensor:
        return self.reduce_async(counts).wait()

    def reduce_async(self, counts: torch.Tensor) -> PendingCounts:  # pragma: no cover - interface
        raise NotImplementedError


class NoReduce(CountReducer):
    """No communication (a group of one)."""

    name = "none"

    def reduce_async(self, counts: torch.Tensor) -> PendingCounts:
        return PendingCounts(counts)


class TorchAllReduce(CountReducer):
    """``torch.distributed.all_reduce(SUM)`` of one small int32 tensor over ``group``."""

    name = "torch"

    def __init__(self, group) -> None:
        self.group = group

    def reduce_async(self, counts: torch.Tensor) -> PendingCounts:
        import torch.distributed as dist

        out = counts.to(torch.int32).clone()
        work = dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return PendingCounts(out, work)


class NvshmemReducer(CountReducer):
    """All-reduce through NVSHMEM symmetric memory (nvshmem4py).

    NVSHMEM is initialised once per process from the torch process group by unique
    id (rank 0 creates it, ``broadcast_object_list`` shares it), with the EP group as
    the NVSHMEM world, so the group must span one NVSHMEM job: one EP group per
    process, the usual layout.  Two symmetric int32 ``[L]`` buffers are allocated
    collectively; each call copies the counts in and runs ``nvshmem.core.reduce``
    (team world, ``"sum"``) on the current stream.  Do not use it in a process where
    DeepEP V1 has already initialised NVSHMEM (one runtime per process).

    Args:
        group: the EP process group (its ranks, in group order, become NVSHMEM PEs).
        n_logical: ``L``.
        heap_mb: symmetric heap size if ``NVSHMEM_SYMMETRIC_SIZE`` is unset.
    """

    name = "nvshmem"
    _initialised_for: tuple | None = None

    def __init__(self, group, n_logical: int, heap_mb: int = 64) -> None:
        if not torch.cuda.is_available():
            raise LPLBConfigError("lplb.stats.comm='nvshmem' needs a CUDA GPU; use 'torch' on CPU")
        try:
            import nvshmem.core as nvshmem
        except Exception as exc:
            raise LPLBConfigError(
                "lplb.stats.comm='nvshmem' needs nvshmem4py (pip install 'lplb_plugin[nvshmem]', i.e. "
                f"nvshmem4py-cu12/-cu13 matching your CUDA); import failed: {type(exc).__name__}: {exc}"
            ) from None
        import torch.distributed as dist

        self._nvshmem = nvshmem
        self.group = group
        self.n_logical = n_logical
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        key = (id(group), rank, world)
        if NvshmemReducer._initialised_for is None:
            os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", f"{int(heap_mb)}M")
            uid = [nvshmem.get_unique_id() if rank == 0 else nvshmem.get_unique_id(empty=True)]
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast_object_list(uid, src=src, group=group)
            nvshmem.init(
                device=_cuda_core_device(torch.cuda.current_device()),
                uid=uid[0], rank=rank, nranks=world, initializer_method="uid",
            )
            NvshmemReducer._initialised_for = key
        elif NvshmemReducer._initialised_for != key:
            raise LPLBConfigError(
                "lplb.stats.comm='nvshmem': NVSHMEM is already initialised in this process for another "
                "process group; all planners of a process must share one EP group"
            )
        self._src = nvshmem.tensor((n_logical,), dtype=torch.int32)
        self._dst = nvshmem.tensor((n_logical,), dtype=torch.int32)

    def reduce_async(self, counts: torch.Tensor) -> PendingCounts:
        if not counts.is_cuda or counts.numel() != self.n_logical:
            raise LPLBInputError(f"counts must be a CUDA tensor of {self.n_logical} entries for the NVSHMEM reducer")
        stream = torch.cuda.current_stream()
        self._src.copy_(counts.to(torch.int32))
        self._nvshmem.reduce(self._nvshmem.Teams.TEAM_WORLD, self._dst, self._src, "sum",
                             stream=self._nvshmem.NvshmemStream(stream))
        # a fresh tensor, ordered after the reduce on the same stream
        return PendingCounts(self._dst.clone())

    def close(self) -> None:
        """Free the symmetric buffers (collective: every rank must call it)."""
        for t in (self._src, self._dst):
            self._nvshmem.free_tensor(t)


def _cuda_core_device(index: int):
    try:
        from cuda.core import Device
    except ImportError:  # cuda.core < 0.4 keeps it under experimental
        from cuda.core.experimental import Device
    dev = Device(index)
    dev.set_current()
    return dev


def make_reducer(comm: str, group, n_logical: int, heap_mb: int = 64) -> CountReducer:
    """Reducer for ``lplb.stats.comm`` (``auto`` = ``torch``); a group of one (or
    none) needs no communication."""
    if comm not in ("auto", "torch", "nvshmem"):
        raise LPLBConfigError(f"lplb.stats.comm: expected one of 'auto', 'torch', 'nvshmem', got {comm!r}")
    if group is None:
        return NoReduce()
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return NoReduce()
    if comm == "nvshmem":
        return NvshmemReducer(group, n_logical, heap_mb)
    return TorchAllReduce(group)
