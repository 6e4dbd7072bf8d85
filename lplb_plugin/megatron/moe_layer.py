"""``LPLBMoELayer``: Megatron's ``MoELayer`` over physical experts.

The layer is built from the model's (logical) ``TransformerConfig`` with ``L`` experts.
It builds the placement of the ``lplb`` config for its EP group (``P`` physical slots,
rank-major: EP rank ``r`` holds slots ``[r*P/EP, (r+1)*P/EP)``, exactly Megatron's
``ep_rank * num_local_experts + local`` layout), then builds Megatron's layer with a copy
of the config where ``num_moe_experts = P``: experts, token dispatcher and EP layout are
physical.  The router is an :class:`LPLBRouter` built with the logical config.

Replica rules it enforces:

- at construction every copy is overwritten by its home copy (collective over EP);
- its ``sharded_state_dict`` (distributed checkpoints) saves only home copies, under the
  logical expert id, in exactly the format of a plain Megatron layer with ``L`` experts;
  non-home copies load the same logical shard, so loading needs no extra sync;
- ``state_dict`` / ``load_state_dict`` (torch format) do the same at EP=1, where a rank
  holds every expert; at EP>1 use distributed checkpointing (see ``docs/megatron.md``);
- gradients are summed over copies by :func:`lplb_plugin.megatron.grads.sync_replica_grads`
  (installed into ``config.finalize_model_grads_func``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from ..config import LPLBConfig
from ..errors import LPLBConfigError
from ..planner import Planner, placement_from_config
from ..replicas import copy_home_to_replicas, replica_max_abs_diff
from .balancer import LayerBalancer
from .router import LPLBRouter

__all__ = ["LPLBMoELayer", "check_megatron_settings"]

_DISPATCHERS = ("allgather", "alltoall", "flex")


def check_megatron_settings(config) -> None:
    """Reject Megatron settings the plugin cannot honour, naming each.

    Raises:
        LPLBConfigError: token dropping / capacity (the plugin needs dropless routing:
            capacity is per logical expert in the router but per slot in the
            dispatcher), an unknown dispatcher, group-limited routing (its groups are
            logical experts on the plain layout, not the physical one), router padding
            for quantization (changes the number of slots per token), or CUDA graphs
            that capture the router (the adapter reads each batch's split back to the
            host for its balance statistics, which a graph cannot replay).
    """
    problems = []
    if config.moe_expert_capacity_factor is not None:
        problems.append(
            f"moe_expert_capacity_factor={config.moe_expert_capacity_factor!r}: LPLB needs dropless "
            "routing, set it to None"
        )
    if getattr(config, "moe_pad_expert_input_to_capacity", False):
        problems.append("moe_pad_expert_input_to_capacity=True: LPLB needs dropless routing, set it to False")
    if config.moe_token_dispatcher_type not in _DISPATCHERS:
        problems.append(
            f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r}: expected one of {_DISPATCHERS}"
        )
    if config.moe_router_num_groups is not None or config.moe_router_group_topk is not None:
        problems.append(
            f"moe_router_num_groups={config.moe_router_num_groups!r}, moe_router_group_topk="
            f"{config.moe_router_group_topk!r}: group-limited routing is not supported with LPLB, set both to None"
        )
    if getattr(config, "moe_router_padding_for_quantization", False) or getattr(config, "moe_router_padding_for_fp8", False):
        problems.append("moe_router_padding_for_quantization / moe_router_padding_for_fp8: not supported with LPLB")
    impl = getattr(config, "cuda_graph_impl", "none")
    if impl != "none":
        mods = config.cuda_graph_modules
        mods = [mods] if isinstance(mods, (str,)) or not isinstance(mods, (list, tuple)) else list(mods)
        names = {str(getattr(m, "name", m)) for m in mods}
        if impl in ("local", "full_iteration") or not names or names & {"full", "moe", "moe_router", "mlp"}:
            problems.append(
                f"cuda_graph_impl={impl!r} with cuda_graph_modules={sorted(names)}: CUDA graphs over the MoE "
                "router are not supported with LPLB (capture only 'attn' or set cuda_graph_impl='none')"
            )
    if problems:
        raise LPLBConfigError("LPLB cannot run with these Megatron settings:\n  " + "\n  ".join(problems))


def _build_logical_router(*, config, pg_collection, is_mtp_layer=False, logical_config=None):
    # MoELayer passes its own (physical) config; the router must stay logical.
    return LPLBRouter(config=logical_config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)


class LPLBMoELayer(MoELayer):
    """Megatron ``MoELayer`` with LPLB redundant experts.

    Args:
        config: the model's ``TransformerConfig`` (``num_moe_experts`` = logical ``L``).
        submodules: Megatron ``MoESubmodules``; its ``router`` must be ``TopKRouter``
            (it is replaced by :class:`LPLBRouter`).
        layer_number, pg_collection, is_mtp_layer, name: as ``MoELayer``.
        lplb_config: the ``lplb`` block (placement, solver).

    Attributes:
        placement: the layer's :class:`~lplb_plugin.layout.ExpertPlacement`.
        balancer: its :class:`~lplb_plugin.megatron.balancer.LayerBalancer`.
        logical_config: the logical config (the router's).
    """

    def __init__(
        self,
        config,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
        *,
        lplb_config: LPLBConfig,
    ):
        if not isinstance(lplb_config, LPLBConfig):
            raise LPLBConfigError(f"lplb_config must be an LPLBConfig, got {type(lplb_config).__name__}")
        check_megatron_settings(config)
        if submodules is None or submodules.router is not TopKRouter:
            got = None if submodules is None else submodules.router
            raise LPLBConfigError(
                f"LPLBMoELayer needs MoESubmodules with router=TopKRouter (it installs LPLBRouter), got {got!r}"
            )
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        ep_group = pg_collection.ep
        ep_size, ep_rank = ep_group.size(), ep_group.rank()
        n_logical = config.num_moe_experts
        placement = placement_from_config(lplb_config, n_logical, ep_size)

        physical_config = copy.copy(config)
        physical_config.num_moe_experts = placement.n_physical
        submodules = dataclasses.replace(
            submodules, router=functools.partial(_build_logical_router, logical_config=config)
        )
        super().__init__(
            physical_config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
            name=name,
        )
        self.logical_config = config
        self.lplb_config = lplb_config
        self.placement = placement
        self.ep_rank = ep_rank
        self._ep_group_or_none = ep_group if ep_size > 1 else None
        planner = Planner.from_placement(
            placement, group=self._ep_group_or_none, solver=lplb_config.resolved_solver,
            ipm_max_iters=lplb_config.ipm.max_iters, ipm_tol=lplb_config.ipm.tol,
        )
        self.balancer = LayerBalancer(planner)
        self.router.attach_balancer(self.balancer, placement.n_physical, self._choice_mode)
        self._register_state_dict_hook(_logical_state_dict_hook)
        self._register_load_state_dict_pre_hook(functools.partial(_logical_load_pre_hook, self))
        self.copy_home_to_replicas()

    # ------------------------------------------------------------------ replicas
    def local_slot_params(self) -> list[list[torch.nn.Parameter]]:
        """Parameters of each local slot (local expert), in ``parameters()`` order."""
        return [list(expert.parameters()) for expert in self._local_expert_modules()]

    def _local_expert_modules(self):
        experts = getattr(self.experts, "local_experts", None)
        if experts is None:
            raise LPLBConfigError(
                f"LPLB supports the SequentialMLP experts module (one module per local expert); "
                f"got {type(self.experts).__name__} (set moe_grouped_gemm=False)"
            )
        return list(experts)

    def copy_home_to_replicas(self) -> None:
        """Overwrite every copy with its home expert's weights (collective over EP)."""
        copy_home_to_replicas(self.placement, self.ep_rank, self.local_slot_params(), self._ep_group_or_none)

    def replica_max_abs_diff(self) -> float:
        """Largest difference between a copy and its home expert (collective over EP)."""
        return replica_max_abs_diff(self.placement, self.ep_rank, self.local_slot_params(), self._ep_group_or_none)

    # ------------------------------------------------------------------ recompute
    def _choice_mode(self) -> str:
        # tensor_parallel.checkpoint runs the first forward under no_grad and the
        # recompute with grad enabled: record the choice, then replay it.
        if self.moe_layer_recompute and self.training:
            return "replay" if torch.is_grad_enabled() else "record"
        return "plan"

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron's sharded state dict with the experts rewritten to logical ids:
        the home copy of expert ``e`` is the main replica of shard ``e`` of ``L``; every
        other copy is a non-main replica of that same shard (saved once, loaded by all).
        """
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = len(sharded_offsets)
        P, L = self.placement.n_physical, self.placement.n_logical
        S = self.placement.slots_per_rank
        col_of_slot = _copy_column(self.placement)
        for key, item in list(sd.items()):
            if not key.startswith(f"{prefix}experts.local_experts."):
                continue
            local = int(key[len(f"{prefix}experts.local_experts."):].split(".", 1)[0])
            slot = self.ep_rank * S + local
            e, col = int(self.placement.phy2log[slot]), int(col_of_slot[slot])
            _relabel_expert_shard(item, axis, slot, e, P, L, col)
        return sd


def _copy_column(placement) -> torch.Tensor:
    """int64 ``[P]``: the column of each slot in ``log2phy`` (0 = home copy)."""
    col = torch.empty(placement.n_physical, dtype=torch.int64)
    for c in range(placement.log2phy.shape[1]):
        slots = placement.log2phy[:, c]
        slots = slots[slots >= 0]
        col[slots] = c
    return col


def _relabel_expert_shard(item, axis: int, slot: int, expert: int, P: int, L: int, col: int) -> None:
    """Move one expert shard (a ``ShardedTensor`` or the ``ShardedObject`` of a module's
    extra state) from physical slot ``slot`` of ``P`` to logical expert ``expert`` of
    ``L``; non-home copies (``col > 0``) become non-main replicas."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    if not isinstance(item, (ShardedTensor, ShardedObject)):
        raise LPLBConfigError(
            f"LPLB cannot relabel expert checkpoint item {type(item).__name__} (supported: the "
            f"SequentialMLP experts' ShardedTensor / ShardedObject entries)"
        )
    if item.global_shape[axis] != P or item.global_offset[axis] != slot:
        raise LPLBConfigError(
            f"unexpected expert shard layout for {item.key}: axis {axis} has shape "
            f"{item.global_shape[axis]} and offset {item.global_offset[axis]}, expected {P} and {slot}"
        )
    item.global_shape = tuple(item.global_shape[:axis]) + (L,) + tuple(item.global_shape[axis + 1 :])
    item.global_offset = tuple(item.global_offset[:axis]) + (expert,) + tuple(item.global_offset[axis + 1 :])
    if getattr(item, "axis_fragmentations", None) is not None:
        frag = tuple(item.axis_fragmentations)
        item.axis_fragmentations = frag[:axis] + (L,) + frag[axis + 1 :]
    if col:
        # a non-main replica of the home shard: saved once (by the home), loaded by all
        rid = item.replica_id if isinstance(item.replica_id, tuple) else (item.replica_id,)
        item.replica_id = (*rid[:-1], rid[-1] + col * 1_000_000)


def _logical_state_dict_hook(module: "LPLBMoELayer", state_dict, prefix, local_metadata):
    """torch ``state_dict``: at EP=1 keep only home copies, renamed to logical ids."""
    if module.placement.n_ranks != 1:
        return state_dict
    base = f"{prefix}experts.local_experts."
    home = module.placement.log2phy[:, 0].tolist()
    slot_to_expert = {s: e for e, s in enumerate(home)}
    renamed = {}
    for key in [k for k in state_dict if k.startswith(base)]:
        slot, rest = key[len(base):].split(".", 1)
        value = state_dict.pop(key)
        if int(slot) in slot_to_expert:
            renamed[f"{base}{slot_to_expert[int(slot)]}.{rest}"] = value
    state_dict.update(renamed)
    return state_dict


def _logical_load_pre_hook(module: "LPLBMoELayer", state_dict, prefix, *args):
    """torch ``load_state_dict``: at EP=1 map logical expert entries onto every copy."""
    if module.placement.n_ranks != 1:
        return
    base = f"{prefix}experts.local_experts."
    logical = {}
    for key in [k for k in state_dict if k.startswith(base)]:
        e, rest = key[len(base):].split(".", 1)
        logical[(int(e), rest)] = state_dict.pop(key)
    phy2log = module.placement.phy2log.tolist()
    for (e, rest), value in logical.items():
        for slot, owner in enumerate(phy2log):
            if owner == e:
                state_dict[f"{base}{slot}.{rest}"] = value
