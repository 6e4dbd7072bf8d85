"""Per-layer balance metrics through DeepSpeed's monitor (TensorBoard / W&B / CSV /
Comet, whichever the ds_config enables under ``tensorboard``, ``wandb``,
``csv_monitor``, ``comet``).

Events, one per LPLB layer ``i`` (in module order), averaged over the micro-batches of
the optimizer step and written at DeepSpeed's sample count ``engine.global_samples``:

- ``Train/lplb/layer{i}/max_over_mean``: max / mean planned load of the EP ranks with
  LPLB's split;
- ``Train/lplb/layer{i}/max_over_mean_plain``: the same for plain DeepSpeed's layout
  (expert ``e`` on rank ``e // (L/ep)``, no replicas), from the same counts;
- ``Train/lplb/layer{i}/solve_ms``: solve time per batch;
- ``Train/lplb/layer{i}/fallbacks``: batches whose solve fell back to a safe split.
"""

from __future__ import annotations

from .checkpoint import lplb_layers

__all__ = ["balance_events", "write_metrics"]


def balance_events(model, step: int, reset: bool = True) -> list[tuple[str, float, int]]:
    """``[(name, value, step), ...]`` for every LPLB layer that routed a batch since the
    last reset."""
    events = []
    for i, layer in enumerate(lplb_layers(model)):
        for key, value in layer.balance_stats(reset=reset).items():
            events.append((f"Train/lplb/layer{i}/{key}", float(value), step))
    return events


def write_metrics(engine) -> list[tuple[str, float, int]]:
    """Write the balance events through ``engine.monitor`` when a monitor is enabled
    (DeepSpeed writes on global rank 0 only) and reset the counters; returns the
    events."""
    events = balance_events(engine.module, engine.global_samples, reset=True)
    monitor = getattr(engine, "monitor", None)
    if events and monitor is not None and monitor.enabled:
        monitor.write_events(events)
    return events
