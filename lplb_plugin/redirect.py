"""Token redirection: turn a global split ``x[P]`` into per-token physical expert ids.

This is the torch reference of step 4 of the design (DESIGN.md section 4); the CUDA
``map`` kernel reproduces it bit for bit and is checked against it.

Every EP rank holds its own router output ``topk_idx`` (logical expert ids in
``[0, L)``, ``-1`` for a dropped choice).  The solver has produced, per physical slot,
``x[slot]``: how many of its logical expert's tokens, summed over *all* ranks, that copy
should receive (the copies of expert ``e`` sum to the global count ``c[e]``).  Each rank
splits *its own* ``n_e`` tokens of ``e`` between ``e``'s copies in the proportions
``x[copy] / c[e]``, so no communication is needed beyond the global counts already
all-reduced for the solve.  Summed over ``R`` ranks, copy ``k`` then receives
``x[slot_k]`` tokens to within ``R`` (each rank rounds each copy by less than one token).

Exact definition (the contract the CUDA kernel follows)
-------------------------------------------------------
Let ``flat = topk_idx.reshape(-1)`` (row-major order of the tensor's *logical* layout,
independent of its strides) and ``N = flat.numel()``.

* **Sequence number** of entry ``i`` with ``flat[i] = e`` in ``[0, L)``:
  ``seq[i] = #{ j < i : flat[j] == e }``.  Entries outside ``[0, L)`` (``-1``) get
  ``seq = -1`` and are counted nowhere.
* **Local count** ``n[e] = #{ j : flat[j] == e }``.
* **Boundaries** ``B[e, k] = floor(float64(n[e]) * cum_frac[e, k])`` for every column
  ``k``, then ``B[e, k] = n[e]`` for the last real copy and every ``-1`` padded column
  (so ``B[e, last] = n[e]`` even if ``cum_frac`` is off by rounding), then clamped to
  ``[0, n[e]]`` and made non-decreasing along ``k`` (running max).  With ``cum_frac``
  from :func:`copy_fractions` the last two steps change nothing.
* **Copy** of entry ``i``: ``k[i] = #{ k : B[e, k] <= seq[i] }``, which equals the
  smallest ``k`` with ``seq[i] < B[e, k]``; the output is ``log2phy[e, k[i]]``.

So copy ``k`` of ``e`` receives the entries with sequence numbers
``[B[e, k-1], B[e, k])`` (``B[e, -1] = 0``): a contiguous run in flattened order, with
``n[e] * share_k - 1 < sent_k < n[e] * share_k + 1``.

Everything in the main path is tensor ops on ``topk_idx``'s device (no ``.item()``,
no host sync, no atomics): with ``check=False`` a call can be captured in a CUDA graph.
Memory is ``O(N + L * C)``: a stable sort of the ``N`` flattened ids plus a few
``int64 [N]`` temporaries; nothing of size ``N * L``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import LPLBInputError

__all__ = ["copy_fractions", "sequence_numbers", "redirect", "slots_received"]


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_tensor(name: str, value, dim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LPLBInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise LPLBInputError(
            f"{name} must be {dim}-D, got shape {tuple(value.shape)} ({value.dim()}-D)"
        )
    return value


def copy_fractions(
    x: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Cumulative share of each copy of each logical expert, in ``log2phy`` column order.

    ``cum[e, k] = (x[log2phy[e, 0]] + ... + x[log2phy[e, k]]) / (sum of x over e's
    copies)``.  Negative entries of ``x`` are clamped to 0 first (solvers may leave
    ``-1e-15``).  Columns from the last real copy (``k >= logcnt[e] - 1``) on, padded
    ``-1`` columns included, are exactly ``1.0``.  Bit-exact definition (shared with the
    CUDA kernel): ``s_k = s_{k-1} + x_k`` summed left to right in float64 (``x`` clamped),
    ``cum[e, k] = min(s_k / s_last, 1.0)`` with IEEE division; no fused or reordered
    arithmetic.  An expert whose copies sum to 0 gets
    an even split, ``cum[e, k] = (k + 1) / logcnt[e]``, so that a rank that still sees
    tokens of it sends them somewhere valid.  Each row is non-decreasing.

    Arguments:
        x: real ``[P]`` (any float or integer dtype), the global split: tokens each
            physical slot should receive, summed over all EP ranks.
        log2phy: integer ``[L, C]``, slots of each logical expert, ``-1`` padded; the
            first ``logcnt[e]`` columns of row ``e`` are its copies.
        logcnt: integer ``[L]``, number of copies of each expert (``1 <= logcnt <= C``).
        check: validate the values of ``log2phy``/``logcnt`` against each other and
            against ``P`` (one host sync).  Shapes and dtypes are always checked.

    Returns:
        cum: ``torch.float64`` ``[L, C]`` on ``x``'s device.
    """
    _check_tensor("x", x, dim=1)
    _check_tensor("log2phy", log2phy, dim=2)
    _check_tensor("logcnt", logcnt, dim=1)
    if x.is_complex() or x.dtype == torch.bool:
        raise LPLBInputError(f"x must be a real tensor, got dtype {x.dtype}")
    if not _is_int_dtype(log2phy.dtype):
        raise LPLBInputError(f"log2phy must be an integer tensor, got dtype {log2phy.dtype}")
    if not _is_int_dtype(logcnt.dtype):
        raise LPLBInputError(f"logcnt must be an integer tensor, got dtype {logcnt.dtype}")
    n_logical, n_cols = log2phy.shape
    if logcnt.numel() != n_logical:
        raise LPLBInputError(
            f"logcnt must have shape [{n_logical}] (rows of log2phy), got {tuple(logcnt.shape)}"
        )
    if n_cols == 0:
        raise LPLBInputError(f"log2phy must have at least one column, got shape {tuple(log2phy.shape)}")

    device = x.device
    log2phy = log2phy.to(device=device, dtype=torch.int64)
    logcnt = logcnt.to(device=device, dtype=torch.int64)
    cols = torch.arange(n_cols, device=device)
    real = cols.unsqueeze(0) < logcnt.unsqueeze(1)  # [L, C]

    if check and n_logical > 0:
        n_phys = x.numel()
        bad_cnt = (logcnt < 1) | (logcnt > n_cols)
        bad_slot = real & ((log2phy < 0) | (log2phy >= n_phys))
        bad_pad = ~real & (log2phy != -1)
        flags = torch.stack([bad_cnt.any(), bad_slot.any(), bad_pad.any()]).tolist()
        if flags[0]:
            e = int(torch.nonzero(bad_cnt)[0, 0])
            raise LPLBInputError(
                f"logcnt[{e}] = {int(logcnt[e])}, expected a value in [1, {n_cols}] "
                f"(log2phy has {n_cols} columns)"
            )
        if flags[1]:
            e, k = (int(v) for v in torch.nonzero(bad_slot)[0])
            raise LPLBInputError(
                f"log2phy[{e}, {k}] = {int(log2phy[e, k])}, expected a slot id in "
                f"[0, {n_phys}) (x has {n_phys} slots, logcnt[{e}] = {int(logcnt[e])})"
            )
        if flags[2]:
            e, k = (int(v) for v in torch.nonzero(bad_pad)[0])
            raise LPLBInputError(
                f"log2phy[{e}, {k}] = {int(log2phy[e, k])}, expected -1 (padding after "
                f"logcnt[{e}] = {int(logcnt[e])} copies)"
            )

    xf = x.detach().to(torch.float64).clamp(min=0.0)
    xs = torch.where(real, xf[log2phy.clamp(min=0)], 0.0)  # [L, C]
    # Left-to-right sequential float64 prefix sum, written out column by column:
    # torch.cumsum associates differently on CPU and CUDA (ulp-level differences would
    # move floor() boundaries), and the CUDA kernel sums each row sequentially.
    cs = xs.clone()
    for k in range(1, n_cols):
        cs[:, k] = cs[:, k - 1] + xs[:, k]
    total = cs[:, -1:]  # [L, 1]
    positive = total > 0
    cnt = logcnt.clamp(min=1).to(torch.float64).unsqueeze(1)
    even = (cols.to(torch.float64) + 1.0).unsqueeze(0) / cnt
    cum = torch.where(positive, cs / torch.where(positive, total, 1.0), even)
    # Last real column and padding: exactly 1.0; rounding can never push past 1.0.
    cum = torch.where(cols.unsqueeze(0) >= (logcnt.unsqueeze(1) - 1), 1.0, cum.clamp(max=1.0))
    return cum


