"""``LPLBExperts``: DeepSpeed's ``Experts`` holding this rank's physical slots.

The module holds ``S = P / ep`` expert copies (slots) instead of ``L / ep``; slot ``s``
of EP rank ``r`` holds the logical expert ``placement.phy2log[r * S + s]``.  Replicas
stay correct through :mod:`lplb_plugin.replicas`: their weights are filled from the
logical experts when the EP group exists, and their gradients are summed over the EP
group inside backward (so DeepSpeed's expert-data-parallel reduction and ZeRO's hooks see
the summed gradient).

State dicts are *logical*: ``state_dict()`` emits ``deepspeed_experts.{j}.*`` for the
``L / ep`` logical experts this rank owns in the plain layout (``j`` = logical id minus
``ep_rank * L / ep``), exactly what a plain ``deepspeed.moe.layer.MoE`` emits, and
``load_state_dict()`` accepts that form.  Replicas never appear in a state dict.
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed.moe.experts import Experts
from torch import nn

from ..errors import LPLBInputError
from ..layout import ExpertPlacement
from .clipping import mark_replicas
from ..replicas import (
    fill_slots_from_logical,
    gather_owned_logical,
    owned_experts,
    replica_max_abs_diff,
    with_replica_grad_sum,
)

__all__ = ["LPLBExperts"]

_SLOTS = "deepspeed_experts."


class LPLBExperts(Experts):
    """Physical expert slots of one MoE layer on one EP rank.

    Args:
        owned: the layer's plain experts on this rank (``L / ep`` modules, logical ids
            ``ep_rank * L / ep + j``); their weights seed every slot once the EP group is
            known (:meth:`bind`).  Kept, unregistered, until then.
        placement: the layer's placement (``P`` slots over ``ep`` ranks).
        expert_group_name: DeepSpeed's EP group name (``"ep_size_{ep}"``).

    Attributes:
        sum_replica_grads: ``True`` (default): replica gradients are summed in backward.
            ``False`` turns that off (replicas then drift apart; for experiments and the
            tests' negative control only).
    """

    def __init__(self, owned: list[nn.Module], placement: ExpertPlacement, expert_group_name: str) -> None:
        n_slots = placement.slots_per_rank
        super().__init__(owned[0], n_slots, expert_group_name)
        self.placement = placement
        self.n_owned = len(owned)
        self.sum_replica_grads = True
        self.ep_rank: Optional[int] = None
        self.slot_expert: Optional[torch.Tensor] = None  # int64 [S], logical expert of each local slot
        self.group = None
        template = owned[0]
        self._tensor_names = list(template.state_dict(keep_vars=True).keys())
        self._param_names = [n for n, _ in template.named_parameters()]
        # Plain experts wait outside the module tree (not parameters of this model).
        self.__dict__["_pending"] = [_tensors(m, self._tensor_names) for m in owned]
        self.__dict__["_loaded"] = None
        self.__dict__["_save_stash"] = None
        self.register_state_dict_post_hook(_logical_state_dict_hook)
        self.register_load_state_dict_pre_hook(_logical_load_hook)

    # ----------------------------------------------------------------- binding
    def bind(self, ep_rank: int, group) -> None:
        """Know the EP rank and group; fill every slot from the plain experts
        (collective over ``group``)."""
        S = self.placement.slots_per_rank
        self.owned = owned_experts(self.placement, ep_rank)
        self.ep_rank = ep_rank
        self.slot_expert = self.placement.phy2log[ep_rank * S:(ep_rank + 1) * S].clone()
        self.group = group
        home = self.placement.log2phy[:, 0]
        mark_replicas(self.slot_params(),
                      [int(home[int(e)]) == ep_rank * S + s for s, e in enumerate(self.slot_expert)])
        pending = self.__dict__["_pending"]
        if pending is not None:
            fill_slots_from_logical(self.placement, ep_rank, self.slot_tensors(), pending, group)
            self.__dict__["_pending"] = None

    @property
    def bound(self) -> bool:
        return self.ep_rank is not None

    def slot_tensors(self) -> list[list[torch.Tensor]]:
        """Per slot, its parameters and persistent buffers (in state-dict order)."""
        return [_tensors(m, self._tensor_names) for m in self.deepspeed_experts]

    def slot_params(self) -> list[list[torch.Tensor]]:
        return [[dict(m.named_parameters())[n] for n in self._param_names] for m in self.deepspeed_experts]

    def replicas_identical(self) -> bool:
        """Whether every copy of every replicated expert equals its home copy (collective)."""
        self._require_bound("replicas_identical")
        return replica_max_abs_diff(self.placement, self.ep_rank, self.slot_params(), self.group) == 0.0

    # ----------------------------------------------------------------- forward
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs``: ``[ep, S, C, M]`` (MOELayer's layout); returns the same shape."""
        self._require_bound("forward")
        if self.__dict__["_loaded"] is not None:
            raise LPLBInputError(
                "LPLB experts were loaded from a state dict but the replicas are not filled yet: "
                "call lplb_plugin.deepspeed.finish_load(model) on every rank (the engine's "
                "load_checkpoint does it when the engine came from lplb_plugin.deepspeed.initialize)"
            )
        self.__dict__["_save_stash"] = None  # a snapshot for state_dict() is stale from here on
        chunks = inputs.chunk(self.num_local_experts, dim=1)
        if torch.is_grad_enabled():
            weights = with_replica_grad_sum(self.placement, self.ep_rank, self.slot_params(), self.group,
                                            enabled=self.sum_replica_grads)
        else:
            weights = self.slot_params()
        outputs = []
        for chunk, expert, w in zip(chunks, self.deepspeed_experts, weights):
            out = torch.func.functional_call(expert, dict(zip(self._param_names, w)), (chunk,))
            if isinstance(out, tuple):
                out = out[0]  # as DeepSpeed's Experts: ignore a bias term
            outputs.append(out)
        return torch.cat(outputs, dim=1)

    # ----------------------------------------------------------------- checkpoints
    def needs_gather_for_save(self) -> bool:
        """Whether some rank does not hold a copy of every logical expert it owns (then
        :meth:`prepare_save` must run, collectively, before a state dict is taken).
        The same answer on every rank (it depends on the placement only)."""
        S, nl = self.placement.slots_per_rank, self.n_owned
        held = self.placement.phy2log.view(self.placement.n_ranks, S)
        owned = torch.arange(self.placement.n_logical).view(self.placement.n_ranks, nl)
        return not all(bool(torch.isin(owned[r], held[r]).all()) for r in range(self.placement.n_ranks))

    def prepare_save(self) -> None:
        """Fetch the owned logical experts from the ranks holding them (collective); the
        snapshot serves ``state_dict()`` until the next forward or :meth:`clear_save`."""
        self._require_bound("prepare_save")
        self.__dict__["_save_stash"] = gather_owned_logical(self.placement, self.ep_rank, self.slot_tensors(),
                                                            self.group)

    def clear_save(self) -> None:
        self.__dict__["_save_stash"] = None

    def finish_load(self) -> None:
        """After ``load_state_dict``: fill every slot (replicas included) from the loaded
        logical experts (collective; a no-op on every rank when nothing was loaded)."""
        loaded = self.__dict__["_loaded"]
        if loaded is None:
            return
        self._require_bound("finish_load")
        fill_slots_from_logical(self.placement, self.ep_rank, self.slot_tensors(), loaded, self.group)
        self.__dict__["_loaded"] = None

    def _owned_view(self) -> list[list[torch.Tensor]]:
        pending = self.__dict__["_pending"]
        if pending is not None:
            return pending
        stash = self.__dict__["_save_stash"]
        if stash is not None:
            return stash
        out = []
        slots = self.slot_tensors()
        for e in self.owned:
            hits = torch.nonzero(self.slot_expert == e).flatten()
            if hits.numel() == 0:
                raise LPLBInputError(
                    f"state_dict(): logical expert {e} (owned by EP rank {self.ep_rank} in the "
                    f"plain layout) has no copy on this rank under this placement; call "
                    f"lplb_plugin.deepspeed.prepare_save(model) on every rank first (the engine's "
                    f"save_checkpoint does it when the engine came from lplb_plugin.deepspeed.initialize)"
                )
            out.append(slots[int(hits[0])])
        return out

    def _require_bound(self, what: str) -> None:
        if self.ep_rank is None:
            raise LPLBInputError(
                f"LPLBExperts.{what}: the EP group is not known yet (deepspeed.initialize, or "
                f"MoE.set_deepspeed_parallelism(), binds it)"
            )


def _tensors(module: nn.Module, names: list[str]) -> list[torch.Tensor]:
    sd = module.state_dict(keep_vars=True)
    return [sd[n] for n in names]


def _logical_state_dict_hook(module: LPLBExperts, state_dict, prefix, local_metadata) -> None:
    slot_prefix = prefix + _SLOTS
    for key in [k for k in state_dict if k.startswith(slot_prefix)]:
        del state_dict[key]
    for j, tensors in enumerate(module._owned_view()):
        for name, t in zip(module._tensor_names, tensors):
            state_dict[f"{slot_prefix}{j}.{name}"] = t.detach()


def _logical_load_hook(module: LPLBExperts, state_dict, prefix, local_metadata, strict,
                       missing_keys, unexpected_keys, error_msgs) -> None:
    slot_prefix = prefix + _SLOTS
    names, nl = module._tensor_names, module.n_owned
    logical_keys = [[f"{slot_prefix}{j}.{n}" for n in names] for j in range(nl)]
    present = [k in state_dict for row in logical_keys for k in row]
    if not any(present):
        return  # nothing for these experts: load_state_dict reports the missing keys
    if not all(present):
        error_msgs.append(
            f"{prefix}: an LPLB MoE layer loads all {nl} logical experts of this rank at once "
            f"(keys {slot_prefix}{{0..{nl - 1}}}.*); some are missing"
        )
        return
    extra = sorted({k.split(".")[0] for k in (k[len(slot_prefix):] for k in state_dict if k.startswith(slot_prefix))
                    if k.split(".")[0].isdigit() and int(k.split(".")[0]) >= nl})
    if extra:
        error_msgs.append(
            f"{prefix}: state dict has expert slots {extra} beyond the {nl} logical experts of this "
            f"rank; LPLB checkpoints store logical experts, not physical slots"
        )
        return
    loaded = [[state_dict.pop(k) for k in row] for row in logical_keys]
    pending = module.__dict__["_pending"]
    if pending is not None:
        # Not bound yet: the plain experts simply take the loaded values.
        for dst, src in zip(pending, loaded):
            for d, s in zip(dst, src):
                with torch.no_grad():
                    d.copy_(s)
    else:
        module.__dict__["_loaded"] = [[s.detach().clone() for s in row] for row in loaded]
    # Let the slots' own loading see their current values; finish_load() fills them.
    for s, tensors in enumerate(module.slot_tensors()):
        for name, t in zip(names, tensors):
            state_dict[f"{slot_prefix}{s}.{name}"] = t.detach()
