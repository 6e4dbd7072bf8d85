"""Megatron-core adapter (megatron-core 0.19.2; see ``docs/megatron.md``).

- :class:`LPLBMoELayer` / :class:`LPLBRouter`: the MoE layer over physical experts and
  its logical-width router;
- :func:`with_lplb`: swap them into a GPT layer / decoder block / MTP spec;
- :func:`install_replica_grad_sync`: sum replica gradients before Megatron's DP
  reduction (wraps ``config.finalize_model_grads_func``);
- :func:`balance_metrics` / :func:`log_balance_metrics`: per-layer balance statistics.
"""

from .balancer import BalanceStats, LayerBalancer
from .grads import install_replica_grad_sync, lplb_layers, sync_replica_grads
from .moe_layer import LPLBMoELayer, check_megatron_settings
from .router import LPLBRouter
from .spec import with_lplb

__all__ = [
    "BalanceStats",
    "LayerBalancer",
    "LPLBMoELayer",
    "LPLBRouter",
    "check_megatron_settings",
    "install_replica_grad_sync",
    "lplb_layers",
    "sync_replica_grads",
    "with_lplb",
]
