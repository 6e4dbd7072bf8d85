"""``--lplb-*`` command-line arguments and the ``lplb:`` block of a Megatron YAML.

One flag per key of :class:`~lplb_plugin.config.LPLBConfig`, derived from the config's
own field list so the two can never drift apart: ``lplb.<section>.<key>`` becomes
``--lplb-<section>-<key>`` (underscores as dashes), e.g. ``--lplb-solver ipm``,
``--lplb-placement-topology ring``, ``--lplb-placement-topology-shape 2``,
``--lplb-ipm-max-iters 50``; booleans take ``true`` / ``false``.  A flag that is given
overrides the YAML block; values are validated by ``LPLBConfig.from_dict`` (errors name
the dotted key).  Use :func:`add_lplb_args` as (part of) Megatron-LM's
``extra_args_provider``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from ..config import LPLBConfig

__all__ = ["add_lplb_args", "lplb_config_from_args", "lplb_flags"]


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def lplb_flags() -> list[tuple[str, tuple[str, ...], Any]]:
    """``(flag, dotted key path, spec)`` for every config key, in declaration order."""
    out = []

    def walk(cls, path):
        for f in dataclasses.fields(cls):
            spec = f.metadata["spec"]
            inner = getattr(spec, "inner", spec)
            if hasattr(spec, "cls"):  # a nested section
                walk(spec.cls, path + (f.name,))
                continue
            flag = "--lplb-" + "-".join(path + (f.name,)).replace("_", "-")
            out.append((flag, path + (f.name,), inner))

    walk(LPLBConfig, ())
    return out


def add_lplb_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--lplb-*`` flags (group "lplb") to ``parser``; returns it (usable as
    Megatron-LM's ``extra_args_provider``)."""
    group = parser.add_argument_group("lplb", "LPLB load balancing (overrides the YAML lplb: block)")
    group.add_argument("--lplb-config", default=None, help="YAML/JSON file holding an lplb: block")
    for flag, path, spec in lplb_flags():
        dest = "lplb__" + "__".join(path)
        kind = type(spec).__name__
        helptext = f"lplb.{'.'.join(path)}: {spec.expected}"
        if kind == "_Bool":
            group.add_argument(flag, dest=dest, type=_bool, default=None, metavar="{true,false}", help=helptext)
        elif kind == "_Int":
            group.add_argument(flag, dest=dest, type=int, default=None, help=helptext)
        elif kind == "_Float":
            group.add_argument(flag, dest=dest, type=float, default=None, help=helptext)
        elif kind == "_IntList":
            group.add_argument(flag, dest=dest, type=int, nargs="+", default=None, help=helptext)
        else:
            group.add_argument(flag, dest=dest, type=str, default=None, help=helptext)
    return parser


def lplb_config_from_args(args: argparse.Namespace, yaml_block: Optional[Mapping] = None) -> Optional[LPLBConfig]:
    """Merge the YAML ``lplb:`` block with the given ``--lplb-*`` flags.

    Args:
        args: parsed arguments (from a parser extended by :func:`add_lplb_args`).
        yaml_block: the ``lplb`` mapping of the run's YAML (``None``: none).  A file
            given by ``--lplb-config`` is read with ``LPLBConfig.from_file`` and takes
            the place of ``yaml_block``.

    Returns:
        the validated :class:`LPLBConfig`, or ``None`` when there is neither a block
        nor any ``--lplb-*`` flag (the plugin is off).
    """
    base: Optional[dict] = None
    path = getattr(args, "lplb_config", None)
    if path:
        base = LPLBConfig.from_file(path).to_dict()
    elif yaml_block is not None:
        base = _plain(yaml_block)
    overrides = {}
    for _, key_path, _ in lplb_flags():
        value = getattr(args, "lplb__" + "__".join(key_path), None)
        if value is not None:
            overrides[key_path] = value
    if base is None and not overrides:
        return None
    merged = base if base is not None else {}
    if isinstance(merged, bool):  # "lplb: true"
        merged = {"enabled": merged}
    for key_path, value in overrides.items():
        node = merged
        for k in key_path[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[key_path[-1]] = value
    return LPLBConfig.from_dict(merged)


def _plain(block) -> Any:
    if isinstance(block, Mapping):
        return {k: _plain(v) for k, v in block.items()}
    if isinstance(block, (list, tuple)):
        return [_plain(v) for v in block]
    return block
