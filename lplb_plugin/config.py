"""``LPLBConfig``: the plugin's typed, validated configuration.

A user enables the plugin with one ``lplb`` block, either in a Megatron YAML file::

    lplb:
      enabled: true
      solver: auto
      placement: {policy: topology, topology: cube, redundant_per_rank: 2}

or in a DeepSpeed ``ds_config`` JSON (``{"lplb": {...}}``).  Every key and value is
checked when the block is loaded; a wrong one raises :class:`LPLBConfigError` whose
message names the full dotted key (``lplb.placement.topology``), the bad value (its
``repr``) and what is allowed.  All problems found in one block are reported together.

How the validation is organised: each dataclass field carries a *spec* (a small checker
object: :class:`_Bool`, :class:`_Int`, :class:`_Float`, :class:`_Choice`, ...) in its
``metadata``.  One generic validator (:func:`_validate_fields`) walks those specs for
any section; the few rules that involve several fields live in each section's
``_cross_problems``.  The same code runs for :meth:`LPLBConfig.from_dict` and for direct
construction (``LPLBConfig(solver="ipm")``, ``dataclasses.replace``), so an invalid
config object cannot exist.

This module imports neither torch nor any training framework.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .errors import LPLBConfigError, LPLBInputError

__all__ = ["LPLBConfig", "PlacementConfig", "IPMConfig", "LPConfig", "StatsConfig", "TOPOLOGIES"]

#: Upstream LPLB topologies: name -> (redundant slots per rank ``n_redundant``,
#: fixed group size or ``None`` when it comes from ``topology_shape``).
#: Must agree with :mod:`lplb_plugin.topology` (checked by the tests).
TOPOLOGIES: dict[str, tuple[int, Optional[int]]] = {
    "ring": (1, None),  # group size n from topology_shape [n], default 8
    "cube": (2, 8),
    "hypercube": (2, 16),
    "torus": (2, None),  # group size m*n from topology_shape [m, n]
}
_RING_DEFAULT_N = 8


# ============================================================================ specs
class _Invalid(Exception):
    """Raised by a spec; carries finished ``"<dotted key>: ..."`` messages."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _got(value: Any, with_type: bool = False) -> str:
    text = f"got {value!r}"
    return f"{text} ({type(value).__name__})" if with_type else text


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Ctx:
    """What a spec may need besides the value: where relative paths resolve."""

    base_dir: Optional[str] = None


class _Spec:
    """Checks and normalises one value.  ``expected`` is the human text of what is
    allowed, used in messages and in :meth:`LPLBConfig.describe`."""

    expected: str = ""
    type_name: str = ""

    def check(self, value: Any, key: str, ctx: _Ctx) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        """Plain (YAML/JSON-ready) form of a checked value."""
        return value

    def fail(self, key: str, value: Any, with_type: bool = False, hint: str = "") -> _Invalid:
        return _Invalid([f"{key}: expected {self.expected}, {_got(value, with_type)}{hint}"])


class _Bool(_Spec):
    expected = "a bool (true or false)"
    type_name = "bool"

    def check(self, value, key, ctx):
        if not isinstance(value, bool):
            raise self.fail(key, value, with_type=True)
        return value


class _Int(_Spec):
    type_name = "int"

    def __init__(self, lo: int, hi: Optional[int] = None):
        self.lo, self.hi = lo, hi
        self.expected = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"

    def check(self, value, key, ctx):
        if not _is_int(value):
            raise self.fail(key, value, with_type=True)
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise self.fail(key, value)
        return int(value)


