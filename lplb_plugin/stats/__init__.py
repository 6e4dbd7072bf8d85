"""Token statistics across the EP group.

Where a batch's per-logical-expert counts come from (:mod:`.sources`: the router's
``topk_idx``, DeepEP's dispatch layout, DeepEP's receive-side counters) and how they
become global over the expert-parallel group (:mod:`.reducers`: torch.distributed,
NVSHMEM), plus a one-time check that every rank runs the same configuration
(:mod:`.consistency`).  :class:`TokenStats` puts the chosen pieces together for one
Planner.  See docs/stats.md.
"""

from .consistency import check_group_consistency, config_fingerprint
from .deep_ep import DeepEPInfo, detect_deep_ep
from .reducers import CountReducer, NoReduce, NvshmemReducer, PendingCounts, TorchAllReduce, make_reducer
from .sources import DeepEPLayoutSource, RecvStatsDelta, RouterSource
from .token_stats import TokenStats

__all__ = [
    "CountReducer",
    "DeepEPInfo",
    "DeepEPLayoutSource",
    "NoReduce",
    "NvshmemReducer",
    "PendingCounts",
    "RecvStatsDelta",
    "RouterSource",
    "TokenStats",
    "TorchAllReduce",
    "check_group_consistency",
    "config_fingerprint",
    "detect_deep_ep",
    "make_reducer",
]
