"""DeepSpeed adapter: LPLB for ``deepspeed.moe.layer.MoE`` (deepspeed >= 0.19.4).

Turn it on with a top-level ``"lplb"`` block in the ds_config and one call::

    import lplb_plugin.deepspeed as lplb_ds
    engine, optimizer, _, _ = lplb_ds.initialize(model=model, config="ds_config.json",
                                                 model_parameters=model.parameters())

See ``docs/deepspeed.md``.  This subpackage imports deepspeed; the core does not.
"""

from .checkpoint import finish_load, load_checkpoint, lplb_layers, prepare_save, save_checkpoint
from .ds_config import lplb_config_from_ds_config
from .experts import LPLBExperts
from .gate import LPLBTopKGate
from .initialize import apply, attach, initialize
from .layer import LPLBMoE
from .metrics import balance_events, write_metrics

__all__ = [
    "LPLBExperts",
    "LPLBMoE",
    "LPLBTopKGate",
    "apply",
    "attach",
    "balance_events",
    "finish_load",
    "initialize",
    "load_checkpoint",
    "lplb_config_from_ds_config",
    "lplb_layers",
    "prepare_save",
    "save_checkpoint",
    "write_metrics",
]