class _Float(_Spec):
    """A finite real number in an interval; ints are accepted and stored as float."""

    type_name = "float"

    def __init__(self, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.expected = (
            f"a float in {'(' if lo_open else '['}{lo!r}, {hi!r}{')' if hi_open else ']'}"
        )

    def check(self, value, key, ctx):
        if not _is_real(value):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = (
                        "; strings are not numbers (YAML 1.1 reads an exponent without a "
                        "dot, like 1e-6, as a string: write 1.0e-6)"
                    )
                except ValueError:
                    pass
            raise self.fail(key, value, with_type=True, hint=hint)
        v = float(value)
        below = v <= self.lo if self.lo_open else v < self.lo
        above = v >= self.hi if self.hi_open else v > self.hi
        if not math.isfinite(v) or below or above:
            raise self.fail(key, value)
        return v


class _Choice(_Spec):
    type_name = "str"

    def __init__(self, *options: str):
        self.options = options
        self.expected = "one of " + ", ".join(repr(o) for o in options)

    def check(self, value, key, ctx):
        if not isinstance(value, str):
            raise self.fail(key, value, with_type=True)
        if value not in self.options:
            close = difflib.get_close_matches(value, self.options, n=1)
            if not close:  # case slips: 'Cube' -> 'cube'
                close = [o for o in self.options if o.lower() == value.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(key, value, hint=hint)
        return value


class _IntList(_Spec):
    """A list of ints (any length here; lengths and ranges are cross-field rules).
    Stored as a tuple so the config stays hashable; dumped as a list."""

    expected = "a list of ints"
    type_name = "list[int]"

    def check(self, value, key, ctx):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise self.fail(key, value, with_type=True)
        for i, item in enumerate(value):
            if not _is_int(item):
                raise _Invalid(
                    [f"{key}[{i}]: expected an int, {_got(item, with_type=True)} (in {key}={value!r})"]
                )
        return tuple(int(v) for v in value)

    def dump(self, value):
        return list(value)


class _Path(_Spec):
    """A filesystem path; relative paths resolve against ``ctx.base_dir`` when set."""

    expected = "a path (a non-empty str)"
    type_name = "str (path)"

    def check(self, value, key, ctx):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, value, with_type=True)
        path = os.path.expanduser(value)
        if ctx.base_dir is not None and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(ctx.base_dir, path))
        return path


class _Optional(_Spec):
    def __init__(self, inner: _Spec):
        self.inner = inner
        self.expected = f"null or {inner.expected}"
        self.type_name = f"{inner.type_name} or null"

    def check(self, value, key, ctx):
        if value is None:
            return None
        try:
            return self.inner.check(value, key, ctx)
        except _Invalid as e:
            if len(e.problems) == 1 and e.problems[0].startswith(f"{key}: expected "):
                raise self.fail(key, value, with_type=True) from None
            raise

    def dump(self, value):
        return None if value is None else self.inner.dump(value)


class _Section(_Spec):
    """A nested section (another config dataclass).  ``null`` means all defaults."""

    def __init__(self, cls: type):
        self.cls = cls
        self.expected = f"a mapping with keys {_key_list(cls)}"
        self.type_name = "mapping"

    def check(self, value, key, ctx):
        if isinstance(value, self.cls):
            return value
        return self.cls._from_mapping(value, key, ctx)

    def dump(self, value):
        return value.to_dict()


def _key_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _opt(default: Any, spec: _Spec, doc: str) -> Any:
    """Declare a config field: its default, its spec and a one-line meaning."""
    return field(default=default, metadata={"spec": spec, "doc": doc})


def _sub(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"spec": _Section(cls), "doc": doc})


