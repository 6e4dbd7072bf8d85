"""Per-layer balance metrics for Megatron's logging / TensorBoard writer.

Each :class:`LPLBMoELayer` accumulates, per planned micro-batch, the max/mean EP-rank
load before the split (every token on its expert's home copy) and after it (the planned
split), whether the solve was proven optimal, and the solve time.  The counts are global
over the EP group, so every rank reports the same numbers.  Call
:func:`log_balance_metrics` at the log interval (e.g. where Megatron-LM's
``training_log`` writes its scalars); it reports the averages since the previous call
and starts a new window.
"""

from __future__ import annotations

from typing import Optional

from .grads import lplb_layers

__all__ = ["balance_metrics", "log_balance_metrics"]


def _layer_name(layer) -> str:
    prefix = "mtp_layer" if getattr(layer, "is_mtp_layer", False) else "layer"
    return f"{prefix}_{layer.layer_number}"


def balance_metrics(model) -> dict[str, float]:
    """Averages since the last call, per LPLB layer, and start a new window.

    Args:
        model: a model or list of model chunks.

    Returns:
        ``{"lplb/<layer>/max_over_mean_before": ..., ".../max_over_mean_after": ...,
        ".../optimal_fraction": ..., ".../solve_ms": ...}`` plus the means over layers
        under ``"lplb/all/..."``; empty when nothing was planned.
    """
    out: dict[str, float] = {}
    totals: dict[str, list[float]] = {}
    for layer in lplb_layers(model):
        means = layer.balancer.pop_stats().means()
        names = {"before": "max_over_mean_before", "after": "max_over_mean_after",
                 "optimal_fraction": "optimal_fraction", "solve_ms": "solve_ms"}
        for k, v in means.items():
            out[f"lplb/{_layer_name(layer)}/{names[k]}"] = v
            totals.setdefault(names[k], []).append(v)
    for k, vs in totals.items():
        out[f"lplb/all/{k}"] = sum(vs) / len(vs)
    return out


def log_balance_metrics(model, iteration: int, writer: Optional[object] = None) -> dict[str, float]:
    """Compute :func:`balance_metrics` and write each to ``writer.add_scalar(name,
    value, iteration)`` (a TensorBoard ``SummaryWriter``, or Megatron-LM's
    ``get_tensorboard_writer()``; ``None``: only return them)."""
    metrics = balance_metrics(model)
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(name, value, iteration)
    return metrics
