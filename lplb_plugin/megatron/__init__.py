"""Megatron-core adapter (megatron-core 0.19.2; see ``docs/megatron.md``).

- :class:`LPLBMoELayer` / :class:`LPLBRouter`: the MoE layer over physical experts and
  its logical-width router;
- :func:`with_lplb`: swap them into a GPT layer / decoder block / MTP spec;
- :func:`install_replica_grad_sync`: sum replica gradients before Megatron's DP
  reduction (wraps ``config.finalize_model_grads_func``);
- :func:`balance_metrics` / :func:`log_balance_metrics`: per-layer balance statistics;
- :func:`add_lplb_args` / :func:`lplb_config_from_args`: ``--lplb-*`` flags and the YAML
  ``lplb:`` block.
"""

from .balancer import BalanceStats, LayerBalancer
from .args import add_lplb_args, lplb_config_from_args
from .grads import install_replica_grad_sync, lplb_layers, sync_replica_grads
from .metrics import balance_metrics, log_balance_metrics
from .moe_layer import LPLBMoELayer, check_megatron_settings
from .router import LPLBRouter
from .spec import with_lplb

__all__ = [
    "add_lplb_args",
    "balance_metrics",
    "lplb_config_from_args",
    "log_balance_metrics",
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
