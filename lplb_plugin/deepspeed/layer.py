"""``LPLBMoE``: a ``deepspeed.moe.layer.MoE`` with redundant expert replicas balanced
by the LP planner.

Router width stays logical (``L``: gate weights, aux loss, ``exp_counts``, the MoE's
``num_experts`` and, for checkpoints, ``num_local_experts = L / ep``); the dispatch,
the all-to-alls and the experts use the physical count ``P = L + ep *
redundant_per_rank`` (``deepspeed_moe.num_local_experts = P / ep``).
"""

from __future__ import annotations

from typing import Optional

from deepspeed import comm as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from ..config import LPLBConfig
from ..errors import LPLBConfigError, LPLBInputError
from ..planner import Planner, placement_from_config
from .experts import LPLBExperts
from .gate import LPLBTopKGate

__all__ = ["LPLBMoE"]


class LPLBMoE(MoE):
    """DeepSpeed ``MoE`` with LPLB.

    Build it like ``MoE`` (same arguments; ``drop_tokens`` defaults to ``False`` here
    and must stay so) plus ``lplb=`` an :class:`LPLBConfig`, or convert an existing
    layer with :meth:`from_moe` (what :func:`lplb_plugin.deepspeed.apply` does).

    Rejected with :class:`LPLBConfigError`: ``drop_tokens=True`` (capacity would be per
    physical copy), Tutel, expert tensor parallelism, an EP group already set.

    Attributes:
        lplb_config: the :class:`LPLBConfig`.
        placement: the :class:`ExpertPlacement` (CPU).
        num_physical_experts: ``P``.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, use_residual: bool = False, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = False, use_rts: bool = True, use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False, top2_2nd_expert_sampling: bool = True,
                 *, lplb: LPLBConfig | None = None) -> None:
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, noisy_gate_policy, drop_tokens, use_rts, use_tutel,
                         enable_expert_tensor_parallelism, top2_2nd_expert_sampling)
        self._convert(LPLBConfig() if lplb is None else lplb, where="LPLBMoE")

    @classmethod
    def from_moe(cls, moe: MoE, config: LPLBConfig, name: str = "") -> "LPLBMoE":
        """Turn a plain ``MoE`` into an ``LPLBMoE`` in place (same object, same gate
        weights; its experts become the logical experts that seed the slots).

        Raises:
            LPLBConfigError: the layer cannot use LPLB (see the class doc).
        """
        if type(moe) is not MoE:
            raise LPLBInputError(f"{name or 'module'}: expected a deepspeed.moe.layer.MoE, got {type(moe).__name__}")
        moe.__class__ = cls
        try:
            moe._convert(config, where=name or "MoE")
        except Exception:
            moe.__class__ = MoE
            raise
        return moe

    def _convert(self, config: LPLBConfig, where: str) -> None:
        if not isinstance(config, LPLBConfig):
            raise LPLBInputError(f"{where}: lplb config must be an LPLBConfig, got {type(config).__name__}")
        layer = self.deepspeed_moe
        gate = layer.gate
        problems = []
        if type(gate) is not TopKGate:
            problems.append(f"its gate is a {type(gate).__name__}, expected deepspeed's TopKGate")
        elif gate.drop_tokens:
            problems.append("drop_tokens=True: LPLB needs dropless routing (MoE(..., drop_tokens=False)), because "
                            "capacity would be counted per physical copy instead of per logical expert")
        if layer.use_tutel:
            problems.append("use_tutel=True: Tutel's dispatcher is not replica-aware; use use_tutel=False")
        if self.enable_expert_tensor_parallelism:
            problems.append("enable_expert_tensor_parallelism=True: expert tensor parallelism is not supported")
        if layer.ep_group is not None:
            problems.append("its EP group is already set: apply LPLB before deepspeed.initialize")
        if problems:
            raise LPLBConfigError(f"{where}: cannot enable lplb: " + "; ".join(problems))
        placement = placement_from_config(config, self.num_experts, self.ep_size)
        self.lplb_config = config
        self.placement = placement
        self.num_physical_experts = placement.n_physical
        gate.__class__ = LPLBTopKGate
        gate._lplb_init(placement.n_physical)
        owned = list(layer.experts.deepspeed_experts)
        layer.experts = LPLBExperts(owned, placement, self.expert_group_name)
        layer.num_local_experts = placement.slots_per_rank

    # ----------------------------------------------------------------- binding
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's group creation, then: the planner over the EP group and the slots
        filled from the logical experts (collective over the EP group)."""
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        group = self.deepspeed_moe.ep_group
        ep_rank = dist.get_rank(group=group)
        cfg = self.lplb_config
        planner = Planner.from_placement(self.placement, group=group, solver=cfg.resolved_solver,
                                         ipm_max_iters=cfg.ipm.max_iters, ipm_tol=cfg.ipm.tol,
                                         warn_on_fallback=cfg.warn_on_fallback, stats=cfg.stats)
        planner._config = cfg
        self.deepspeed_moe.gate._bind_planner(planner)
        self.deepspeed_moe.experts.bind(ep_rank, group)

    # ----------------------------------------------------------------- helpers
    @property
    def lplb_experts(self) -> LPLBExperts:
        return self.deepspeed_moe.experts

    @property
    def lplb_gate(self) -> LPLBTopKGate:
        return self.deepspeed_moe.gate

    def balance_stats(self, reset: bool = False) -> dict[str, float]:
        """Mean balance of the batches routed since the last reset (see
        :class:`~lplb_plugin.deepspeed.gate.GateStats`)."""
        out = self.lplb_gate.stats.means()
        if reset:
            self.lplb_gate.stats.reset()
        return out
