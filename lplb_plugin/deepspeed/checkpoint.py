"""Checkpoints of LPLB models: the plain DeepSpeed layout, one copy per logical expert.

A DeepSpeed MoE checkpoint stores expert ``e`` of MoE layer ``l`` in
``layer_{l}_expert_{e}_mp_rank_XX_model_states.pt``, written by the EP rank that owns
it in the plain layout (``e // (L / ep)``).  An LPLB layer's state dict is already in
that logical form (see :mod:`lplb_plugin.deepspeed.experts`), so DeepSpeed's own
``save_checkpoint`` / ``load_checkpoint`` write and read it; these wrappers add the
collective steps around them:

- save: when the placement puts an owned expert on another rank (EPLB placements), the
  owned experts are fetched first; the placements go into ``client_state["lplb"]`` and a
  small ``lplb_placement.json`` next to the checkpoint files;
- load: afterwards every slot (replicas included) is filled from the loaded logical
  experts, and ZeRO's fp32 master copies are refreshed.  Optimizer states hold the
  physical layout, so they load only from a checkpoint with the same placement (checked);
  load a plain checkpoint, or one from another placement, with ``load_module_only=True``
  or ``load_optimizer_states=False``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from deepspeed import comm as dist

from ..errors import LPLBInputError
from .layer import LPLBMoE

__all__ = ["lplb_layers", "prepare_save", "finish_load", "save_checkpoint", "load_checkpoint",
           "placement_metadata", "PLACEMENT_FILE"]

PLACEMENT_FILE = "lplb_placement.json"


def lplb_layers(model: torch.nn.Module) -> list[LPLBMoE]:
    """The model's LPLB MoE layers in module order (the order DeepSpeed numbers MoE
    layers in checkpoints)."""
    return [m for m in model.modules() if isinstance(m, LPLBMoE)]


def placement_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """``{"version": 1, "layers": [{"n_logical", "n_physical", "ep_size", "phy2log"}...],
    "config": {...}}``: what ``client_state["lplb"]`` holds."""
    layers = lplb_layers(model)
    return {
        "version": 1,
        "layers": [
            {
                "n_logical": m.placement.n_logical,
                "n_physical": m.placement.n_physical,
                "ep_size": m.placement.n_ranks,
                "phy2log": m.placement.phy2log.tolist(),
            }
            for m in layers
        ],
        "config": layers[0].lplb_config.to_dict() if layers else None,
    }


def prepare_save(model: torch.nn.Module) -> None:
    """Collective: make every LPLB layer's ``state_dict()`` available on every rank
    (needed before a state dict is taken when a placement moves owned experts)."""
    for m in lplb_layers(model):
        if m.lplb_experts.needs_gather_for_save():
            m.lplb_experts.prepare_save()


def _clear_save(model: torch.nn.Module) -> None:
    for m in lplb_layers(model):
        m.lplb_experts.clear_save()


def finish_load(model: torch.nn.Module) -> None:
    """Collective: after ``load_state_dict``, fill every slot (replicas included) from
    the loaded logical experts."""
    for m in lplb_layers(model):
        m.lplb_experts.finish_load()


def save_checkpoint(engine, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                    save_latest: bool = True, **kwargs) -> Any:
    """``engine.save_checkpoint`` for a model with LPLB layers (call on every rank).

    Args: as ``DeepSpeedEngine.save_checkpoint``; ``client_state`` must not use the key
    ``"lplb"``.
    """
    client_state = dict(client_state or {})
    if "lplb" in client_state:
        raise LPLBInputError("client_state: the key 'lplb' is reserved for the LPLB placement")
    model = engine.module
    meta = placement_metadata(model)
    client_state["lplb"] = meta
    if tag is None:
        tag = f"global_step{engine.global_steps}"  # DeepSpeed's default tag
    prepare_save(model)
    try:
        out = _original(engine, "save_checkpoint")(save_dir, tag=tag, client_state=client_state,
                                                   save_latest=save_latest, **kwargs)
    finally:
        _clear_save(model)
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, str(tag), PLACEMENT_FILE), "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
    dist.barrier()
    return out


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, **kwargs) -> tuple[Optional[str], Optional[dict]]:
    """``engine.load_checkpoint`` for a model with LPLB layers (call on every rank).

    Loads a checkpoint written with LPLB or by plain DeepSpeed (same logical experts).

    Raises:
        LPLBInputError: optimizer states were requested from a checkpoint whose
            placement differs from this model's (or that has none: a plain checkpoint).
    """
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as fh:
                tag = fh.read().strip()
    model = engine.module
    with_optimizer = load_optimizer_states and not load_module_only
    if with_optimizer and tag is not None:
        _check_same_placement(os.path.join(load_dir, str(tag), PLACEMENT_FILE), placement_metadata(model))
    out = _original(engine, "load_checkpoint")(load_dir, tag=tag, load_module_strict=load_module_strict,
                                               load_optimizer_states=load_optimizer_states,
                                               load_lr_scheduler_states=load_lr_scheduler_states,
                                               load_module_only=load_module_only, **kwargs)
    if out[0] is None:
        return out
    finish_load(model)
    if not with_optimizer and hasattr(engine.optimizer, "refresh_fp32_params"):
        # ZeRO keeps fp32 master copies; the replicas just changed under them.
        engine.optimizer.refresh_fp32_params()
    return out


def _check_same_placement(path: str, current: dict) -> None:
    hint = ("its optimizer states are in another physical layout; load it with load_module_only=True "
            "(or load_optimizer_states=False)")
    if not os.path.isfile(path):
        raise LPLBInputError(f"{os.path.dirname(path)}: checkpoint has no LPLB placement ({PLACEMENT_FILE}), "
                             f"i.e. it was written without LPLB: {hint}")
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    if saved.get("layers") != current["layers"]:
        raise LPLBInputError(f"{path}: the checkpoint's LPLB placement differs from this model's: {hint}")


def _original(engine, name: str):
    """The engine's own method (not our wrapper installed by ``initialize``)."""
    return getattr(type(engine), name).__get__(engine)