# ====================================================================== validator
def _validate_fields(cls: type, values: Mapping[str, Any], path: str, ctx: _Ctx) -> dict:
    """Check every field of section ``cls`` found in ``values`` against its spec, then
    the section's cross-field rules.  Returns the normalised values (all fields,
    defaults filled in).  Raises ``_Invalid`` with every problem found."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
            continue
        try:
            out[f.name] = f.metadata["spec"].check(values[f.name], f"{path}.{f.name}", ctx)
        except _Invalid as e:
            problems.extend(e.problems)
    if not problems:
        problems.extend(cls._cross_problems(out, path))
    if problems:
        raise _Invalid(problems)
    return out


def _unknown_key_problems(cls: type, raw: Mapping, path: str) -> list[str]:
    valid = [f.name for f in dataclasses.fields(cls)]
    problems = []
    for k in raw:
        if not isinstance(k, str):
            problems.append(f"{path}: keys must be strings, got {k!r} ({type(k).__name__})")
        elif k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean '{path}.{close[0]}'?)" if close else ""
            problems.append(
                f"{path}.{k}: unknown key{hint}; valid keys under {path}: {', '.join(valid)}"
            )
    return problems


def _raise(problems: list[str], source: str) -> None:
    if len(problems) == 1:
        raise LPLBConfigError(problems[0])
    raise LPLBConfigError(
        f"{len(problems)} problems in the {source} config:\n" + "\n".join(f"  - {p}" for p in problems)
    )


class _ConfigSection:
    """Behaviour shared by every config section (not a dataclass itself)."""

    _PATH: ClassVar[str]  # dotted key of the section when built directly

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        try:
            normalised = _validate_fields(type(self), values, self._PATH, _Ctx())
        except _Invalid as e:
            _raise(e.problems, self._PATH)
        for name, value in normalised.items():  # e.g. int -> float, list -> tuple
            object.__setattr__(self, name, value)

    @classmethod
    def _cross_problems(cls, values: dict, path: str) -> list[str]:
        """Rules involving several fields of this section; ``values`` are normalised."""
        return []

    @classmethod
    def _from_mapping(cls, raw: Any, path: str, ctx: _Ctx):
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise _Invalid(
                [f"{path}: expected a mapping with keys {_key_list(cls)}, {_got(raw, with_type=True)}"]
            )
        problems = _unknown_key_problems(cls, raw, path)
        try:
            values = _validate_fields(cls, raw, path, ctx)
        except _Invalid as e:
            problems.extend(e.problems)
        if problems:
            raise _Invalid(problems)
        return cls(**values)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: Optional[str] = None, base_dir: Optional[str] = None):
        """Build and validate this section from a mapping; missing keys take defaults.

        Args:
            d: the section's mapping (``None`` means all defaults).
            source: dotted key of the section, used in error messages (default: its
                place in the ``lplb`` block, e.g. ``lplb.placement``).
            base_dir: directory that relative paths (``placement.workload``) resolve
                against; ``None`` leaves them as written.

        Raises:
            LPLBConfigError: naming every wrong key / value.
        """
        source = cls._PATH if source is None else source
        try:
            return cls._from_mapping(d, source, _Ctx(base_dir=base_dir))
        except _Invalid as e:
            _raise(e.problems, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) that ``from_dict`` turns back into an
        equal config; ready for ``yaml.safe_dump`` / ``json.dump``."""
        return {
            f.name: f.metadata["spec"].dump(getattr(self, f.name)) for f in dataclasses.fields(self)
        }


# ======================================================================= sections
@dataclass(frozen=True)
class IPMConfig(_ConfigSection):
    """Options of the interior-point solver (``solver: ipm``).

    Attributes:
        max_iters: iteration cap per solve, in ``[1, 1000]``.
        tol: relative accuracy of the IPM's returned objective, in ``(0, 1e-2]``: it
            stops at merit ``<= 0.1 tol`` or on a proof that its split is within ``tol``.
    """

    _PATH: ClassVar[str] = "lplb.ipm"

    max_iters: int = _opt(100, _Int(1, 1000), "Iteration cap of one IPM solve.")
    tol: float = _opt(
        1e-6,
        _Float(0.0, 1e-2, lo_open=True),
        "Relative accuracy at which the IPM stops (merit <= 0.1 tol, or its split proven within tol).",
    )


