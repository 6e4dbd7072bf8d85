"""Turning LPLB on in a DeepSpeed job: ``apply`` and ``initialize``."""

from __future__ import annotations

import types
from typing import Any

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from torch import nn

from ..config import LPLBConfig
from ..errors import LPLBConfigError, LPLBInputError
from . import checkpoint as _ckpt
from .clipping import clip_fp32_gradients
from .ds_config import lplb_config_from_ds_config
from .layer import LPLBMoE
from .metrics import write_metrics

__all__ = ["apply", "initialize"]


def apply(model: nn.Module, config: Any) -> list[LPLBMoE]:
    """Swap LPLB into every ``deepspeed.moe.layer.MoE`` of ``model`` (in place), before
    ``deepspeed.initialize``.

    Args:
        model: the user's model (plain DeepSpeed MoE layers inside).
        config: a ds_config (dict or JSON path) with a top-level ``"lplb"`` block, or an
            :class:`LPLBConfig`.

    Returns:
        The converted layers (empty when the block is absent or ``enabled: false``).

    Raises:
        LPLBConfigError: a bad ``lplb`` block, ZeRO-3, a layer that cannot use LPLB
            (names the layer and the reason), or an enabled block with no MoE layer.
    """
    if not isinstance(model, nn.Module):
        raise LPLBInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = config if isinstance(config, LPLBConfig) else lplb_config_from_ds_config(config)
    if cfg is None or not cfg.enabled:
        return []
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not found:
        raise LPLBConfigError("lplb is enabled but the model has no deepspeed.moe.layer.MoE layer")
    converted = []
    for name, m in found:
        if isinstance(m, LPLBMoE):
            converted.append(m)
            continue
        converted.append(LPLBMoE.from_moe(m, cfg, name=name))
    return converted


def initialize(model: nn.Module, config: Any = None, **kwargs) -> tuple:
    """``deepspeed.initialize`` with LPLB.

    Reads the ds_config's ``"lplb"`` block, swaps LPLB into the model's MoE layers, then
    calls ``deepspeed.initialize(model=model, config=config, **kwargs)`` (which creates
    the EP groups; the LPLB layers then fill their replicas from the logical experts).
    When LPLB is on, the returned engine's ``save_checkpoint`` / ``load_checkpoint`` are
    the LPLB-aware ones (:mod:`lplb_plugin.deepspeed.checkpoint`) and its ``step`` writes
    the balance metrics (:mod:`lplb_plugin.deepspeed.metrics`) after every optimizer
    step.

    Returns:
        What ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader,
        lr_scheduler)``.
    """
    source = config  # DeepSpeed also takes the config as config_params= or args.deepspeed_config
    if source is None:
        source = kwargs.get("config_params") or getattr(kwargs.get("args"), "deepspeed_config", None)
    stale = {id(t): m for m in _moe_layers(model) for e in m.deepspeed_moe.experts.deepspeed_experts
             for t in e.parameters()}
    layers = apply(model, source)
    if layers:
        stale = {k: m for k, m in stale.items() if m in layers}
        _check_optimizer(kwargs.get("optimizer"), stale)
        if kwargs.get("model_parameters") is not None:
            kwargs["model_parameters"] = _remap_parameters(kwargs["model_parameters"], stale)
    out = deepspeed.initialize(model=model, config=config, **kwargs)
    if layers:
        attach(out[0])
    return out


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if type(m) is MoE]


def _check_optimizer(optimizer, stale: dict) -> None:
    if isinstance(optimizer, torch.optim.Optimizer):
        if any(id(p) in stale for g in optimizer.param_groups for p in g["params"]):
            raise LPLBConfigError(
                "optimizer: it was built on the plain MoE experts, which LPLB replaces by its expert "
                "slots; pass a callable (optimizer=lambda params: ...) or build the optimizer after "
                "lplb_plugin.deepspeed.apply(model, config)"
            )


def _remap_parameters(params, stale: dict):
    """Replace the plain experts' parameters (now outside the model) by the LPLB slots'
    parameters of the same layers, keeping list / param-group structure."""
    params = list(params)
    done: set[int] = set()

    def fix(seq):
        out = []
        for p in seq:
            layer = stale.get(id(p))
            if layer is None:
                out.append(p)
            elif id(layer) not in done:
                done.add(id(layer))
                out.extend(layer.deepspeed_moe.experts.deepspeed_experts.parameters())
        return out

    if params and isinstance(params[0], dict):
        return [{**g, "params": fix(g["params"])} for g in params]
    return fix(params)


def attach(engine) -> None:
    """Install the LPLB-aware ``save_checkpoint`` / ``load_checkpoint`` and the metrics
    write after ``step`` on an engine (instance attributes; the class is untouched)."""
    if getattr(engine, "_lplb_attached", False):
        return
    engine.save_checkpoint = types.MethodType(_ckpt.save_checkpoint, engine)
    engine.load_checkpoint = types.MethodType(_ckpt.load_checkpoint, engine)
    own_step = type(engine).step.__get__(engine)

    def step(self, *args, **kw):
        before = self.global_steps
        result = own_step(*args, **kw)
        if self.global_steps != before:
            write_metrics(self)
        return result

    engine.step = types.MethodType(step, engine)
    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
    engine._lplb_attached = True
