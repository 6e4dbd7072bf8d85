"""lplb_plugin: per-batch LP load balancing of redundant MoE experts.

Public entry points: :class:`Planner`, :class:`LPLBConfig`, :class:`ExpertPlacement`,
:func:`lplb_plugin.placement.rebalance_experts`, :func:`lplb_plugin.solvers.solve`,
:mod:`lplb_plugin.topology`.
"""

from .config import LPLBConfig
from .errors import LPLBConfigError, LPLBError, LPLBInputError
from .layout import ExpertPlacement
from .planner import Planner, SplitPlan

__all__ = [
    "ExpertPlacement",
    "LPLBConfig",
    "LPLBConfigError",
    "LPLBError",
    "LPLBInputError",
    "Planner",
    "SplitPlan",
]

__version__ = "0.1.0"