@dataclass(frozen=True)
class PlacementConfig(_ConfigSection):
    """Where the physical (replica) experts live.

    Attributes:
        policy: ``"topology"`` (upstream LPLB's fixed redundancy graphs) or ``"eplb"``
            (DeepSeek EPLB's load-driven replicate-and-pack placement).
        topology: ``"ring" | "cube" | "hypercube" | "torus"``; used when
            ``policy == "topology"``.
        topology_shape: ``(n,)`` for ring (default ``(8,)``), ``(m, n)`` for torus
            (required), ``None`` for cube / hypercube.
        redundant_per_rank: copy slots per EP rank; physical experts =
            ``n_logical + ep_size * redundant_per_rank``.  With the topology policy a
            positive multiple of the topology's ``n_redundant``.
        num_nodes: nodes spanned by the EP group (eplb).
        num_groups: expert groups of group-limited routing (eplb).
        workload: ``None`` or a path to a JSON expert-load file
            ``{"logical_count": [[...] per layer]}``.
    """

    _PATH: ClassVar[str] = "lplb.placement"

    policy: str = _opt("topology", _Choice("topology", "eplb"), "Placement policy.")
    topology: str = _opt(
        "cube",
        _Choice(*TOPOLOGIES),
        "Redundancy graph of the topology policy (upstream LPLB's r2o).",
    )
    topology_shape: Optional[tuple[int, ...]] = _opt(
        None,
        _Optional(_IntList()),
        "[n] for ring (default [8]), [m, n] for torus (required); null for cube/hypercube.",
    )
    redundant_per_rank: int = _opt(
        2, _Int(1), "Copy slots per EP rank: physical = logical + ep_size * redundant_per_rank."
    )
    num_nodes: int = _opt(1, _Int(1), "Nodes spanned by the EP group (eplb).")
    num_groups: int = _opt(1, _Int(1), "Expert groups of group-limited routing (eplb).")
    workload: Optional[str] = _opt(
        None,
        _Optional(_Path()),
        'JSON expert-load file {"logical_count": [[...] per layer]}; relative to the config file.',
    )

    # -------------------------------------------------------------- cross-field rules
    @classmethod
    def _cross_problems(cls, v: dict, path: str) -> list[str]:
        problems = []
        topo, shape = v["topology"], v["topology_shape"]
        skey = f"{path}.topology_shape"
        where = f"for {path}.topology={topo!r}"
        if topo in ("cube", "hypercube"):
            if shape is not None:
                size = TOPOLOGIES[topo][1]
                problems.append(
                    f"{skey}: expected null {where} (its group size is fixed at {size}), "
                    f"got {list(shape)!r}"
                )
        elif topo == "ring":
            if shape is not None and (len(shape) != 1 or shape[0] < 2):
                problems.append(f"{skey}: expected null or [n] with n >= 2 {where}, got {list(shape)!r}")
        elif topo == "torus":
            if shape is None or len(shape) != 2 or min(shape) < 2:
                shown = None if shape is None else list(shape)
                problems.append(
                    f"{skey}: expected [m, n] with m >= 2 and n >= 2 {where} "
                    f"(required for torus), got {shown!r}"
                )
        if v["policy"] == "topology" and not problems:
            n_red = TOPOLOGIES[topo][0]
            if v["redundant_per_rank"] % n_red:
                problems.append(
                    f"{path}.redundant_per_rank: expected a positive multiple of {n_red} "
                    f"(the redundant slots per rank of {path}.topology={topo!r}) when "
                    f"{path}.policy='topology', got {v['redundant_per_rank']!r}"
                )
        return problems

    # -------------------------------------------------------------- derived values
    @property
    def n_redundant(self) -> int:
        """Redundant slots per rank of one copy of the topology (``r2o.shape[1]``)."""
        return TOPOLOGIES[self.topology][0]

    @property
    def group_size(self) -> int:
        """EP ranks per topology group (``r2o.shape[0]``): 8 for cube, 16 for
        hypercube, ``n`` for ring ``[n]``, ``m * n`` for torus ``[m, n]``."""
        fixed = TOPOLOGIES[self.topology][1]
        if fixed is not None:
            return fixed
        if self.topology == "ring":
            return self.topology_shape[0] if self.topology_shape else _RING_DEFAULT_N
        return math.prod(self.topology_shape)

    @property
    def hierarchical(self) -> bool:
        """Whether EPLB uses its hierarchical (node-aware) policy:
        ``num_groups % num_nodes == 0``; otherwise it balances globally."""
        return self.num_groups % self.num_nodes == 0

    def physical_experts(self, n_logical: int, ep_size: int) -> int:
        """Physical experts over the EP group: ``n_logical + ep_size *
        redundant_per_rank``.  Runs :meth:`validate_for` first."""
        self.validate_for(n_logical, ep_size)
        return n_logical + ep_size * self.redundant_per_rank

    def validate_for(self, n_logical: int, ep_size: int) -> None:
        """Check this placement fits a model with ``n_logical`` routed experts on
        ``ep_size`` EP ranks.

        Raises:
            LPLBInputError: ``n_logical`` or ``ep_size`` is not an int >= 1.
            LPLBConfigError: the placement cannot be built for these sizes; the
                message names the config key and the values.
        """
        for name, value in (("n_logical", n_logical), ("ep_size", ep_size)):
            if not _is_int(value) or value < 1:
                raise LPLBInputError(f"{name} must be an int >= 1, got {value!r}")
        p = self._PATH
        problems = []
        if n_logical % ep_size:
            problems.append(
                f"n_logical={n_logical} must be a multiple of ep_size={ep_size} "
                f"(every EP rank holds the same number of logical experts)"
            )
        elif self.policy == "topology":
            shape = "" if self.topology_shape is None else f" with {p}.topology_shape={list(self.topology_shape)!r}"
            if ep_size % self.group_size:
                problems.append(
                    f"{p}.topology={self.topology!r}{shape} groups {self.group_size} EP ranks, "
                    f"so ep_size must be a multiple of {self.group_size}; got ep_size={ep_size}"
                )
            if self.redundant_per_rank > n_logical // ep_size:
                problems.append(
                    f"{p}.redundant_per_rank={self.redundant_per_rank} exceeds the "
                    f"{n_logical // ep_size} logical experts per rank (n_logical={n_logical}, "
                    f"ep_size={ep_size}): the topology policy copies distinct local experts"
                )
        elif self.hierarchical:  # eplb, node-aware
            if n_logical % self.num_groups:
                problems.append(
                    f"{p}.num_groups={self.num_groups}: n_logical={n_logical} must be a "
                    f"multiple of it"
                )
            if ep_size % self.num_nodes:
                problems.append(
                    f"{p}.num_nodes={self.num_nodes}: ep_size={ep_size} must be a multiple of it"
                )
        if problems:
            _raise(problems, p)


