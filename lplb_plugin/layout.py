"""The expert placement: which physical slot holds a copy of which logical expert.

Physical slots are rank-major: EP rank ``r`` holds slots ``[r*S, (r+1)*S)`` with
``S = P // n_ranks`` (the layout Megatron-core and DeepSpeed assume).  A placement is
built either from an upstream-LPLB ``r2o`` topology plus an expert ordering, or from
any EPLB-style ``phy2log`` (any number of copies per expert, a rank may hold two copies
of the same expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LPLBInputError
from .topology import validate_r2o

__all__ = ["ExpertPlacement"]


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """A validated placement of ``L`` logical experts onto ``P`` physical slots.

    Attributes:
        phy2log: int64 ``[P]``, logical expert held by each slot.
        log2phy: int64 ``[L, max_copies]``, slots of each expert, ``-1`` padded.
            Column 0 is the *home* copy (the one checkpoints store).
        logcnt: int64 ``[L]``, number of copies of each expert.
        n_ranks: number of EP ranks.
    All tensors live on the CPU.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    n_ranks: int

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_phy2log(
        cls,
        phy2log: torch.Tensor,
        n_ranks: int,
        n_logical: int | None = None,
        home_slots: torch.Tensor | None = None,
    ) -> "ExpertPlacement":
        """Build from a slot -> expert map (e.g. one layer of EPLB's ``phy2log``).

        Args:
            phy2log: int ``[P]`` with values in ``[0, n_logical)``; every expert must
                appear at least once.
            n_ranks: EP ranks; ``P`` must be a multiple of it.
            n_logical: number of logical experts (default ``max(phy2log) + 1``).
            home_slots: optional int ``[L]``, the home slot of each expert (default:
                its lowest slot).
        """
        phy2log = _as_index_tensor("phy2log", phy2log, dim=1)
        n_phys = phy2log.numel()
        _check_int("n_ranks", n_ranks, 1)
        if n_phys == 0 or n_phys % n_ranks != 0:
            raise LPLBInputError(
                f"phy2log has {n_phys} slots, which must be a positive multiple of n_ranks={n_ranks}"
            )
        if n_logical is None:
            n_logical = int(phy2log.max()) + 1
        _check_int("n_logical", n_logical, 1)
        if int(phy2log.min()) < 0 or int(phy2log.max()) >= n_logical:
            raise LPLBInputError(
                f"phy2log values must lie in [0, {n_logical}), got range "
                f"[{int(phy2log.min())}, {int(phy2log.max())}]"
            )
        logcnt = torch.bincount(phy2log, minlength=n_logical)
        missing = torch.nonzero(logcnt == 0).flatten()
        if missing.numel():
            raise LPLBInputError(
                f"phy2log must hold every logical expert at least once; missing experts "
                f"{missing[:10].tolist()}{'...' if missing.numel() > 10 else ''}"
            )
        # Stable sort by expert keeps each expert's slots in ascending slot order.
        order = torch.sort(phy2log, stable=True).indices
        starts = torch.cumsum(logcnt, 0) - logcnt
        rank_in_expert = torch.arange(n_phys) - starts[phy2log[order]]
        max_copies = int(logcnt.max())
        log2phy = torch.full((n_logical, max_copies), -1, dtype=torch.int64)
        log2phy[phy2log[order], rank_in_expert] = order
        if home_slots is not None:
            home_slots = _as_index_tensor("home_slots", home_slots, dim=1)
            if home_slots.numel() != n_logical or not torch.equal(
                phy2log[home_slots.clamp(0, n_phys - 1)], torch.arange(n_logical)
            ):
                raise LPLBInputError(
                    "home_slots must be [n_logical] with phy2log[home_slots[e]] == e for every e"
                )
            # Move the home slot to column 0, keep the others in slot order.
            is_home = log2phy == home_slots.unsqueeze(1)
            key = torch.where(is_home, -1, torch.where(log2phy < 0, n_phys, log2phy))
            log2phy = torch.gather(log2phy, 1, torch.sort(key, dim=1).indices)
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt, n_ranks=int(n_ranks))

    @classmethod
    def from_r2o(
        cls,
        r2o: torch.Tensor,
        n_physical: int,
        n_logical: int,
        ep_size: int,
        expert_order: torch.Tensor | None = None,
    ) -> "ExpertPlacement":
        """Upstream LPLB's layout (``update_redundancy_mapping`` semantics).

        Rank ``r`` holds its ``n_logical // ep_size`` original experts
        ``expert_order[r*nl : (r+1)*nl]`` (hottest first when the order comes from a
        workload), followed by ``combined * n_redundant`` copy slots; copy slot
        ``(c, d)`` (c-major) of rank ``g`` in a group holds the original in local slot
        ``c * n_redundant + d`` of rank ``r2o[g, d]`` of the same group.

        Args:
            r2o: ``[group_size, n_redundant]`` topology (see :mod:`lplb_plugin.topology`).
            n_physical: physical experts ``P`` (originals + copies) over the EP group.
            n_logical: logical experts ``L``.
            ep_size: EP ranks; a multiple of ``group_size``.
            expert_order: optional int ``[L]`` permutation; default identity.
        """
        r2o = validate_r2o(r2o)
        group_size, n_red = r2o.shape
        _check_int("ep_size", ep_size, 1)
        _check_int("n_logical_routed_experts", n_logical, 1)
        _check_int("n_routed_experts", n_physical, 1)
        if ep_size % group_size:
            raise LPLBInputError(
                f"ep_size={ep_size} must be a multiple of the topology's group_size={group_size}"
            )
        if n_logical % ep_size or n_physical % ep_size:
            raise LPLBInputError(
                f"n_logical_routed_experts={n_logical} and n_routed_experts={n_physical} must "
                f"both be multiples of ep_size={ep_size}"
            )
        n_local_log = n_logical // ep_size
        n_local_phys = n_physical // ep_size
        n_extra = n_local_phys - n_local_log
        if n_extra <= 0 or n_extra % n_red:
            raise LPLBInputError(
                f"n_routed_experts/ep_size - n_logical_routed_experts/ep_size = {n_extra} copy slots "
                f"per rank must be a positive multiple of n_redundant={n_red}"
            )
        combined = n_extra // n_red
        if combined * n_red > n_local_log:
            raise LPLBInputError(
                f"{combined * n_red} copy slots per rank exceed the {n_local_log} original experts "
                f"per rank: lower n_routed_experts"
            )
        if expert_order is None:
            expert_order = torch.arange(n_logical)
        expert_order = _as_index_tensor("expert_order", expert_order, dim=1)
        if expert_order.numel() != n_logical or not torch.equal(
            torch.sort(expert_order).values, torch.arange(n_logical)
        ):
            raise LPLBInputError(f"expert_order must be a permutation of range({n_logical})")

        originals = expert_order.view(ep_size, n_local_log)
        rank = torch.arange(ep_size)
        group_base = (rank // group_size) * group_size
        g = rank % group_size
        local_src = (torch.arange(combined).unsqueeze(1) * n_red + torch.arange(n_red)).view(-1)
        d_of_slot = torch.arange(n_red).repeat(combined)
        src_rank = group_base.unsqueeze(1) + r2o[g][:, d_of_slot]  # [ep, combined*n_red]
        copies = originals[src_rank, local_src.unsqueeze(0).expand(ep_size, -1)]
        phy2log = torch.cat([originals, copies], dim=1).reshape(-1)
        home = (rank.unsqueeze(1) * n_local_phys + torch.arange(n_local_log)).reshape(-1)
        home_slots = torch.empty(n_logical, dtype=torch.int64)
        home_slots[originals.reshape(-1)] = home
        return cls.from_phy2log(phy2log, ep_size, n_logical, home_slots=home_slots)

    # ------------------------------------------------------------------ properties
    @property
    def n_physical(self) -> int:
        return self.phy2log.numel()

    @property
    def n_logical(self) -> int:
        return self.logcnt.numel()

    @property
    def slots_per_rank(self) -> int:
        return self.n_physical // self.n_ranks

    @property
    def slot_rank(self) -> torch.Tensor:
        """int64 ``[P]``: EP rank of each slot."""
        return torch.arange(self.n_physical) // self.slots_per_rank

    def to(self, device: torch.device | str) -> "ExpertPlacement":
        """Not supported on purpose: placements stay on the CPU; callers move the few
        tensors they need."""
        raise TypeError("ExpertPlacement lives on the CPU; copy the tensors you need instead")

    def __repr__(self) -> str:
        return (
            f"ExpertPlacement(n_logical={self.n_logical}, n_physical={self.n_physical}, "
            f"n_ranks={self.n_ranks}, max_copies={self.log2phy.shape[1]})"
        )


def _as_index_tensor(name: str, value, dim: int) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise LPLBInputError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != dim:
        raise LPLBInputError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64).contiguous()


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise LPLBInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
