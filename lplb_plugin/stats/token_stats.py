"""``TokenStats``: one Planner's count source + EP reduction, configured by
``lplb.stats``."""

from __future__ import annotations

import logging

import torch

from ..config import StatsConfig
from ..errors import LPLBConfigError
from .consistency import check_group_consistency
from .deep_ep import buffer_generation, detect_deep_ep
from .reducers import CountReducer, PendingCounts, make_reducer
from .sources import DeepEPLayoutSource, RouterSource

__all__ = ["TokenStats"]

log = logging.getLogger("lplb_plugin")


class TokenStats:
    """Counts a rank's tokens and sums them over the EP group.

    Args:
        n_logical: ``L``.
        group: EP process group (``None``: counts are already global).
        config: ``lplb.stats`` (defaults if ``None``).
        fingerprint: what every rank must agree on (checked once, before the first
            reduction, when ``config.check_consistency``).
    """

    def __init__(self, n_logical: int, group=None, config: StatsConfig | None = None, fingerprint: dict | None = None):
        self.n_logical = n_logical
        self.group = group
        self.config = config if config is not None else StatsConfig()
        self.fingerprint = dict(fingerprint or {})
        self.fingerprint.update(stats_source=self.config.source, stats_comm=self.config.comm, n_logical=n_logical)
        self.source = RouterSource(n_logical)
        self._reducer: CountReducer | None = None
        self._checked = False

    # ---------------------------------------------------------------- sources
    def attach_deep_ep(self, buffer) -> str:
        """Use a DeepEP buffer's dispatch layout as the count source.

        Returns a one-line description of what will be used.  With
        ``source: router`` the buffer is ignored (said so); a buffer that is not a
        DeepEP V1 ``Buffer`` is rejected with a clear error.
        """
        if self.config.source == "router":
            return "lplb.stats.source='router': counting the router's topk_idx; the DeepEP buffer is not used for counts"
        info = detect_deep_ep()
        gen = buffer_generation(buffer)
        if gen is None:
            why = info.reason or f"{type(buffer).__name__} is not a DeepEP buffer class"
            raise LPLBConfigError(
                f"init_from_deep_ep: {type(buffer).__name__} is not a DeepEP buffer ({why}); "
                f"set lplb.stats.source='router' to count the router output instead"
            )
        if gen != "v1":
            raise LPLBConfigError(
                f"init_from_deep_ep: DeepEP {gen} buffers expose no send-side layout counts; use "
                f"lplb.stats.source='router' (and RecvStatsDelta for historical loads)"
            )
        self.source = DeepEPLayoutSource(buffer, self.n_logical)
        return (
            "counts from DeepEP V1 get_dispatch_layout; summed with torch.distributed (DeepEP's own NVSHMEM "
            "runtime is internal to its C++ extension, and a second NVSHMEM runtime must not be started "
            "in the same process)"
        )

    def local_counts(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """This rank's int32 ``[L]`` counts from the configured source."""
        if self.config.source == "deepep" and not isinstance(self.source, DeepEPLayoutSource):
            raise LPLBConfigError(
                "lplb.stats.source='deepep' needs a DeepEP buffer: call Planner.init_from_deep_ep(buffer) first "
                "(or set lplb.stats.source to 'auto' or 'router')"
            )
        return self.source.counts(topk_idx)

    # ---------------------------------------------------------------- reduction
    @property
    def reducer(self) -> CountReducer:
        if self._reducer is None:
            self._reducer = make_reducer(self.config.comm, self.group, self.n_logical, self.config.nvshmem_heap_mb)
        return self._reducer

    def check(self) -> None:
        """The one-time consistency check (collective; a no-op after the first call)."""
        if self._checked:
            return
        if self.group is not None and self.config.check_consistency:
            check_group_consistency(self.group, self.fingerprint, self.config.timeout_s)
        self._checked = True

    def reduce_async(self, counts: torch.Tensor) -> PendingCounts:
        """Start summing ``counts`` over the group; ``.wait()`` gives the result."""
        self.check()
        return self.reducer.reduce_async(counts)

    def reduce(self, counts: torch.Tensor) -> torch.Tensor:
        """Global int32 ``[L]`` counts (same device as ``counts``)."""
        return self.reduce_async(counts).wait()