@dataclass(frozen=True)
class LPConfig(_ConfigSection):
    """Where replicas, and so the tokens the LP moves, may live across nodes.

    Attributes:
        scope: ``"node"``: every copy of an expert stays inside one node (moved tokens
            ride NVLink); EPLB runs its hierarchical policy and topology groups must
            fit in a node.  ``"global"``: copies may sit on other nodes (more
            freedom to balance, moved tokens cross the inter-node network).  Nodes
            are ``placement.num_nodes`` equal slices of the EP group.
    """

    _PATH: ClassVar[str] = "lplb.lp"

    scope: str = _opt("node", _Choice("node", "global"), "Keep every expert's copies in one node, or allow cross-node copies.")


@dataclass(frozen=True)
class StatsConfig(_ConfigSection):
    """Where a batch's per-expert counts come from and how they are summed over the
    EP group (see docs/stats.md).

    Attributes:
        source: ``"router"`` (count the router's ``topk_idx``), ``"deepep"`` (DeepEP's
            dispatch layout, after ``Planner.init_from_deep_ep``) or ``"auto"``
            (deepep once a DeepEP buffer is attached, router otherwise).
        comm: ``"torch"`` (``torch.distributed.all_reduce``: NCCL on GPU, gloo on
            CPU), ``"nvshmem"`` (nvshmem4py, GPU only) or ``"auto"`` (torch).
        check_consistency: before the first reduction, check that every EP rank runs
            the same plugin configuration, failing with a clear error rather than a
            hang or a wrong sum.
        timeout_s: how long that check waits for the other ranks.
        nvshmem_heap_mb: NVSHMEM symmetric heap size when ``comm = nvshmem`` and
            ``NVSHMEM_SYMMETRIC_SIZE`` is not set.
    """

    _PATH: ClassVar[str] = "lplb.stats"

    source: str = _opt("auto", _Choice("auto", "router", "deepep"), "Where per-expert counts come from.")
    comm: str = _opt("auto", _Choice("auto", "torch", "nvshmem"), "How counts are summed over the EP group.")
    check_consistency: bool = _opt(
        True, _Bool(), "Check once that every EP rank runs the same plugin configuration."
    )
    timeout_s: float = _opt(
        120.0, _Float(0.0, 86400.0, lo_open=True), "Seconds the consistency check waits for the other ranks."
    )
    nvshmem_heap_mb: int = _opt(
        64, _Int(1, 1 << 20), "NVSHMEM symmetric heap (MiB) when comm = nvshmem and NVSHMEM_SYMMETRIC_SIZE is unset."
    )


