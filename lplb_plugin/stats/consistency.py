"""One-time check that every rank of the EP group runs the same plugin setup.

Ranks that disagree on the number of experts or the placement would all-reduce
tensors of different shapes (a hang or a crash deep inside the backend) or, worse,
sum counts of different experts.  Before the first reduction every rank contributes a
small fingerprint; a mismatch raises :class:`LPLBConfigError` on every rank, naming
the field and the ranks' values.  On gloo a rank that never arrives is caught by
``monitored_barrier`` within ``timeout_s`` and named; on NCCL the process group's own
timeout applies (set it with ``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import datetime
import hashlib

import torch

from ..errors import LPLBConfigError

__all__ = ["config_fingerprint", "check_group_consistency"]


def config_fingerprint(**fields) -> dict:
    """A picklable summary: ints and strings kept, tensors replaced by shape + hash."""
    out = {}
    for k, v in fields.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous()
            out[k] = f"{tuple(t.shape)}:{hashlib.sha1(t.numpy().tobytes()).hexdigest()[:16]}"
        else:
            out[k] = v
    return out


def check_group_consistency(group, fingerprint: dict, timeout_s: float = 120.0, what: str = "lplb") -> None:
    """Raise on every rank if the ranks' fingerprints differ.

    Args:
        group: EP process group.
        fingerprint: this rank's :func:`config_fingerprint`.
        timeout_s: how long to wait for every rank (gloo: named in the error).
        what: the component named in the error.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return
    if dist.get_backend(group) == "gloo":
        try:
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as exc:
            raise LPLBConfigError(
                f"{what}: not every EP rank reached the configuration check within {timeout_s:g} s "
                f"(lplb.stats.timeout_s): do all ranks build the same MoE layers with the plugin? ({exc})"
            ) from None
    gathered: list = [None] * world
    dist.all_gather_object(gathered, fingerprint, group=group)
    problems = []
    for key in sorted({k for fp in gathered for k in fp}):
        values = [fp.get(key, "<missing>") for fp in gathered]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            problems.append(f"{key} differs across EP ranks ({per_rank})")
    if problems:
        raise LPLBConfigError(f"{what}: the EP ranks are configured differently: " + "; ".join(problems))
