"""Reading the ``"lplb"`` block of a DeepSpeed ``ds_config``.

DeepSpeed keeps unknown top-level keys of its config (they end up in
``engine._config._param_dict``), so the block sits at the top level next to
``train_batch_size``, ``zero_optimization`` and the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Optional

from ..config import LPLBConfig
from ..errors import LPLBConfigError

__all__ = ["load_ds_config", "lplb_config_from_ds_config"]


def load_ds_config(config: Any) -> tuple[Optional[dict], Optional[str]]:
    """``(dict, base_dir)`` of a ds_config given as a dict or a JSON file path
    (``None`` stays ``None``)."""
    if config is None:
        return None, None
    if isinstance(config, Mapping):
        return dict(config), None
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except ValueError as e:
            raise LPLBConfigError(f"{path}: cannot parse the ds_config JSON: {e}") from e
        if not isinstance(data, Mapping):
            raise LPLBConfigError(f"{path}: a ds_config must be a JSON object, got {type(data).__name__}")
        return dict(data), os.path.dirname(os.path.abspath(path))
    raise LPLBConfigError(f"config: expected a ds_config dict or a JSON file path, got {type(config).__name__}")


def lplb_config_from_ds_config(config: Any) -> Optional[LPLBConfig]:
    """The validated ``lplb`` block of a ds_config, or ``None`` when absent.

    Also rejects settings LPLB cannot train correctly with here: ZeRO stage 3
    (DeepSpeed's native MoE does not support it either) and ``lplb.stats.source:
    deepep`` (DeepSpeed's MoE does not dispatch through DeepEP).

    Raises:
        LPLBConfigError: naming the dotted key (``lplb.placement.topology``,
            ``zero_optimization.stage``) and what is allowed; unknown keys inside the
            block are errors.
    """
    data, base_dir = load_ds_config(config)
    if data is None or "lplb" not in data:
        return None
    cfg = LPLBConfig.from_dict(data["lplb"], source="lplb", base_dir=base_dir)
    if cfg.enabled:
        if cfg.stats.source == "deepep":
            raise LPLBConfigError(
                "lplb.stats.source: expected 'auto' or 'router' with DeepSpeed, got 'deepep' "
                "(DeepSpeed's MoE layer dispatches with its own all-to-all, not DeepEP)"
            )
        zero = data.get("zero_optimization") or {}
        stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
        if stage == 3:
            raise LPLBConfigError(
                "zero_optimization.stage: lplb supports ZeRO stages 0, 1 and 2, got 3 "
                "(DeepSpeed's native MoE does not support stage 3 either)"
            )
    return cfg