@dataclass(frozen=True)
class LPLBConfig(_ConfigSection):
    """The whole ``lplb`` block.

    Attributes:
        enabled: turn the plugin on / off.
        solver: ``"auto"`` (currently the exact solver), ``"exact"`` or ``"ipm"``.
        placement: :class:`PlacementConfig`.
        ipm: :class:`IPMConfig` (used when the IPM solver is selected).
        lp: :class:`LPConfig` (node or global replica scope).
        stats: :class:`StatsConfig` (count sources and the EP reduction).
        warn_on_fallback: log a warning when a solve falls back to a safe split.

    Build it with :meth:`from_dict`, :meth:`from_file` (YAML / JSON) or directly;
    every path validates.
    """

    _PATH: ClassVar[str] = "lplb"

    enabled: bool = _opt(True, _Bool(), "Turn the plugin on.")
    solver: str = _opt("auto", _Choice("auto", "exact", "ipm"), "LP solver; auto = exact.")
    placement: PlacementConfig = _sub(PlacementConfig, "Placement of the physical experts.")
    ipm: IPMConfig = _sub(IPMConfig, "Interior-point solver options.")
    lp: LPConfig = _sub(LPConfig, "Scope of replicas and of the LP: inside a node or across nodes.")
    stats: StatsConfig = _sub(StatsConfig, "Token statistics: count source and EP reduction.")
    warn_on_fallback: bool = _opt(
        True, _Bool(), "Log a warning when a solve falls back to a safe split."
    )

    def validate_for(self, n_logical: int, ep_size: int) -> None:
        """Check the whole block fits a model with ``n_logical`` routed experts on
        ``ep_size`` EP ranks: the placement's own rules, and that ``lp.scope: node``
        can keep every expert's copies inside one of ``placement.num_nodes`` nodes.

        Raises:
            LPLBInputError / LPLBConfigError: see :meth:`PlacementConfig.validate_for`.
        """
        pc = self.placement
        pc.validate_for(n_logical, ep_size)
        nodes = pc.num_nodes
        if self.lp.scope != "node" or nodes == 1:
            return
        problems = []
        if ep_size % nodes:
            problems.append(
                f"lplb.lp.scope='node' splits the EP group into lplb.placement.num_nodes={nodes} nodes, "
                f"so ep_size={ep_size} must be a multiple of it"
            )
        elif pc.policy == "topology" and (ep_size // nodes) % pc.group_size:
            problems.append(
                f"lplb.lp.scope='node': lplb.placement.topology={pc.topology!r} groups {pc.group_size} ranks, "
                f"which must fit in a node of {ep_size // nodes} ranks (ep_size={ep_size}, num_nodes={nodes}); "
                f"use a smaller topology or lplb.lp.scope='global'"
            )
        elif pc.policy == "eplb" and n_logical % nodes:
            problems.append(
                f"lplb.lp.scope='node' with policy 'eplb' packs experts onto {nodes} nodes: "
                f"n_logical={n_logical} must be a multiple of lplb.placement.num_nodes"
            )
        if problems:
            _raise(problems, "lplb")

    @property
    def resolved_solver(self) -> str:
        """The solver that runs: ``"exact"`` or ``"ipm"`` (``auto`` -> ``exact``)."""
        return "ipm" if self.solver == "ipm" else "exact"

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | bool, *, source: str = "lplb", base_dir: Optional[str] = None
    ) -> "LPLBConfig":
        """Build from the ``lplb`` block itself.

        Args:
            d: the block: a mapping (missing keys take defaults), or the shorthand
                ``True`` (enabled, all defaults) / ``False`` (disabled).
            source: dotted name of the block in error messages (e.g. ``"lplb"``).
            base_dir: directory that a relative ``placement.workload`` resolves
                against (``from_file`` passes the config file's directory).

        Raises:
            LPLBConfigError: naming every wrong key / value.
        """
        if isinstance(d, bool):
            return cls(enabled=d)
        if d is None:
            raise LPLBConfigError(
                f"{source}: expected a mapping (the lplb block) or true/false, got None "
                f"(an empty '{source}:' entry reads as null; write '{source}: true' for the defaults)"
            )
        if not isinstance(d, Mapping):
            raise LPLBConfigError(
                f"{source}: expected a mapping (the lplb block) or true/false, {_got(d, with_type=True)}"
            )
        return super().from_dict(d, source=source, base_dir=base_dir)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, key: str = "lplb") -> "LPLBConfig":
        """Load from a ``.yaml`` / ``.yml`` (``yaml.safe_load``) or ``.json`` file.

        If the file's top level is a mapping containing ``key``, that entry is the
        block (a full Megatron YAML or ``ds_config`` JSON works); otherwise the whole
        file is the block.  A relative ``placement.workload`` resolves against the
        file's directory.

        Raises:
            LPLBConfigError: bad extension, unparsable file or any wrong key / value;
                the message starts with the file path.
            OSError: the file cannot be read.
        """
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".yaml", ".yml", ".json"):
            raise LPLBConfigError(
                f"{path}: unsupported config file extension {ext!r}; expected one of "
                f"'.yaml', '.yml', '.json'"
            )
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if ext == ".json":
            try:
                data = json.loads(text)
            except ValueError as e:  # json.JSONDecodeError
                raise LPLBConfigError(f"{path}: cannot parse JSON: {e}") from e
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise LPLBConfigError(f"{path}: cannot parse YAML: {e}") from e

        whole_file = not (isinstance(data, Mapping) and key in data)
        block = data if whole_file else data[key]
        try:
            return cls.from_dict(
                block, source=key, base_dir=os.path.dirname(os.path.abspath(path))
            )
        except LPLBConfigError as e:
            hint = (
                f"\n(no top-level {key!r} key in the file, so the whole file was read as the "
                f"{key} block)"
                if whole_file and isinstance(data, Mapping)
                else ""
            )
            raise LPLBConfigError(f"{path}: {e}{hint}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, key: str = "lplb") -> "LPLBConfig":
        """:meth:`from_file` for a YAML file (``.yaml`` / ``.yml``)."""
        _require_ext(path, (".yaml", ".yml"))
        return cls.from_file(path, key=key)

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, key: str = "lplb") -> "LPLBConfig":
        """:meth:`from_file` for a JSON file (``.json``)."""
        _require_ext(path, (".json",))
        return cls.from_file(path, key=key)

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One row per leaf key: ``{"key", "type", "default", "allowed", "doc"}``
        (dotted keys, defaults in their plain form).  Used by docs and tests."""
        rows = []

        def walk(section: type, prefix: str) -> None:
            for f in dataclasses.fields(section):
                spec = f.metadata["spec"]
                if isinstance(spec, _Section):
                    walk(spec.cls, f"{prefix}.{f.name}")
                    continue
                rows.append(
                    {
                        "key": f"{prefix}.{f.name}",
                        "type": spec.type_name,
                        "default": spec.dump(f.default),
                        "allowed": spec.expected,
                        "doc": f.metadata["doc"],
                    }
                )

        walk(cls, "lplb")
        return rows


def _require_ext(path: str | os.PathLike, exts: tuple[str, ...]) -> None:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in exts:
        raise LPLBConfigError(
            f"{os.fspath(path)}: unsupported extension {ext!r} here; expected one of "
            + ", ".join(repr(e) for e in exts)
        )
