"""``LPLBRouter``: Megatron's ``TopKRouter`` at logical width, output at physical width.

Everything the router learns or regularises stays logical: the gate ``weight[L, h]``,
aux / seq-aux / global-aux losses, z-loss, expert bias, score function, routing replay.
Only its output is rewritten: the logical ``probs[T, L]`` / ``routing_map[T, L]`` become
``probs[T, P]`` / ``routing_map[T, P]`` with exactly one physical copy per chosen logical
expert, picked by the layer's :class:`~lplb_plugin.megatron.balancer.LayerBalancer`.

The physical probs are built with ``gather`` (logical prob of each choice) and
``scatter`` (into the chosen slot), both differentiable, so the gradient of the expert
outputs and the aux losses (which ride on ``probs`` through Megatron's
``MoEAuxLossAutoScaler``) reach the gate unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["LPLBRouter", "logical_to_physical"]


def logical_to_physical(
    probs: torch.Tensor, routing_map: torch.Tensor, topk: int, n_physical: int, choose
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite a logical routing into a physical one.

    Args:
        probs: float ``[T, L]`` (zero outside the top-k), part of the autograd graph.
        routing_map: bool ``[T, L]`` with exactly ``topk`` True per row (dropless).
        topk: experts per token.
        n_physical: ``P``.
        choose: callable ``int64 [T, k] logical ids -> int64 [T, k] physical ids``.

    Returns:
        ``(probs [T, P], routing_map [T, P] bool)``.
    """
    T = routing_map.shape[0]
    nz = routing_map.nonzero()
    if nz.shape[0] != T * topk:
        raise RuntimeError(
            f"LPLB needs exactly moe_router_topk={topk} experts per token (dropless routing); "
            f"the router chose {nz.shape[0]} for {T} tokens"
        )
    # nonzero() is row-major, so each row's k choices are consecutive
    logical_idx = nz[:, 1].view(T, topk)
    phys_idx = choose(logical_idx)
    values = probs.gather(1, logical_idx)
    phys_probs = torch.zeros(T, n_physical, dtype=probs.dtype, device=probs.device).scatter(1, phys_idx, values)
    phys_map = torch.zeros(T, n_physical, dtype=torch.bool, device=routing_map.device).scatter(1, phys_idx, True)
    return phys_probs, phys_map


class LPLBRouter(TopKRouter):
    """A ``TopKRouter`` built with the *logical* config whose output is physical.

    Built by :class:`~lplb_plugin.megatron.moe_layer.LPLBMoELayer`, which then calls
    :meth:`attach_balancer`.  ``self.config.num_moe_experts`` is the logical count.
    """

    def attach_balancer(self, balancer, n_physical: int, replay_mode) -> None:
        """Connect the layer's balancer.

        Args:
            balancer: :class:`LayerBalancer` of the owning layer.
            n_physical: physical experts ``P``.
            replay_mode: callable ``() -> "plan" | "record" | "replay"`` (the owning
                layer knows whether this forward is a checkpointed one or its recompute).
        """
        self._lplb_balancer = balancer
        self._lplb_n_physical = n_physical
        self._lplb_mode = replay_mode

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        mode = self._lplb_mode()
        return logical_to_physical(
            probs,
            routing_map,
            self.topk,
            self._lplb_n_physical,
            lambda idx: self._lplb_balancer.choose(idx, mode),
        )
