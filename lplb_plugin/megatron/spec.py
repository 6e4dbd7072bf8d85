"""Swap LPLB into Megatron layer specs without editing Megatron.

``with_lplb(spec, lplb_config)`` walks any spec object Megatron builds a GPT model from —
a ``TransformerBlockSubmodules`` from ``get_gpt_decoder_block_spec``, a single layer
``ModuleSpec`` from ``get_gpt_layer_local_spec``, an MTP block spec from
``get_gpt_mtp_block_spec`` — and replaces every ``MoELayer`` builder (a
``functools.partial(MoELayer, ...)`` or a ``ModuleSpec(module=MoELayer)``) by the same
builder of :class:`~lplb_plugin.megatron.moe_layer.LPLBMoELayer` with the ``lplb``
config attached.  Returns a new spec; the input is not modified.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config import LPLBConfig
from ..errors import LPLBConfigError
from .moe_layer import LPLBMoELayer

__all__ = ["with_lplb"]


def with_lplb(spec: Any, lplb_config: LPLBConfig, *, require_moe: bool = True) -> Any:
    """Return ``spec`` with every Megatron ``MoELayer`` replaced by ``LPLBMoELayer``.

    Args:
        spec: a Megatron layer / block / MTP spec (or a list of them).
        lplb_config: the ``lplb`` block; when ``enabled`` is False the spec is
            returned unchanged.
        require_moe: raise if the spec contains no ``MoELayer`` (a dense model with
            the plugin enabled is almost always a mistake).

    Raises:
        LPLBConfigError: no MoE layer found (with ``require_moe``).
    """
    if not isinstance(lplb_config, LPLBConfig):
        raise LPLBConfigError(f"lplb_config must be an LPLBConfig, got {type(lplb_config).__name__}")
    if not lplb_config.enabled:
        return spec
    counter = [0]
    out = _swap(spec, lplb_config, counter, {})
    if require_moe and counter[0] == 0:
        raise LPLBConfigError("with_lplb: the spec contains no MoELayer (is num_moe_experts set?)")
    return out


def _swap(obj: Any, cfg: LPLBConfig, counter: list, memo: dict) -> Any:
    # memo: one spec object may be shared by several layers; swap it once, reuse the result
    if id(obj) in memo:
        return memo[id(obj)]
    new = _swap_new(obj, cfg, counter, memo)
    if new is not obj:
        memo[id(obj)] = new
    return new


def _swap_new(obj: Any, cfg: LPLBConfig, counter: list, memo: dict) -> Any:
    if isinstance(obj, functools.partial):
        if obj.func is MoELayer:
            counter[0] += 1
            return functools.partial(LPLBMoELayer, *obj.args, **obj.keywords, lplb_config=cfg)
        return obj
    if isinstance(obj, ModuleSpec):
        if obj.module is MoELayer:
            counter[0] += 1
            return dataclasses.replace(obj, module=LPLBMoELayer, params={**obj.params, "lplb_config": cfg})
        return dataclasses.replace(obj, submodules=_swap(obj.submodules, cfg, counter, memo))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(o, cfg, counter, memo) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            new = _swap(value, cfg, counter, memo)
            if new is not value:
                changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj
