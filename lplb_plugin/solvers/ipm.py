r"""Primal-dual interior-point solver (Mehrotra predictor-corrector) for the split LP,
batched over the connected components of the replica graph in plain torch ops.

This is the reference the CUDA IPM kernel is checked against, so the algorithm is
spelled out here exactly.

Problem (DESIGN.md §3), one per connected component ``b`` of the replica graph
-----------------------------------------------------------------------------
Ranks in different components share no movable expert, so each component is an
independent LP, solved to its *own* optimum (every component gets balanced, not just
the worst one).  Per component, with ``M`` movable experts, ``R`` ranks and the edge set
``E`` (expert ``m`` has a copy on rank ``r``), loads divided by the component's scale
``scale_b = (sum f + sum c) / R`` (the mean rank load, so ``1 <= T* <= R``; a component
with zero total load is trivially solved by the zero flow)::

    minimise    T
    subject to  sum_{r:(m,r) in E} y_mr             = c_m     (m = 1..M)   dual lambda_m
                T - sum_{m:(m,r) in E} y_mr - s_r   = f_r     (r = 1..R)   dual w_r
                y >= 0,  s >= 0,  T free.

Dual (``z`` are the dual slacks of ``y`` and ``s``)::

    maximise    c . lambda + f . w
    subject to  z_mr = w_r - lambda_m >= 0,  z_s = w >= 0,  sum_r w_r = 1

(``w`` is a probability vector over the ranks, ``lambda_m = min_{r ~ m} w_r``.)

Variables and batching
----------------------
Components are padded to ``Mmax`` experts and ``Rmax`` ranks and stacked into a batch
``[B, ...]`` (components without edges need no solve and are left out).  An expert and
a rank share at most one edge (copies on the same rank are merged by
:class:`~lplb_plugin.problem.SplitGraph`), so the edge variables live in dense
``[B, Mmax, Rmax]`` tensors under an edge mask.  The rank slacks are stored as one more
row of that tensor: ``X [B, Mmax+1, Rmax]`` holds ``y`` (rows ``< Mmax``) and ``s``
(row ``Mmax``), ``Z`` the matching ``z_y`` / ``z_s``; the slack row acts as an expert
whose ``lambda`` is pinned to 0, since ``z_s = w - 0`` has the form of
``z_y = w - lambda``.  Off-edge and padded entries hold ``X = 0, Z = 1``; every
residual and direction is masked, so padding never moves.  Iterate:
``(X, T; lambda, w; Z)``.

Starting point (a structured Mehrotra heuristic)
------------------------------------------------
Primal: the even split ``y_mr = c_m / deg_m``, ``T = max_r load_r`` of that split,
``s_r = T - load_r`` (primal feasible, on the boundary).  Dual: ``w = 1/R``,
``lambda = 0``, ``z_y = 1/R``, ``z_s = 1/R`` (dual feasible).  Then Mehrotra's
centring shift: with ``xz = y.z_y + s.z_s``,
``dx = max(0.5 xz / sum z, 0.1)`` is added to every ``y`` and ``s`` and
``dz = max(0.5 xz / sum x, 0.1 / R)`` to every ``z_y`` and ``z_s`` (``w`` and
``lambda`` unchanged).  The floors keep a perfectly balanced start interior.

Newton system and its reduction (why a system over ranks)
---------------------------------------------------------
With ``d = y / z_y`` (edges) and ``d_s = s / z_s`` (ranks), eliminating ``dy``, ``ds``
and the ``dz`` leaves the normal equations in ``(d lambda, d w, dT)``::

    a * dlam - K dw                = h_m       a_m = sum_r d_mr   (K = d as [M, R])
    dT * 1 - K^T dlam + q * dw     = h_r       q_r = sum_m d_mr + d_s,r
    1^T dw                         = r_T

The expert block is diagonal, so ``dlam = (h_m + K dw) / a`` and what is left is the
rank-side Schur complement ``S = diag(q) - K^T diag(1/a) K`` (``R x R``) bordered by
the free variable ``T``.  We keep the rank side because (1) for two-copy placements a
connected component of ``R`` ranks needs ``M >= R - 1`` movable experts, and upstream's
topologies have ``M = n_redundant * combined * R >= R`` (cube EP32: 16 experts, 8 ranks
per component), so ``R <= M + 1`` and the Cholesky is the smaller one; (2) ``T``'s
border is the all-ones vector there, which the trick below handles exactly.  (EPLB
placements giving one hot expert many copies can make ``M < R``; those components are
still at most ``R <= 64`` and cheap.)

``S`` is a weighted graph Laplacian plus ``diag(d_s)`` (its row sums are ``d_s``), so
it is assembled without cancellation: off-diagonal ``-sum_m d_mr d_mr' / a_m``,
diagonal ``d_s,r + sum_m d_mr * (a_m - d_mr) / a_m`` where ``a_m - d_mr`` (the other
edges of ``m``) comes from exclusive prefix + suffix sums, never from a subtraction.
When every rank is tight (``d_s -> 0``, the usual case at a balanced optimum) ``S`` is
nearly singular along the ones vector, which is exactly the direction the ``T`` border
pins; we solve with ``S~ = S + nu 1 1^T`` (``nu`` = mean diagonal / R), an equivalent
system: ``S~ dw + dT' 1 = g, 1^T dw = r_T`` gives ``dT = dT' + nu r_T``.  With two
Cholesky solves ``u1 = S~^-1 g``, ``u2 = S~^-1 1``::

    dT' = (1.u1 - r_T) / (1.u2),   dw = u1 - dT' u2,   dT = dT' + nu r_T.

``S~`` is factored once per iteration (``torch.linalg.cholesky_ex``) and reused for the
predictor and the corrector.  If a factorisation fails (reported by the same host sync
as the stop test, see below), ``1e-12 * max diag`` (then x100 until it succeeds, at
most 4 times) is added to the diagonal of the failed components.

Predictor-corrector step
------------------------
``mu = X.Z / n`` (``n`` = edges + ranks of the component).  Affine direction with
complementarity right-hand side ``-x z``; its step lengths ``alpha_aff`` (to the
boundary, at most 1) give ``mu_aff``; ``sigma = (mu_aff/mu)^3`` (clamped to [0, 1]);
the corrector solves with ``sigma mu - x z - dx_aff dz_aff``.  Step lengths: primal
``alpha_p = min(1, eta * max{a : X + a dX >= 0})`` over ALL edge and slack variables,
dual ``alpha_d`` likewise over ALL of ``Z``, with the fraction to the boundary
``eta = clamp(1 - mu, 0.995, 1 - 100 eps)`` (0.995 far from the optimum, tending to 1
near it, which turns the final linear rate of a fixed 0.995 into a superlinear one;
the upper cap keeps rounding from landing exactly on the boundary).
``(X, T)`` move by ``alpha_p``, ``(lambda, w, Z)`` by ``alpha_d``.  A component that
has converged, produced a non-finite direction, or gone ``5`` iterations without a
better iterate (see below) gets ``alpha = 0``: frozen.

Stop test (per component, in scaled units)
------------------------------------------
``gap = |T - (c.lambda + f.w)| / (1 + |T|)``,
``pinf = max|primal residual| / (1 + max(c, f))``,
``dinf = max|dual residual| / (1 + 1)`` (the cost vector's max-norm is 1);
``merit = max(gap, pinf, dinf)``.  The iterate with the lowest merit seen so far is
what is returned (in float64 it is the last one; in float32 the iteration can lose
accuracy once ``mu`` is below what the arithmetic resolves, and this keeps the best
point).  A component has converged when its current iterate is that best one and

1. ``merit <= 0.1 * tol``: the returned split's max load exceeds the optimum by up to
   about ``(1 + 1/T) gap`` plus the primal residual (``T >= 1`` scaled), so the factor
   0.1 keeps the *returned objective* within ``tol`` relative of the optimum (a
   heuristic margin, not a proof); or
2. ``0.1 * tol < merit <= 10 * tol`` (``_BOUND_GATE``) and the split it would return
   is *provably* within ``tol``: with ``y`` that split (the finalisation below, in
   scaled units: clamp at 0, rescale each expert to ``c_m``, the even split over its
   slots where its flow vanished), ``U = max_r (f_r + sum_m y_mr)`` and, for
   ``w+ = max(w, 0)`` with ``sum w+ > 0``,
   ``LB = (f.w+ + sum_m c_m min_{r ~ m} w+_r) / sum w+``: ``U - LB <= tol * LB``.
   ``LB <= T*`` for any non-negative ``w`` (weak duality: every split has
   ``max_r load_r >= sum_r w+_r load_r / sum w+``, and each expert's demand is
   weighted at least by its cheapest rank's ``w+``), so ``U <= (1 + tol) T*``.  The
   bound is only formed in that window, which keeps its cost to the last iterations
   (below it test 1 decides anyway).  It stops an iteration earlier
   where the merit lags behind the split's real quality (on the test instances about
   a third of the solves at ``tol = 1e-5``; the other two thirds take the same
   iterations as test 1 alone).

The loop stops when no component is still active or after ``max_iters`` iterations;
``converged`` is True when every component met the test.  The only host sync per
iteration on CUDA is one ``tolist()`` reading (any component active, any factorisation
failed); the kernel version keeps this on the device.  On the CPU the bound's gating
is read on the host too (free there), so the bound's tensor ops run only on
iterations where some component is in the window.

Threads
-------
On the CPU the solve runs with ``torch.set_num_threads(1)`` (restored afterwards): the
systems are tiny, and a second OpenMP thread on a busy 2-core machine turned a 4 us
batched ``bmm`` into 8 ms.

Result
------
The scaled ``y`` is multiplied back by ``scale_b``, clamped at 0 and rescaled per
expert so each expert's edges sum exactly to its demand (zero-demand experts get 0;
an expert whose flow vanished numerically gets the even split).  ``objective`` is the
maximum rank load of that returned flow.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch

from ..problem import SplitGraph

__all__ = ["IPMResult", "solve_ipm", "ComponentBatch", "component_batch", "finalize_flow", "cpu_single_thread"]

_ETA = 0.995  # fraction to the boundary (lower bound; it tends to 1 as mu -> 0)
_SAFETY = 0.1  # the stop test runs at _SAFETY * tol (see the module docstring)
# the returned split's bound test runs when the merit is within _BOUND_GATE * tol (and
# above _SAFETY * tol, where the merit test alone decides); 0 disables it
_BOUND_GATE = 10.0
_STALL = 5  # a component stops after this many iterations without a better iterate


@dataclass
class IPMResult:
    """Outcome of :func:`solve_ipm`.

    Attributes:
        edge_flow: float64 ``[E]`` on the CPU, a valid split (non-negative, each
            movable expert's edges sum to its demand).
        objective: maximum rank load of ``edge_flow`` (original units).
        gap: final relative duality gap, max over components (scaled units).
        iterations: IPM iterations run.
        converged: every component met the stop test.
    """

    edge_flow: torch.Tensor
    objective: float
    gap: float
    iterations: int
    converged: bool


# ----------------------------------------------------------------------------- batching
@dataclass(frozen=True, eq=False)
class ComponentBatch:
    """Padded per-component layout of a :class:`SplitGraph` (static, cached per graph
    and device).

    Attributes:
        n_comp: ``B``, number of components that have at least one edge.
        labels: ``[B]`` component labels (``graph.component`` values), ascending.
        rank_index: ``[B, Rmax]`` global rank of each local rank (0 where padded).
        rank_mask: ``[B, Rmax]`` bool.
        expert_index: ``[B, Mmax]`` movable-expert index of each local expert.
        expert_mask: ``[B, Mmax]`` bool.
        edge_mask: ``[B, Mmax, Rmax]`` bool.
        edge_pos: ``[E]`` flat index of each graph edge in ``[B, Mmax, Rmax]``.
        edge_mult: ``[B, Mmax, Rmax]`` float64 slots of each edge (0 off the edges): the
            even split of the finalisation, which the stop test's bound replays.
        n_ranks: ``[B]`` float, ranks per component.
        slot_rank, slot_log, slot_fixed_w: per-slot data to compute fixed rank loads on
            the batch's device (``fixed = index_add(slot_rank, loads[slot_log] * w)``).
        movable: ``[M]`` logical ids of movable experts.
    """

    n_comp: int
    labels: torch.Tensor
    rank_index: torch.Tensor
    rank_mask: torch.Tensor
    expert_index: torch.Tensor
    expert_mask: torch.Tensor
    edge_mask: torch.Tensor
    edge_pos: torch.Tensor
    edge_mult: torch.Tensor
    n_ranks: torch.Tensor
    slot_rank: torch.Tensor
    slot_log: torch.Tensor
    slot_fixed_w: torch.Tensor
    movable: torch.Tensor
    n_ranks_total: int
    _constants: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.edge_mask.shape)  # type: ignore[return-value]

    def constants(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Masks of the merged ``[B, Mmax+1, Rmax]`` layout (edges + slack row) in
        ``dtype``, cached: ``(em, off, rm, rpad, xm, xpad, ones_r, rr_outer, n_var,
        n_ranks)``."""
        got = self._constants.get(dtype)
        if got is None:
            rm = self.rank_mask.to(dtype)
            em = torch.cat([self.edge_mask.to(dtype), rm.unsqueeze(1)], 1)
            xm = torch.cat([self.expert_mask.to(dtype), torch.zeros_like(rm[:, :1])], 1)
            got = (em, 1.0 - em, rm, 1.0 - rm, xm, 1.0 - xm, rm.unsqueeze(2),
                   rm.unsqueeze(2) * rm.unsqueeze(1), em.sum((1, 2)), self.n_ranks.to(dtype))
            self._constants[dtype] = got
        return got

    def batch_loads(self, loads: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f [B, Rmax], c [B, Mmax])`` in ``dtype`` on the batch's device, zero where
        padded."""
        dev = self.rank_index.device
        loads = loads.to(dev, torch.float64)
        fixed = torch.zeros(self.n_ranks_total, dtype=torch.float64, device=dev).index_add_(
            0, self.slot_rank, loads[self.slot_log] * self.slot_fixed_w
        )
        f = torch.where(self.rank_mask, fixed[self.rank_index], 0.0)
        c = torch.where(self.expert_mask, loads[self.movable][self.expert_index], 0.0)
        return f.to(dtype), c.to(dtype)


_CACHE: "weakref.WeakKeyDictionary[SplitGraph, dict]" = weakref.WeakKeyDictionary()


def component_batch(graph: SplitGraph, device: torch.device | str | None = None) -> ComponentBatch:
    """Build (or fetch from the cache) the padded component layout of ``graph``."""
    device = torch.device(device if device is not None else "cpu")
    per_graph = _CACHE.setdefault(graph, {})
    key = str(device)
    if key not in per_graph:
        per_graph[key] = _build_batch(graph, device)
    return per_graph[key]


def _local_index(group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each item inside its group (items in index order) and group sizes."""
    order = torch.argsort(group * (group.numel() + 1) + torch.arange(group.numel()))
    sizes = torch.bincount(group, minlength=n_groups)
    start = torch.zeros(n_groups, dtype=torch.int64)
    start[1:] = torch.cumsum(sizes, 0)[:-1]
    local = torch.empty_like(group)
    local[order] = torch.arange(group.numel()) - start[group[order]]
    return local, sizes


def _build_batch(graph: SplitGraph, device: torch.device) -> ComponentBatch:
    R = graph.n_ranks
    comp = graph.component
    labels = torch.unique(comp[graph.edge_rank]) if graph.n_edges else torch.zeros(0, dtype=torch.int64)
    B = labels.numel()
    comp_to_b = torch.full((R,), -1, dtype=torch.int64)
    comp_to_b[labels] = torch.arange(B)
    rank_b = comp_to_b[comp]
    in_batch = rank_b >= 0
    ranks = torch.nonzero(in_batch).flatten()
    rank_local, rank_sizes = _local_index(rank_b[ranks], B)
    Rmax = int(rank_sizes.max()) if B else 1
    M = graph.n_movable
    exp_b = rank_b[graph.edge_rank[graph.expert_edge_ptr[:-1]]] if M else torch.zeros(0, dtype=torch.int64)
    exp_local, exp_sizes = _local_index(exp_b, B)
    Mmax = int(exp_sizes.max()) if B else 1

    rank_index = torch.zeros(B, Rmax, dtype=torch.int64)
    rank_mask = torch.zeros(B, Rmax, dtype=torch.bool)
    rank_index[rank_b[ranks], rank_local] = ranks
    rank_mask[rank_b[ranks], rank_local] = True
    expert_index = torch.zeros(B, Mmax, dtype=torch.int64)
    expert_mask = torch.zeros(B, Mmax, dtype=torch.bool)
    expert_index[exp_b, exp_local] = torch.arange(M)
    expert_mask[exp_b, exp_local] = True
    local_of_rank = torch.zeros(R, dtype=torch.int64)
    local_of_rank[ranks] = rank_local
    eb = exp_b[graph.edge_expert]
    edge_pos = (eb * Mmax + exp_local[graph.edge_expert]) * Rmax + local_of_rank[graph.edge_rank]
    edge_mask = torch.zeros(B * Mmax * Rmax, dtype=torch.bool)
    edge_mask[edge_pos] = True
    edge_mult = torch.zeros(B * Mmax * Rmax, dtype=torch.float64)
    edge_mult[edge_pos] = graph.edge_mult.to(torch.float64)
    if edge_mask.sum() != graph.n_edges:  # pragma: no cover - SplitGraph merges (m, r) pairs
        raise ValueError("SplitGraph has duplicate (expert, rank) edges")
    fixed_w = torch.where(graph.slot_edge < 0, 1.0 / graph.log_slots_on_rank.to(torch.float64), 0.0)
    to = dict(device=device)
    return ComponentBatch(
        n_comp=B,
        labels=labels.to(**to),
        rank_index=rank_index.to(**to),
        rank_mask=rank_mask.to(**to),
        expert_index=expert_index.to(**to),
        expert_mask=expert_mask.to(**to),
        edge_mask=edge_mask.view(B, Mmax, Rmax).to(**to),
        edge_pos=edge_pos.to(**to),
        edge_mult=edge_mult.view(B, Mmax, Rmax).to(**to),
        n_ranks=rank_sizes.to(device=device, dtype=torch.float64),
        slot_rank=graph.slot_rank.to(**to),
        slot_log=graph.phy2log.to(**to),
        slot_fixed_w=fixed_w.to(**to),
        movable=graph.movable.to(**to),
        n_ranks_total=R,
    )


def finalize_flow(graph: SplitGraph, flow: torch.Tensor, demand: torch.Tensor) -> torch.Tensor:
    """Turn an approximate edge flow into a valid split: non-finite and negative entries
    become 0, each expert's edges are rescaled to sum to its demand exactly; experts
    with zero demand get 0, experts whose flow vanished get the even split over their
    copies (slots).  All float64 CPU."""
    flow = _clean(flow.to("cpu", torch.float64))
    demand = demand.to("cpu", torch.float64)
    M = graph.n_movable
    ee = graph.edge_expert
    tot = torch.zeros(M, dtype=torch.float64).index_add_(0, ee, flow)
    mult = graph.edge_mult.to(torch.float64)
    copies = torch.zeros(M, dtype=torch.float64).index_add_(0, ee, mult)
    return _rescale(flow, mult, demand[ee], tot[ee], copies[ee])


def _clean(flow: torch.Tensor) -> torch.Tensor:
    """The finalisation's first step: non-finite and negative entries become 0."""
    return torch.where(torch.isfinite(flow), flow, 0.0).clamp_min(0.0)


def _rescale(flow, mult, demand, tot, copies) -> torch.Tensor:
    """The finalisation's second step, per edge (every argument broadcast to the
    edges): each expert's edges rescaled to its ``demand`` from their sum ``tot``; the
    even split over its ``copies`` slots where the flow vanished; 0 at zero demand.
    Shared by :func:`finalize_flow` and the stop test's bound (:func:`_split_bound`),
    so that the bound is about exactly the split that would be returned."""
    ok = tot > 0
    scaled = flow * torch.where(ok, demand / torch.where(ok, tot, 1.0), 0.0)
    even = demand * mult / torch.where(copies > 0, copies, 1.0)
    return torch.where(demand > 0, torch.where(ok, scaled, even), 0.0)


# ----------------------------------------------------------------------------- solver
def _step_to_boundary(x: torch.Tensor, dx: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """``min(1, eta * max{a : x + a dx >= 0})`` over all entries of each batch entry
    (``x > 0`` wherever ``dx`` can be non-zero; padding has ``dx = 0``)."""
    r = -(dx / x).flatten(1).amin(1)  # largest relative decrease
    return eta / torch.maximum(r, eta)


def _split_bound(y, w, f, c, em, rm, xm, mult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per component ``(U, LB, sum w+)`` for the stop test's bound (scaled units).
    ``y [B, Mmax, Rmax]`` (edge rows only), ``c``, ``em``, ``xm``, ``mult`` likewise
    without the slack row; ``w``, ``f``, ``rm`` ``[B, Rmax]``.

    ``U`` is the max rank load of the split :func:`finalize_flow` would make of ``y``
    (same steps, scaled: clamp at 0, rescale each expert to its demand, the even split
    over its slots where its flow vanished); ``LB`` the weak-duality bound of
    ``w+ = max(w, 0)``: for any split, ``max_r load_r >= sum_r w+_r load_r / sum w+``,
    and ``sum_r w+_r load_r >= f.w+ + sum_m c_m min_{r ~ m} w+_r``, so ``LB <= T*``
    whenever ``sum w+ > 0``; then ``U - LB <= tol LB`` puts ``U`` within ``tol`` of
    the optimum."""
    y = _clean(y)
    y = _rescale(y, mult, c.unsqueeze(2), y.sum(2, keepdim=True), mult.sum(2, keepdim=True))
    U = torch.where(rm > 0, f + y.sum(1), -torch.inf).amax(1)
    wp = (w * rm).clamp_min(0.0)  # (NaN stays NaN: no bound then)
    wmin = torch.where(em > 0, wp.unsqueeze(1), torch.inf).amin(2)
    wmin = torch.where(xm > 0, wmin, 0.0)
    sw = wp.sum(1)
    lb = ((f * wp).sum(1) + (c * wmin).sum(1)) / torch.where(sw > 0, sw, 1.0)
    return U, lb, sw


def _ipm_core(f, c, bt: ComponentBatch, max_iters: int, tol: float, done: torch.Tensor):
    """Batched Mehrotra IPM on the scaled components.

    Edge variables and rank slacks share one tensor ``X [B, Mmax+1, Rmax]``: rows
    ``0..Mmax-1`` are the edges ``y[m, r]``, row ``Mmax`` the slacks ``s[r]``, so the
    slack row behaves like an "expert" whose dual ``lambda`` is pinned to 0 (its dual
    constraint ``w_r - z_s,r = 0`` has the same form ``w_r - lambda - z = 0``).  ``Z``
    holds the matching dual slacks.  Off-edge / padded entries: ``X = 0``, ``Z = 1``.
    Expert-indexed vectors (``lam``, ``c``, residuals) have ``Mmax + 1`` entries, the
    last one (the slack row) held at 0 by the mask ``xm``.

    Returns ``(y [B, Mmax, Rmax], gap [B], converged [B], iterations)`` (scaled units).
    """
    B, Mx, Rx = bt.shape
    dt = f.dtype
    em, off, rm_, rpad, xm, xpad, ones_r, rr_outer, n_var, nR = bt.constants(dt)
    c = torch.cat([c, torch.zeros_like(c[:, :1])], 1)  # [B, Mx+1]
    cnorm = 1.0 + torch.maximum(c.amax(1), f.amax(1))

    # ---- starting point: even split, T = its max load, uniform duals, Mehrotra shift
    deg = em.sum(2).clamp_min(1.0)
    X = em * (c / deg).unsqueeze(2)  # even split on edge rows, 0 in the slack row
    load = f + X.sum(1)
    T = torch.where(rm_ > 0, load, -torch.inf).amax(1)
    X[:, Mx] = (T.unsqueeze(1) - load) * rm_
    w = rm_ / nR.unsqueeze(1)
    lam = torch.zeros_like(c)
    Z = em * w.unsqueeze(1)
    xz = (X * Z).sum((1, 2))
    dx0 = torch.clamp_min(0.5 * xz / Z.sum((1, 2)), 0.1)
    dz0 = torch.maximum(0.5 * xz / X.sum((1, 2)).clamp_min(1e-300), 0.1 / nR)
    X = em * (X + dx0.view(B, 1, 1))
    Z = em * (Z + dz0.view(B, 1, 1)) + off

    converged = done.clone()
    active = ~converged
    gap = torch.zeros(B, dtype=dt, device=f.device)
    best_merit = torch.full((B,), torch.inf, dtype=dt, device=f.device)
    best_y = X
    stall = torch.zeros(B, dtype=torch.int32, device=f.device)

    def residuals(X, T, lam, w, Z):
        rp_m = (c - X.sum(2)) * xm
        rp_r = (f - T.unsqueeze(1) + X.sum(1)) * rm_
        rd = (w.unsqueeze(1) - lam.unsqueeze(2) - Z) * em
        rT = 1.0 - w.sum(1)
        return rp_m, rp_r, rd, rT

    def factor(X, Z):
        D = X / Z  # 0 off the edges and on padded ranks
        d = D[:, :Mx]
        a = D.sum(2) * xm + xpad  # [B, Mx+1]; 1 on the slack row and padded experts
        da = D * xm.unsqueeze(2) / a.unsqueeze(2)
        S = -(d.transpose(1, 2) @ da[:, :Mx])
        # diagonal without cancellation: d_s + sum_m d_mr (a_m - d_mr) / a_m
        diag = D[:, Mx] + (da[:, :Mx] * _exclusive_sum(d)).sum(1) + rpad
        S.diagonal(dim1=1, dim2=2).copy_(diag)
        nu = (diag * rm_).sum(1) / (nR * nR)
        S = S + nu.view(B, 1, 1) * rr_outer
        L, info = torch.linalg.cholesky_ex(S)
        return D, a, da, nu, S, L, info

    def solve(fac, res, rc, X, Xs, Z, u2, u2sum):
        D, a, da, nu, S, L, info = fac
        rp_m, rp_r, rd, rT = res
        gx = (rc - X * rd) / Z  # rc, rd vanish off the edges
        hm = rp_m - gx.sum(2) * xm
        g = rp_r + gx.sum(1) + (da * hm.unsqueeze(2)).sum(1)
        if u2 is None:  # predictor: also solve for the T border, S~^-1 1
            u = torch.cholesky_solve(torch.stack([g, rm_], 2), L)
            u1, u2 = u[..., 0], u[..., 1]
            u2sum = (rm_ * u2).sum(1)
        else:
            u1 = torch.cholesky_solve(g.unsqueeze(2), L).squeeze(2)
        dTp = ((rm_ * u1).sum(1) - rT) / u2sum
        dw = (u1 - dTp.unsqueeze(1) * u2) * rm_
        dT = dTp + nu * rT
        dlam = (hm + (D * dw.unsqueeze(1)).sum(2) * xm) / a
        dX = D * (dlam.unsqueeze(2) - dw.unsqueeze(1)) + gx
        dZ = (rc - Z * dX) / Xs
        return dX, dT, dlam, dw, dZ, u2, u2sum

    one = torch.ones(B, dtype=dt, device=f.device)
    stop_tol = _SAFETY * tol
    gate_tol = _BOUND_GATE * tol
    mult = bt.edge_mult.to(dt)
    # on the CPU a host check of the gating is free and skips the bound's ~20 ops on
    # most iterations; on a GPU it would be a second sync per iteration
    on_cpu = f.device.type == "cpu"
    eta_max = 1.0 - 100.0 * torch.finfo(dt).eps  # never land on the boundary by rounding
    res = residuals(X, T, lam, w, Z)
    fac = factor(X, Z)
    it = 0
    any_active, any_fail = torch.stack([active.any(), (fac[-1] > 0).any()]).tolist()
    if any_fail:
        fac = _regularise(fac)
    if any_active:
        for it in range(1, max_iters + 1):
            Xs = X + off
            XZ = X * Z
            mu = XZ.sum((1, 2)) / n_var
            # predictor (affine scaling direction)
            dX, dT, dlam, dw, dZ, u2, u2sum = solve(fac, res, -XZ, X, Xs, Z, None, None)
            ap = _step_to_boundary(Xs, dX, one).view(B, 1, 1)
            ad = _step_to_boundary(Z, dZ, one).view(B, 1, 1)
            mu_aff = ((X + ap * dX) * (Z + ad * dZ)).sum((1, 2)) / n_var
            sigma = torch.clamp(mu_aff / mu, 0.0, 1.0)
            sigma = sigma * sigma * sigma
            # corrector (centring + second-order term), same factorisation
            rc = ((sigma * mu).view(B, 1, 1) - XZ - dX * dZ) * em
            dX, dT, dlam, dw, dZ, _, _ = solve(fac, res, rc, X, Xs, Z, u2, u2sum)
            eta = torch.clamp(1.0 - mu, _ETA, eta_max)
            ap = _step_to_boundary(Xs, dX, eta)
            ad = _step_to_boundary(Z, dZ, eta)
            ok = active & (ap + ad < 3.0)  # False for NaN (a NaN anywhere reaches dX or dZ)
            ap = torch.where(ok, ap, 0.0)
            ad = torch.where(ok, ad, 0.0)
            ok3 = ok.view(B, 1, 1)
            X = torch.where(ok3, X + ap.view(B, 1, 1) * dX, X)
            Z = torch.where(ok3, Z + ad.view(B, 1, 1) * dZ, Z)
            T = torch.where(ok, T + ap * dT, T)
            ok2 = ok.unsqueeze(1)
            lam = torch.where(ok2, lam + ad.unsqueeze(1) * dlam, lam)
            w = torch.where(ok2, w + ad.unsqueeze(1) * dw, w)
            # stop test; keep the best iterate seen (merit = max of the three measures)
            res = residuals(X, T, lam, w, Z)
            rp_m, rp_r, rd, rT = res
            g = (T - (c * lam).sum(1) - (f * w).sum(1)).abs() / (1.0 + T.abs())
            pinf = torch.maximum(rp_m.abs().amax(1), rp_r.abs().amax(1)) / cnorm
            dinf = torch.maximum(rd.abs().flatten(1).amax(1), rT.abs()) / 2.0
            merit = torch.maximum(torch.maximum(g, pinf), dinf)
            better = active & (merit < best_merit)  # False for NaN
            best_merit = torch.where(better, merit, best_merit)
            best_y = torch.where(better.view(B, 1, 1), X, best_y)
            gap = torch.where(better, g, gap)
            stall = torch.where(better, 0, stall + 1)
            met = better & (merit <= stop_tol)
            close = better & (merit > stop_tol) & (merit <= gate_tol)
            if not on_cpu or bool(close.any()):
                U, lb, sw = _split_bound(X[:, :Mx], w, f, c[:, :Mx], em[:, :Mx], rm_, xm[:, :Mx], mult)
                met = met | (close & (sw > 0) & (U - lb <= tol * lb))
            converged = converged | met
            active = active & ~met & ok & (stall < _STALL)
            fac = factor(X, Z)
            # the one host sync per iteration: stop test + factorisation failure flag
            any_active, any_fail = torch.stack([active.any(), (fac[-1] > 0).any()]).tolist()
            if not any_active:
                break
            if any_fail:
                fac = _regularise(fac)
    return best_y[:, :Mx], gap, converged, it


def _exclusive_sum(d: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = sum_{k != j} d[..., k]`` for non-negative ``d`` without the
    cancellation of ``sum - d``: exclusive prefix plus exclusive suffix sums."""
    zero = torch.zeros_like(d[..., :1])
    pre = torch.cat([zero, torch.cumsum(d[..., :-1], -1)], -1)
    suf = torch.flip(torch.cat([zero, torch.cumsum(torch.flip(d[..., 1:], (-1,)), -1)], -1), (-1,))
    return pre + suf


def _regularise(fac):
    D, a, da, nu, S, L, info = fac
    scale = S.diagonal(dim1=1, dim2=2).amax(1)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    reg = 1e-12
    for _ in range(4):
        bad = (info > 0).to(S.dtype) * scale * reg
        S = S + bad.view(-1, 1, 1) * eye
        L, info = torch.linalg.cholesky_ex(S)
        if not bool((info > 0).any()):
            break
        reg *= 100.0
    return D, a, da, nu, S, L, info


@contextlib.contextmanager
def cpu_single_thread(device: torch.device | str):
    """Run tiny batched linear algebra single-threaded on the CPU.

    The per-component systems are at most a few dozen wide: a second OpenMP thread
    never pays off, and on a busy 2-core machine its spin/yield handshake turned a
    4 us ``bmm`` into 8 ms.  Restores the previous thread count (process-global
    setting: do not call concurrently from several Python threads)."""
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def solve_ipm(
    graph: SplitGraph,
    loads: torch.Tensor,
    *,
    max_iters: int = 100,
    tol: float = 1e-6,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> IPMResult:
    """Solve the min-max split LP of every connected component with a batched Mehrotra
    predictor-corrector IPM (see the module docstring for the exact algorithm).

    Args:
        graph: the placement's split graph.
        loads: ``[L]`` per-logical-expert loads (any device, any real dtype).
        max_iters: iteration cap.
        tol: target for the relative duality gap and the relative primal / dual
            infeasibilities (tested at ``0.1 * tol``, so that the returned split's
            objective is within ``tol`` relative of the optimum; near that, a
            converged component can also stop on a proof of it, see the module
            docstring's stop test).
        device: where to iterate (default: ``loads.device``).
        dtype: iteration dtype (float64 default; float32 works with ``tol`` of about
            ``1e-4`` and returns its best iterate when it cannot get there).

    Returns:
        :class:`IPMResult`; ``edge_flow`` is float64 on the CPU and always a valid split.
    """
    if device is None:
        device = loads.device
    demand = graph.demands(loads)
    fixed = graph.fixed_loads(loads)
    if graph.n_edges == 0:
        flow = torch.zeros(0, dtype=torch.float64)
        return IPMResult(flow, float(fixed.max()) if fixed.numel() else 0.0, 0.0, 0, True)
    with cpu_single_thread(device):
        return _solve(graph, loads, fixed, demand, max_iters, tol, device, dtype)


def _solve(graph, loads, fixed, demand, max_iters, tol, device, dtype) -> IPMResult:
    bt = component_batch(graph, device)
    f, c = bt.batch_loads(loads, torch.float64)
    scale = (f.sum(1) + c.sum(1)) / bt.n_ranks
    trivial = scale <= 0
    scale = torch.where(trivial, 1.0, scale)
    fs = (f / scale.unsqueeze(1)).to(dtype)
    cs = (c / scale.unsqueeze(1)).to(dtype)
    y, gap, conv, iters = _ipm_core(fs, cs, bt, max_iters, tol, trivial)
    y = y.to(torch.float64) * scale.view(-1, 1, 1)
    gap = torch.where(trivial, 0.0, gap.to(torch.float64))
    conv = conv | trivial
    flow = y.flatten()[bt.edge_pos].cpu()
    flow = finalize_flow(graph, flow, demand)
    obj = float(graph.rank_loads(fixed, flow).max())
    return IPMResult(flow, obj, float(gap.max()), int(iters), bool(conv.all()))