def sequence_numbers(flat_idx: torch.Tensor, n_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry occurrence index of each logical id, in flattened order.

    ``seq[i] = #{ j < i : flat_idx[j] == flat_idx[i] }`` for entries with
    ``0 <= flat_idx[i] < n_logical``; every other entry (``-1``, or an out-of-range id)
    gets ``seq[i] = -1`` and is not counted.  ``counts[e] = #{ j : flat_idx[j] == e }``.

    Implementation: a stable sort of the ids (out-of-range ids mapped to a sentinel
    bucket ``n_logical`` that sorts last), bucket starts by ``searchsorted`` on the
    sorted ids (no atomics, no host sync, unlike ``bincount`` on CUDA), then
    ``seq_sorted = position - start[bucket]`` scattered back through the (unique)
    sort permutation.  Deterministic; memory ``O(N + L)``.

    Arguments:
        flat_idx: integer ``[N]`` (int32 or int64), logical ids.
        n_logical: ``L``, the number of logical experts.

    Returns:
        seq: ``torch.int64`` ``[N]`` on ``flat_idx``'s device.
        counts: ``torch.int64`` ``[L]`` on ``flat_idx``'s device.
    """
    _check_tensor("flat_idx", flat_idx, dim=1)
    if not _is_int_dtype(flat_idx.dtype):
        raise LPLBInputError(f"flat_idx must be an integer tensor, got dtype {flat_idx.dtype}")
    if not isinstance(n_logical, int) or isinstance(n_logical, bool) or n_logical < 1:
        raise LPLBInputError(f"n_logical must be an integer >= 1, got {n_logical!r}")
    device = flat_idx.device
    n = flat_idx.numel()
    ids = flat_idx.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < n_logical), ids, n_logical)
    del ids
    sorted_key, order = torch.sort(key, stable=True)
    buckets = torch.arange(n_logical + 1, device=device, dtype=torch.int64)
    starts = torch.searchsorted(sorted_key, buckets)  # [L + 1], starts[L] = #valid
    counts = starts[1:] - starts[:-1]
    seq_sorted = torch.arange(n, device=device, dtype=torch.int64)
    seq_sorted.sub_(starts[sorted_key])
    del sorted_key
    seq = torch.empty(n, device=device, dtype=torch.int64)
    seq.scatter_(0, order, seq_sorted)
    del order, seq_sorted
    seq.masked_fill_(key == n_logical, -1)
    return seq, counts


def _boundaries(counts: torch.Tensor, cum_frac: torch.Tensor, log2phy: torch.Tensor) -> torch.Tensor:
    """int64 ``[L, C]`` boundaries ``B[e, k]`` (see the module docstring)."""
    n_cols = log2phy.shape[1]
    n = counts.to(torch.float64).unsqueeze(1)
    bounds = torch.floor(n * cum_frac.to(torch.float64))
    bounds = torch.nan_to_num(bounds, nan=0.0)
    bounds = torch.minimum(bounds.clamp(min=0.0), n).to(torch.int64)
    valid = log2phy >= 0
    nxt_valid = torch.zeros_like(valid)
    if n_cols > 1:
        nxt_valid[:, :-1] = valid[:, 1:]
    not_inner = ~(valid & nxt_valid)  # last real copy, or a padded column
    bounds = torch.where(not_inner, counts.unsqueeze(1), bounds)
    return torch.cummax(bounds, dim=1).values


def redirect(
    topk_idx: torch.Tensor,
    cum_frac: torch.Tensor,
    log2phy: torch.Tensor,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Rewrite logical expert ids into physical slot ids realising a split.

    Each entry ``e >= 0`` of ``topk_idx`` becomes ``log2phy[e, k]`` where ``k`` is
    chosen from the entry's sequence number among this tensor's entries of ``e``
    (row-major order) and the boundaries ``floor(n_e * cum_frac[e, :])`` (exact
    definition in the module docstring).  ``-1`` stays ``-1``.  Deterministic and
    independent of memory layout: a non-contiguous view and its ``.contiguous()`` give
    the same result.

    Arguments:
        topk_idx: integer tensor of any shape (int32 or int64, typically
            ``[num_tokens, num_topk]``), logical ids in ``[-1, L)``; ``-1`` = dropped.
        cum_frac: float ``[L, C]``, cumulative copy shares from :func:`copy_fractions`
            (moved to ``topk_idx``'s device and computed in float64).
        log2phy: integer ``[L, C]``, slots of each expert, ``-1`` padded (moved to
            ``topk_idx``'s device).
        check: validate that every value of ``topk_idx`` lies in ``[-1, L)`` and that
            column 0 of ``log2phy`` is a real slot (one host sync).  With
            ``check=False`` there is no host sync, and out-of-range ids are treated as
            dropped (they come out as ``-1``).

    Returns:
        phys_idx: tensor with the shape, dtype and device of ``topk_idx``
            (contiguous), physical slot ids, ``-1`` where ``topk_idx`` is ``-1``.
    """
    _check_tensor("topk_idx", topk_idx)
    _check_tensor("cum_frac", cum_frac, dim=2)
    _check_tensor("log2phy", log2phy, dim=2)
    if not _is_int_dtype(topk_idx.dtype):
        raise LPLBInputError(
            f"topk_idx must be an integer tensor (int32 or int64), got dtype {topk_idx.dtype}"
        )
    if not _is_int_dtype(log2phy.dtype):
        raise LPLBInputError(f"log2phy must be an integer tensor, got dtype {log2phy.dtype}")
    if not (cum_frac.dtype.is_floating_point):
        raise LPLBInputError(f"cum_frac must be a floating-point tensor, got dtype {cum_frac.dtype}")
    if tuple(cum_frac.shape) != tuple(log2phy.shape):
        raise LPLBInputError(
            f"cum_frac has shape {tuple(cum_frac.shape)}, expected the shape of log2phy "
            f"{tuple(log2phy.shape)}"
        )
    n_logical, n_cols = log2phy.shape
    if n_logical == 0 or n_cols == 0:
        raise LPLBInputError(f"log2phy must be non-empty [L, C], got shape {tuple(log2phy.shape)}")

    device = topk_idx.device
    log2phy = log2phy.to(device=device, dtype=torch.int64)
    cum_frac = cum_frac.to(device=device, dtype=torch.float64)
    flat = topk_idx.reshape(-1)

    if check:
        bad_idx = (flat < -1) | (flat >= n_logical)
        bad_home = log2phy[:, 0] < 0
        flags = torch.stack([bad_idx.any(), bad_home.any()]).tolist()
        if flags[0]:
            i = int(torch.nonzero(bad_idx)[0, 0])
            pos = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), topk_idx.shape))
            raise LPLBInputError(
                f"topk_idx{list(pos)} = {int(flat[i])}, expected a logical expert id in "
                f"[-1, {n_logical}) (L = {n_logical} rows of log2phy)"
            )
        if flags[1]:
            e = int(torch.nonzero(bad_home)[0, 0])
            raise LPLBInputError(f"log2phy[{e}, 0] = -1, expected the home slot of expert {e}")

    seq, counts = sequence_numbers(flat, n_logical)
    bounds = _boundaries(counts, cum_frac, log2phy)  # [L, C]
    # Sentinel row L for dropped entries: bounds 0 (seq = -1 never reaches them ->
    # k = 0) and slot -1.
    bounds_ext = torch.cat([bounds, bounds.new_zeros(1, n_cols)], dim=0)
    slots_ext = torch.cat([log2phy, log2phy.new_full((1, n_cols), -1)], dim=0)
    ids = flat.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < n_logical), ids, n_logical)
    del ids
    # k = #{k : B[e, k] <= seq}; the last column always has B = n_e > seq, so skip it.
    k = torch.zeros_like(seq)
    for col in range(n_cols - 1):
        k += bounds_ext[:, col][key] <= seq
    del seq
    key.mul_(n_cols).add_(k)
    del k
    out = slots_ext.reshape(-1)[key]
    return out.to(topk_idx.dtype).reshape(topk_idx.shape)


