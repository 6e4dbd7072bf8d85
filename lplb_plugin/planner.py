"""``Planner``: counts -> all-reduce -> solve -> redirect, for one MoE layer.

Two ways to build one:

- upstream LPLB's constructor, ``Planner(r2o, n_routed_experts,
  n_logical_routed_experts, ep_size=None, group=None)``, so code written for
  ``lplb.Planner`` runs unchanged (same methods, attributes and return shapes);
- the general form, :meth:`Planner.from_placement` (any placement: any number of copies
  per expert, two copies on one rank) or :meth:`Planner.from_config` (an
  :class:`~lplb_plugin.config.LPLBConfig`).

On CPU tensors (or without the CUDA kernels) this is the torch path: the solve runs on
the host.  On a GPU with ``lplb_plugin._C`` every stage of :meth:`Planner.run` is a CUDA
kernel (count, solve with one thread block per connected component, map): no host
synchronisation, capturable in a CUDA graph.  Checks that need a value from the GPU
(ids out of range, a solve that fell back) are read one call later, or on demand with
:meth:`Planner.check_last_run`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .config import LPLBConfig, StatsConfig
from . import kernels
from .counting import check_topk_idx, check_topk_idx_type, count_tokens
from .errors import LPLBInputError
from .layout import ExpertPlacement
from .placement import rebalance_experts
from .problem import SplitGraph
from .redirect import copy_fractions, redirect
from .solvers import check_loads, solve_graph
from .stats import TokenStats, config_fingerprint
from .topology import by_name, validate_r2o

__all__ = ["Planner", "SplitPlan", "eplb_groups_and_nodes", "expert_order_by_load", "placement_from_config"]


@dataclass(frozen=True)
class SplitPlan:
    """One batch's split, shared by every rank of the EP group.

    Attributes:
        counts: float64 ``[L]`` (CPU) global tokens per logical expert.
        x: float64 ``[P]`` (CPU) tokens each physical slot should receive.
        cum_frac: float64 ``[L, C]`` cumulative copy shares (on the tokens' device).
        rank_loads: float64 ``[R]`` planned load per rank.
        optimal: the solver proved / converged to the optimum (False: fallback split).
        solve_seconds: wall time of the solve alone.
    """

    counts: torch.Tensor
    x: torch.Tensor
    cum_frac: torch.Tensor
    rank_loads: torch.Tensor
    optimal: bool
    solve_seconds: float

    @property
    def max_over_mean(self) -> float:
        mean = float(self.rank_loads.mean())
        return float(self.rank_loads.max()) / mean if mean > 0 else 1.0


class Planner:
    """Per-batch LP load balancer of one MoE layer.

    Upstream-compatible constructor.

    Args:
        redundant_to_original: ``r2o`` int ``[group_size, n_redundant]``; each column a
            permutation (see :mod:`lplb_plugin.topology`).
        n_routed_experts: physical experts ``P`` over the EP group (originals +
            copies).
        n_logical_routed_experts: logical experts ``L``.
        ep_size: EP ranks; defaults to ``group.size()``.
        group: the EP process group; counts are summed over it.  ``None``: the
            caller passes global counts (single process / simulation).
        solver: ``"exact"`` (default), ``"ipm"`` or ``"auto"`` (= exact).
        ipm_max_iters, ipm_tol: IPM options.
        warn_on_fallback: log a warning when a batch's split is a fallback.
        stats: ``lplb.stats`` options (count source, EP reduction, consistency
            check); defaults if ``None``.
    """

    def __init__(
        self,
        redundant_to_original: torch.Tensor,
        n_routed_experts: int,
        n_logical_routed_experts: int,
        ep_size: int | None = None,
        group=None,
        *,
        solver: str = "exact",
        ipm_max_iters: int = 100,
        ipm_tol: float = 1e-6,
        warn_on_fallback: bool = True,
        stats: StatsConfig | None = None,
    ) -> None:
        r2o = validate_r2o(redundant_to_original)
        ep_size = _resolve_ep_size(ep_size, group)
        placement = ExpertPlacement.from_r2o(r2o, n_routed_experts, n_logical_routed_experts, ep_size)
        self._init(placement, group, solver, ipm_max_iters, ipm_tol, warn_on_fallback, stats)
        self.r2o = r2o
        self.group_size, self.num_redundants = r2o.shape
        self.n_group = ep_size // self.group_size
        self.combined_redundant_experts = (
            self.n_local_routed_experts - self.n_local_logical_routed_experts
        ) // self.num_redundants
        self._build_hot_index()

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_placement(
        cls,
        placement: ExpertPlacement,
        group=None,
        *,
        solver: str = "exact",
        ipm_max_iters: int = 100,
        ipm_tol: float = 1e-6,
        warn_on_fallback: bool = True,
        stats: StatsConfig | None = None,
    ) -> "Planner":
        """A planner for any placement (e.g. from EPLB).  ``n_group`` is the number of
        connected components of its replica graph; the upstream stage methods that
        assume an ``r2o`` (``solve_probs``, ``weighted_select_target``) are not
        available."""
        if not isinstance(placement, ExpertPlacement):
            raise LPLBInputError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
        if group is not None and _group_size(group) != placement.n_ranks:
            raise LPLBInputError(
                f"group has {_group_size(group)} ranks but the placement has n_ranks={placement.n_ranks}"
            )
        self = cls.__new__(cls)
        self._init(placement, group, solver, ipm_max_iters, ipm_tol, warn_on_fallback, stats)
        self.r2o = None
        self.group_size = placement.n_ranks
        self.num_redundants = None
        self.n_group = int(torch.unique(self._graph.component).numel())
        self.combined_redundant_experts = None
        return self

    @classmethod
    def from_config(
        cls,
        config: LPLBConfig,
        n_logical: int,
        ep_size: int | None = None,
        group=None,
        *,
        workload: torch.Tensor | None = None,
    ) -> "Planner":
        """A planner from an :class:`LPLBConfig`.

        Args:
            config: the ``lplb`` block.
            n_logical: logical routed experts of the layer.
            ep_size: EP ranks (default ``group.size()``).
            group: EP process group.
            workload: optional ``[L]`` historical loads; default: the config's
                ``placement.workload`` file summed over layers, else none.
        """
        if not isinstance(config, LPLBConfig):
            raise LPLBInputError(f"config must be an LPLBConfig, got {type(config).__name__}")
        ep_size = _resolve_ep_size(ep_size, group)
        placement = placement_from_config(config, n_logical, ep_size, workload)
        planner = cls.from_placement(
            placement, group, solver=config.resolved_solver,
            ipm_max_iters=config.ipm.max_iters, ipm_tol=config.ipm.tol,
            warn_on_fallback=config.warn_on_fallback, stats=config.stats,
        )
        planner._config = config
        return planner

    def _init(self, placement, group, solver, ipm_max_iters, ipm_tol, warn_on_fallback, stats) -> None:
        if solver == "auto":
            solver = "exact"
        if solver not in ("exact", "ipm"):
            raise LPLBInputError(f"solver={solver!r} is unknown; expected 'auto', 'exact' or 'ipm'")
        self.group = group
        self.solver = solver
        self._solver_options = {"max_iters": ipm_max_iters, "tol": ipm_tol} if solver == "ipm" else {}
        self._solver_options["warn"] = bool(warn_on_fallback)
        self._ipm_options = (int(ipm_max_iters), float(ipm_tol))
        self._warn_on_fallback = bool(warn_on_fallback)
        self._config = None
        self._stats_config = stats
        self._set_placement(placement)

    def _set_placement(self, placement: ExpertPlacement) -> None:
        self.placement = placement
        self._graph = SplitGraph.from_placement(placement)
        self.ep_size = placement.n_ranks
        self.n_routed_experts = placement.n_physical
        self.n_logical_routed_experts = placement.n_logical
        self.n_local_routed_experts = placement.n_physical // placement.n_ranks
        self.n_local_logical_routed_experts = placement.n_logical // placement.n_ranks
        self._device_tables: dict[torch.device, torch.Tensor] = {}
        self._device_solvers: dict[torch.device, kernels.DeviceSolver] = {}
        # GPU runs' checks, without a sync: device totals of (ids out of range, fallback
        # components) since the planner was built, their pinned host copy with the event
        # that says it arrived, and the totals already acted on
        self._checks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending = None  # (pinned totals, event)
        self._seen = [0, 0]
        self._last_split = None  # DeviceSplit of the last GPU run
        # what every EP rank must agree on before counts are summed
        fingerprint = config_fingerprint(
            n_logical=placement.n_logical, n_physical=placement.n_physical, ep_size=placement.n_ranks,
            phy2log=placement.phy2log, solver=self.solver,
        )
        old_source = getattr(getattr(self, "stats", None), "source", None)
        self.stats = TokenStats(placement.n_logical, self.group, self._stats_config, fingerprint)
        if old_source is not None and old_source.name == "deepep":
            self.stats.source = old_source  # a re-placement keeps the attached DeepEP buffer

    # ------------------------------------------------------------------ placement
    @property
    def phy2log(self) -> torch.Tensor:
        return self.placement.phy2log

    @property
    def log2phy(self) -> torch.Tensor:
        return self.placement.log2phy

    @property
    def logcnt(self) -> torch.Tensor:
        return self.placement.logcnt

    def update_redundancy_mapping(
        self, workload: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-place the experts from historical loads (upstream semantics).

        For an ``r2o`` planner: EPLB without replication spreads the experts over the
        ranks, each rank's experts are sorted by load (hottest first), then each rank's
        hottest experts are copied to partner ranks per ``r2o``.  Without ``workload``
        the identity order is used.  For a general planner built from an EPLB config:
        EPLB is re-run with the configured slots.

        Args:
            workload: ``[L]`` non-negative loads (any device).

        Returns:
            ``(phy2log [P], log2phy [L, max_copies], logcnt [L])``, CPU int64.
        """
        L, R = self.n_logical_routed_experts, self.ep_size
        w = None if workload is None else check_loads(workload, L, "workload")
        if self.r2o is not None:
            order = None if w is None else expert_order_by_load(w, R)
            placement = ExpertPlacement.from_r2o(self.r2o, self.n_routed_experts, L, R, order)
        elif self._config is not None:
            placement = placement_from_config(self._config, L, R, w)
        else:
            if w is None:
                return self.phy2log, self.log2phy, self.logcnt
            phy2log, _, _ = rebalance_experts(w.unsqueeze(0), self.n_routed_experts, 1, 1, R)
            placement = ExpertPlacement.from_phy2log(phy2log[0], R, L)
        self._set_placement(placement)
        if self.r2o is not None:
            self._build_hot_index()
        return self.phy2log, self.log2phy, self.logcnt

    # ------------------------------------------------------------------ stages
    def count_workload(self, idx: torch.Tensor, n_sms: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Count this rank's tokens per logical expert.

        Args:
            idx: int32/int64 logical ids of any shape, ``-1`` = dropped.
            n_sms: chunks of the prefix sums (default: the GPU's SM count, 1 on CPU).

        Returns:
            ``(counts [L] int32, workload_by_sm [n_sms, L] int32)``: inclusive prefix
            sums of per-chunk histograms, as upstream.
        """
        check_topk_idx(idx, self.n_logical_routed_experts)
        if idx.is_cuda and kernels.get() is not None:
            return kernels.count_tokens(idx, self.n_logical_routed_experts, _n_sms(idx, n_sms))
        return count_tokens(idx, self.n_logical_routed_experts, _n_sms(idx, n_sms))

    def global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Sum per-rank counts over the EP group (``lplb.stats.comm``; no-op without a
        group or at size 1).  The first call checks, collectively, that every rank
        runs the same configuration (``lplb.stats.check_consistency``).

        Returns int32 ``[L]`` on ``counts``' device, identical on every rank.
        """
        return self.stats.reduce(counts)

    def global_counts_async(self, counts: torch.Tensor):
        """Start :meth:`global_counts`; returns a handle whose ``wait()`` gives the
        result, so the caller can overlap the reduction with other work."""
        return self.stats.reduce_async(counts)

    def init_from_deep_ep(self, buffer) -> str:
        """Take counts from a DeepEP V1 buffer (upstream's method).

        Upstream reduces the counts in-kernel through DeepEP's NVSHMEM runtime, which
        only its own C++ extension can reach.  Here the counts come from the buffer's
        ``get_dispatch_layout`` (the kernel a DeepEP job runs anyway) and are summed by
        ``lplb.stats.comm`` (torch.distributed; NVSHMEM would start a second runtime in
        the process, which DeepEP forbids).  Returns a one-line description of what
        is used; with ``lplb.stats.source: router`` the buffer is ignored (said so).

        Raises:
            LPLBConfigError: ``buffer`` is not a DeepEP V1 buffer, or DeepEP cannot be
                imported; the message says how to fall back to the router counts.
        """
        message = self.stats.attach_deep_ep(buffer)
        import logging

        logging.getLogger("lplb_plugin").info("lplb: %s", message)
        return message

    def plan(self, global_counts: torch.Tensor, device: torch.device | str | None = None) -> SplitPlan:
        """Solve the split for global per-expert counts.

        Args:
            global_counts: ``[L]`` tokens per logical expert summed over the EP group.
            device: where ``cum_frac`` should live (default: ``global_counts``').

        Returns:
            :class:`SplitPlan`.  Never raises on a hard batch: a solve that is not
            proven optimal falls back to the best valid split found (logged).
        """
        device = torch.device(device) if device is not None else global_counts.device
        loads = check_loads(global_counts, self.n_logical_routed_experts, "global_counts")
        if isinstance(global_counts, torch.Tensor) and global_counts.is_cuda and kernels.get() is not None:
            # the solve kernels; reading their answer back is this method's one sync
            t0 = time.perf_counter()
            split = self._solve_on_device(global_counts.detach())
            status = split.status.cpu()
            seconds = time.perf_counter() - t0
            optimal = bool(status.all())
            if not optimal and self._warn_on_fallback:
                _warn_fallback(self.solver, split)
            return SplitPlan(loads, split.x.cpu(), split.cum_frac.to(device), split.rank_loads.cpu(), optimal, seconds)
        t0 = time.perf_counter()
        result = solve_graph(self._graph, loads, self.solver, **self._solver_options)
        seconds = time.perf_counter() - t0
        x = self._graph.slot_split(loads, result.edge_flow)
        cum = copy_fractions(x, self.log2phy, self.logcnt).to(device)
        return SplitPlan(loads, x, cum, result.rank_loads, result.optimal, seconds)

    def redirect(self, idx: torch.Tensor, plan: SplitPlan) -> torch.Tensor:
        """Rewrite this rank's logical ids into physical ids realising ``plan``
        (same shape, dtype and device; ``-1`` kept).  On a GPU with the CUDA kernels
        the count + map kernels do it (bit-identical to the torch reference)."""
        return self._redirect(idx, plan, None)

    def _redirect(self, idx: torch.Tensor, plan: SplitPlan, counted) -> torch.Tensor:
        """:meth:`redirect`, reusing the CUDA count stage's ``(counts, prefix)`` of this
        ``idx`` when the caller already ran it."""
        cum = plan.cum_frac.to(idx.device)
        if idx.is_cuda and kernels.get() is not None:
            counts, prefix = counted or kernels.count_tokens(idx, self.n_logical_routed_experts, _n_sms(idx, None))
            return kernels.map_tokens(idx, prefix, counts, cum, self._log2phy_on(idx.device))
        return redirect(idx, cum, self._log2phy_on(idx.device), check=False)

    def run(self, idx: torch.Tensor, avail_counter: torch.Tensor | None = None, n_sms: int | None = None) -> torch.Tensor:
        """Count, all-reduce, solve and redirect.

        Args:
            idx: int32/int64 logical ids of any shape (CPU or CUDA), values in
                ``[-1, L)``.
            avail_counter: optional integer scalar tensor (int32, as upstream's kernel
                writes it; int64 is accepted too, unlike upstream whose README example
                passes int64 to an int32 kernel).  Incremented by the number of LP
                groups (connected components) solved to proven optimality.
            n_sms: accepted (and validated) for upstream compatibility; the torch
                path's rewrite does not depend on it.

        Counts come from ``lplb.stats.source`` (the router's ``idx``, or DeepEP after
        :meth:`init_from_deep_ep`) and are summed by ``lplb.stats.comm``.

        Returns:
            physical ids, same shape/dtype/device as ``idx``.
        """
        _check_counter(avail_counter)
        if idx.is_cuda and kernels.get() is not None:
            return self._run_cuda(idx, avail_counter, n_sms)
        check_topk_idx(idx, self.n_logical_routed_experts)
        if n_sms is not None:
            _n_sms(idx, n_sms)  # validated for compatibility; the rewrite does not use it
        local = self.stats.local_counts(idx)
        plan = self.plan(self.global_counts(local), device=idx.device)
        if avail_counter is not None and plan.optimal:
            avail_counter.add_(self.n_group)
        return self._redirect(idx, plan, None)

    def _run_cuda(self, idx: torch.Tensor, avail_counter, n_sms) -> torch.Tensor:
        """:meth:`run` with the CUDA kernels: no host sync, CUDA-graph capturable."""
        check_topk_idx_type(idx)
        if n_sms is not None:
            _n_sms(idx, n_sms)
        capturing = torch.cuda.is_current_stream_capturing()
        if not capturing:
            self._read_pending()
        L = self.n_logical_routed_experts
        # the kernels add the invalid ids (count) and the fallback components (solve)
        # to these running totals themselves: no extra kernels, no sync
        totals, pinned = self._check_buffers(idx.device)
        # one count kernel feeds the map, and the reduction unless DeepEP gives counts
        counts, prefix, _ = kernels.count_tokens_checked(idx, L, _n_sms(idx, None), totals)
        local = counts if self.stats.source.name == "router" else self.stats.local_counts(idx)
        split = self._solve_on_device(self.global_counts(local), totals)
        if avail_counter is not None:
            # upstream's semantics: + n_group when the batch was solved to optimality
            solved = (split.status.amin() > 0).to(avail_counter.dtype) * self.n_group
            avail_counter.add_(solved.view_as(avail_counter))
        # after_solve: the solve kernel (or the ordinary kernels of avail_counter, which
        # start after it ends) was the last launch, so idx, prefix and counts are complete
        out = kernels.map_tokens(idx, prefix, counts, split.cum_frac, self._log2phy_on(idx.device), after_solve=True)
        self._last_split = split
        if not capturing:  # (a graph's replays are read by check_last_run)
            pinned.copy_(totals, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (pinned, event)
        return out

    def _check_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        bufs = self._checks.get(device)
        if bufs is None:
            bufs = (torch.zeros(2, dtype=torch.int64, device=device), torch.zeros(2, dtype=torch.int64).pin_memory())
            self._checks[device] = bufs
        return bufs

    def _solve_on_device(self, global_counts: torch.Tensor, totals: torch.Tensor | None = None) -> "kernels.DeviceSplit":
        device = global_counts.device
        solver = self._device_solvers.get(device)
        if solver is None:
            solver = kernels.DeviceSolver(self._graph, self.log2phy, self.logcnt, device)
            self._device_solvers[device] = solver
        max_iters, tol = self._ipm_options
        return solver.solve(global_counts, self.solver, ipm_max_iters=max_iters, ipm_tol=tol, totals=totals)

    def _read_pending(self) -> None:
        """Act on the checks of earlier GPU :meth:`run` calls if their totals have
        reached the host (never waits)."""
        if self._pending is None:
            return
        pinned, event = self._pending
        if not event.query():
            return
        self._pending = None
        self._act_on(pinned.tolist())

    def _act_on(self, totals: list[int]) -> None:
        n_bad, n_fallback = totals[0] - self._seen[0], totals[1] - self._seen[1]
        self._seen = list(totals)
        if n_bad:
            raise LPLBInputError(
                f"idx values must lie in [-1, {self.n_logical_routed_experts}) (-1 = dropped): {n_bad} entries of "
                f"a previous Planner.run batch were outside that range and were mapped to -1"
            )
        if n_fallback and self._warn_on_fallback:
            _warn_fallback(self.solver, None, n_fallback, None)

    def check_last_run(self) -> "kernels.DeviceSplit | None":
        """Wait for the GPU :meth:`run` calls so far (eager or CUDA-graph replays) and act
        on the checks not yet acted on: raise :class:`LPLBInputError` if an ``idx`` had
        values outside ``[-1, L)``, warn if a component's split was a fallback.  Returns
        the last run's :class:`~lplb_plugin.kernels.DeviceSplit` (``None`` before any GPU
        run).  One host sync; :meth:`run` itself never syncs and acts on these checks
        as soon as they reach the host (at a later call)."""
        if self._last_split is None:
            return None
        device = self._last_split.status.device
        totals, _ = self._check_buffers(device)
        torch.cuda.current_stream(device).synchronize()
        self._pending = None
        self._act_on(totals.tolist())
        return self._last_split

    # ------------------------------------------------------------------ upstream r2o stages
    def solve_probs(self, workload: torch.Tensor, avail_counter: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's solve stage.

        Args:
            workload: ``[L]`` this rank's counts (from :meth:`count_workload`); summed
                over ``group`` here.
            avail_counter: see :meth:`run`.

        Returns:
            ``(o_weight [n_group, group_size, n_redundant] float32, global_workload [L])``.
            ``o_weight[grp, g, d]`` is the share of the tokens of rank ``g``'s column-``d``
            hot experts that stays on the originals (token-weighted over the
            ``combined_redundant_experts`` of them; our solve splits each expert
            separately, which :meth:`run` uses directly).  Upstream falls back to 0.5
            when its solve fails; here a failed certificate still yields the best valid
            split found, never a blind 0.5.
        """
        self._require_r2o("solve_probs")
        _check_counter(avail_counter)
        global_workload = self.global_counts(workload)
        plan = self.plan(global_workload)
        if avail_counter is not None and plan.optimal:
            avail_counter.add_(self.n_group)
        x = plan.x
        stay = x[self._hot_orig_slot].sum(-1)
        total = stay + x[self._hot_copy_slot].sum(-1)
        o_weight = torch.where(total > 0, stay / total.clamp_min(1e-300), torch.full_like(total, 0.5))
        return o_weight.to(torch.float32).to(workload.device), global_workload

    def weighted_select_target(
        self,
        idx: torch.Tensor,
        o_weight: torch.Tensor,
        workload_by_sm: torch.Tensor | None = None,
        n_sms: int | None = None,
    ) -> torch.Tensor:
        """Upstream's map stage: rank ``g``'s column-``d`` hot experts keep
        ``o_weight[grp, g, d]`` of their tokens, the rest go to their copies.

        ``workload_by_sm`` / ``n_sms`` are accepted for compatibility; the rewrite's
        sequence numbers are defined over the whole flattened ``idx`` (deterministic,
        see :mod:`lplb_plugin.redirect`), which is what those prefix sums encode.
        """
        self._require_r2o("weighted_select_target")
        check_topk_idx(idx, self.n_logical_routed_experts)
        expected = (self.n_group, self.group_size, self.num_redundants)
        if tuple(o_weight.shape) != expected:
            raise LPLBInputError(f"o_weight must have shape {expected}, got {tuple(o_weight.shape)}")
        w = o_weight.detach().to("cpu", torch.float64).clamp(0.0, 1.0)
        C = self.log2phy.shape[1]
        cum = torch.ones(self.n_logical_routed_experts, C, dtype=torch.float64)
        hot = self._hot_experts  # [n_group, group_size, n_red, combined]
        cum[hot.reshape(-1), 0] = w.unsqueeze(-1).expand_as(hot).reshape(-1)
        return redirect(idx, cum.to(idx.device), self._log2phy_on(idx.device), check=False)

    # ------------------------------------------------------------------ helpers
    def _require_r2o(self, name: str) -> None:
        if self.r2o is None:
            raise LPLBInputError(
                f"Planner.{name} needs an r2o planner (upstream's constructor); this planner was "
                f"built from a general placement: use plan() and redirect(), or run()"
            )

    def _build_hot_index(self) -> None:
        """Slots of rank g's column-d hot experts and of their copies:
        ``[n_group, group_size, n_red, combined]``."""
        gs, n_red, comb = self.group_size, self.num_redundants, self.combined_redundant_experts
        nlp, nll = self.n_local_routed_experts, self.n_local_logical_routed_experts
        grp = torch.arange(self.n_group).view(-1, 1, 1, 1)
        g = torch.arange(gs).view(1, -1, 1, 1)
        d = torch.arange(n_red).view(1, 1, -1, 1)
        c = torch.arange(comb).view(1, 1, 1, -1)
        inverse = torch.argsort(self.r2o, dim=0)  # inverse[g, d] = h with r2o[h, d] == g
        h = inverse[g.squeeze(-1).squeeze(-1), :].view(1, gs, n_red, 1)
        self._hot_orig_slot = ((grp * gs + g) * nlp + c * n_red + d).expand(self.n_group, gs, n_red, comb)
        self._hot_copy_slot = ((grp * gs + h) * nlp + nll + c * n_red + d).expand(self.n_group, gs, n_red, comb)
        self._hot_experts = self.phy2log[self._hot_orig_slot]

    def _log2phy_on(self, device: torch.device) -> torch.Tensor:
        table = self._device_tables.get(device)
        if table is None:
            table = self.log2phy.to(device)
            self._device_tables[device] = table
        return table

    def __repr__(self) -> str:
        kind = f"r2o {tuple(self.r2o.shape)}" if self.r2o is not None else "placement"
        return (
            f"Planner({kind}, n_logical={self.n_logical_routed_experts}, n_physical={self.n_routed_experts}, "
            f"ep_size={self.ep_size}, n_group={self.n_group}, solver={self.solver!r})"
        )


def expert_order_by_load(workload: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """EPLB without replication spreads experts over ranks; each rank's experts are
    then sorted hottest first.  Returns the ``[L]`` order for
    :meth:`ExpertPlacement.from_r2o`."""
    L = workload.numel()
    phy2log, _, _ = rebalance_experts(workload.view(1, -1), L, 1, 1, n_ranks)
    per_rank = phy2log[0].view(n_ranks, L // n_ranks)
    hot_first = torch.argsort(-workload[per_rank], dim=1, stable=True)
    return torch.gather(per_rank, 1, hot_first).reshape(-1)


def placement_from_config(
    config: LPLBConfig, n_logical: int, ep_size: int, workload: torch.Tensor | None = None
) -> ExpertPlacement:
    """Build the placement a config describes for one layer.

    ``lplb.lp.scope`` decides where copies may go: ``node`` keeps every expert's copies
    inside one of ``placement.num_nodes`` nodes (EPLB's hierarchical policy; topology
    groups inside a node), ``global`` lets them cross nodes (EPLB's global policy).

    Args:
        config: the ``lplb`` block.
        n_logical: logical experts; ep_size: EP ranks.
        workload: ``[L]`` historical loads; default: the config's
            ``placement.workload`` file summed over its layers, else none (identity
            order for topologies, uniform loads for EPLB).
    """
    pc = config.placement
    config.validate_for(n_logical, ep_size)
    n_physical = n_logical + ep_size * pc.redundant_per_rank
    if workload is None and pc.workload is not None:
        from .data import load_profile

        profile = load_profile(pc.workload)
        if profile.shape[1] != n_logical:
            raise LPLBInputError(
                f"lplb.placement.workload={pc.workload!r} has {profile.shape[1]} experts per layer, "
                f"the model has {n_logical}"
            )
        workload = profile.sum(0)
    if workload is not None:
        workload = check_loads(workload, n_logical, "workload")
    if pc.policy == "topology":
        r2o = by_name(pc.topology, list(pc.topology_shape) if pc.topology_shape else None)
        order = None if workload is None else expert_order_by_load(workload, ep_size)
        return ExpertPlacement.from_r2o(r2o, n_physical, n_logical, ep_size, order)
    weight = torch.ones(n_logical, dtype=torch.float64) if workload is None else workload
    groups, nodes = eplb_groups_and_nodes(config, n_logical)
    phy2log, _, _ = rebalance_experts(weight.unsqueeze(0), n_physical, groups, nodes, ep_size)
    return ExpertPlacement.from_phy2log(phy2log[0], ep_size, n_logical)


def eplb_groups_and_nodes(config: LPLBConfig, n_logical: int) -> tuple[int, int]:
    """``(num_groups, num_nodes)`` to pass to EPLB for ``lplb.lp.scope``.

    ``global``: EPLB's global policy (replicas anywhere).  ``node``: its hierarchical
    policy, whose replicas stay inside a node; when the routing groups cannot be
    spread over the nodes (``num_groups % num_nodes != 0``) every expert is its own
    group for placement, so nodes still get balanced loads.
    """
    pc = config.placement
    if config.lp.scope == "global" or pc.num_nodes == 1:
        return (1, 1) if config.lp.scope == "global" else (pc.num_groups, 1)
    groups = pc.num_groups if pc.num_groups % pc.num_nodes == 0 else n_logical
    return groups, pc.num_nodes


def _warn_fallback(method: str, split, n_fallback: int | None = None, n_comp: int | None = None) -> None:
    if split is not None:
        status = split.status.cpu()
        n_fallback, n_comp = int((status == 0).sum()), int(status.numel())
    where = f"in {n_fallback} of {n_comp} connected components" if n_comp else f"in {n_fallback} component solves"
    logging.getLogger("lplb_plugin").warning(
        "lplb: %s split not %s %s; used the best valid split found",
        method, "proven optimal" if method == "exact" else "converged", where,
    )


def _group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _resolve_ep_size(ep_size: int | None, group) -> int:
    if ep_size is None:
        if group is None:
            raise LPLBInputError("ep_size is required when group is None")
        return _group_size(group)
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise LPLBInputError(f"ep_size must be an integer >= 1, got {ep_size!r}")
    if group is not None and _group_size(group) != ep_size:
        raise LPLBInputError(f"ep_size={ep_size} does not match group.size()={_group_size(group)}")
    return ep_size


def _n_sms(idx: torch.Tensor, n_sms: int | None) -> int:
    if n_sms is not None:
        if not isinstance(n_sms, int) or isinstance(n_sms, bool) or n_sms < 1:
            raise LPLBInputError(f"n_sms must be an integer >= 1, got {n_sms!r}")
        return n_sms
    if idx.is_cuda:
        return torch.cuda.get_device_properties(idx.device).multi_processor_count
    return 1


def _check_counter(avail_counter) -> None:
    if avail_counter is None:
        return
    if (
        not isinstance(avail_counter, torch.Tensor)
        or avail_counter.dtype not in (torch.int32, torch.int64)
        or avail_counter.numel() != 1
    ):
        got = (
            f"{avail_counter.dtype} tensor of shape {tuple(avail_counter.shape)}"
            if isinstance(avail_counter, torch.Tensor) else type(avail_counter).__name__
        )
        raise LPLBInputError(f"avail_counter must be an int32 (or int64) scalar tensor, got {got}")