def slots_received(phys_idx_per_rank: Sequence[torch.Tensor], n_physical: int) -> torch.Tensor:
    """Tokens received by each physical slot, summed over ranks.

    Arguments:
        phys_idx_per_rank: one integer tensor per EP rank, any shape, physical slot ids
            in ``[-1, n_physical)`` (``-1`` = dropped, not counted), e.g. the outputs
            of :func:`redirect`.
        n_physical: ``P``, the number of physical slots.

    Returns:
        received: ``torch.int64`` ``[P]`` on the CPU.
    """
    if not isinstance(n_physical, int) or isinstance(n_physical, bool) or n_physical < 1:
        raise LPLBInputError(f"n_physical must be an integer >= 1, got {n_physical!r}")
    total = torch.zeros(n_physical, dtype=torch.int64)
    for r, t in enumerate(phys_idx_per_rank):
        _check_tensor(f"phys_idx_per_rank[{r}]", t)
        if not _is_int_dtype(t.dtype):
            raise LPLBInputError(
                f"phys_idx_per_rank[{r}] must be an integer tensor, got dtype {t.dtype}"
            )
        flat = t.detach().reshape(-1).to("cpu", torch.int64)
        if flat.numel() == 0:
            continue
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -1 or hi >= n_physical:
            bad = lo if lo < -1 else hi
            raise LPLBInputError(
                f"phys_idx_per_rank[{r}] holds {bad}, expected slot ids in [-1, {n_physical})"
            )
        total += torch.bincount(flat[flat >= 0], minlength=n_physical)
    return total
