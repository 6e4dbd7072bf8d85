"""EPLB-style static expert placement, vectorised over layers, nodes and GPUs.

``rebalance_experts`` has the signature, shapes and semantics of DeepSeek's EPLB
(``deepseek-ai/EPLB``): given the historical load of every logical expert of every MoE
layer, it chooses how many copies each expert gets and which physical slot holds each
copy.  Slot ``p`` lives on GPU ``p // (num_replicas // num_gpus)``; GPU ``g`` lives on
node ``g // (num_gpus // num_nodes)``.

Two policies, picked as EPLB picks them:

* **Hierarchical** (``num_groups % num_nodes == 0``), for expert-group-limited routing
  (DeepSeek-V3 sends each token to at most a few groups, so keeping a group on one
  node keeps its traffic on NVLink):

  1. pack the ``num_groups`` expert groups onto the nodes, ``num_groups / num_nodes``
     groups per node, balancing the summed group load;
  2. inside each node, replicate its experts up to ``num_replicas / num_nodes``
     copies: each extra copy goes to the expert whose load per copy is largest;
  3. inside each node, pack the copies (each carrying ``load / copies``) onto the
     node's GPUs, ``num_replicas / num_gpus`` copies per GPU.

* **Global** (otherwise): the same three steps with one group and one node, i.e.
  replicate over the whole model and pack all copies onto all GPUs.

Packing is EPLB's greedy: items in decreasing weight, each into the lightest pack that
still has room, every pack taking exactly ``items / packs`` items; when that quotient
is 1 the items keep their order (item ``i`` -> pack ``i``), as in EPLB.

Conventions that make the output identical to EPLB's whenever loads have no ties:

* arithmetic is float32, like EPLB (``weight.float()``): loads per copy are
  ``float32(load) / count`` and pack loads are float32 running sums in packing order;
* ties are broken towards the lower index: ``argmax``/``argmin`` take the first
  extreme, and the packing order is a *stable* descending sort.  EPLB itself sorts
  with ``torch.sort(descending=True)`` (unstable; on CPUs with AVX2/AVX-512 torch uses
  x86-simd-sort), so EPLB's own order among equal weights is machine dependent.  Equal
  weights always occur among copies of one expert, so EPLB's ``log2phy`` can differ
  from ours in which slot is listed as copy 0, 1, ...; ``phy2log`` and ``logcnt``
  cannot (unless two different experts tie).  Here copy ``k`` of an expert is the
  ``k``-th copy created, equal copies are packed in creation order, and
  ``log2phy[l, e, k]`` is the slot of copy ``k``;
* group loads are summed in float64 in index order, then rounded to float32 (EPLB uses
  torch's float32 sum, whose rounding depends on the SIMD width), so they can differ
  from EPLB's by one float32 ulp; this matters only for groups whose loads tie within
  an ulp.

Inputs are checked more strictly than EPLB does: ``num_gpus % num_nodes == 0`` and
``num_logical % num_groups == 0`` are required under both policies (EPLB asserts them
only on the hierarchical path), loads must be finite and non-negative, and
``num_replicas`` must stay below 65536.

Each greedy step is one batch of array operations over every (layer, node) row, so
the Python loops run ``(num_replicas - num_logical) / num_nodes`` times (replication)
and about ``num_replicas / num_nodes`` times (packing), independent of the number of
layers.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from .errors import LPLBInputError

__all__ = ["rebalance_experts"]

# Pack loads are float32 running sums; capping the row total keeps every partial sum
# finite (an overflow to inf would make unequal packs compare equal).
_MAX_ROW_TOTAL = float(np.finfo(np.float32).max) / 4
# The greedy keys below count copies and items in 16-bit fields.
_MAX_REPLICAS = 2**16 - 1


# --------------------------------------------------------------------------- validation
def _check_count(name: str, value: Any) -> int:
    """Return ``value`` as a positive Python int, or raise naming ``name``."""
    if isinstance(value, bool):
        raise LPLBInputError(f"{name} must be a positive integer, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise LPLBInputError(
            f"{name} must be a positive integer, got {value!r} ({type(value).__name__})"
        ) from None
    if count < 1:
        raise LPLBInputError(f"{name} must be a positive integer, got {count}")
    return count


def _as_weight(weight: Any) -> np.ndarray:
    """Validate ``weight`` and return it as float32 ``[num_layers, num_logical]``.

    Accepts a torch tensor (any device, any real dtype), a numpy array or a nested list.
    """
    if isinstance(weight, torch.Tensor):
        if weight.is_complex() or weight.dtype == torch.bool:
            raise LPLBInputError(f"weight must have a real dtype, got {weight.dtype}")
        array = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            array = np.asarray(weight)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise LPLBInputError(
                f"weight must be a [num_layers, num_logical] array of loads: {exc}"
            ) from None
        if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
            raise LPLBInputError(
                f"weight must hold real numbers, got dtype {array.dtype}"
            )
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise LPLBInputError(
            f"weight must be 2-D [num_layers, num_logical], got shape {tuple(array.shape)}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise LPLBInputError(
            f"weight must have at least one layer and one expert, got shape "
            f"{tuple(array.shape)}"
        )
    if not np.isfinite(array).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise LPLBInputError(
            f"weight must be finite, got {array[bad]} at index {bad}"
        )
    if (array < 0).any():
        bad = tuple(int(i) for i in np.argwhere(array < 0)[0])
        raise LPLBInputError(
            f"weight must be non-negative, got {array[bad]} at index {bad}"
        )
    totals = array.sum(axis=1)
    if (totals > _MAX_ROW_TOTAL).any():
        layer = int(np.argmax(totals))
        raise LPLBInputError(
            f"weight: layer {layer} sums to {totals[layer]:.3g}, above {_MAX_ROW_TOTAL:.3g}; "
            f"loads are summed in float32, rescale them"
        )
    # + 0.0 turns -0.0 into +0.0, whose bit pattern the greedy keys rely on.
    return array.astype(np.float32) + np.float32(0.0)


def _check_shapes(
    num_logical: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    """Raise if the sizes cannot be split evenly the way the policies need."""
    if num_replicas < num_logical:
        raise LPLBInputError(
            f"num_replicas must be >= the number of logical experts ({num_logical}), "
            f"got {num_replicas}"
        )
    if num_replicas > _MAX_REPLICAS:
        raise LPLBInputError(
            f"num_replicas must be at most {_MAX_REPLICAS}, got {num_replicas}"
        )
    if num_replicas % num_gpus:
        raise LPLBInputError(
            f"num_replicas must be a multiple of num_gpus ({num_gpus}), got {num_replicas}"
        )
    if num_gpus % num_nodes:
        raise LPLBInputError(
            f"num_gpus must be a multiple of num_nodes ({num_nodes}), got {num_gpus}"
        )
    if num_logical % num_groups:
        raise LPLBInputError(
            f"num_groups must divide the number of logical experts ({num_logical}), "
            f"got {num_groups}"
        )


# --------------------------------------------------------------------------- array helpers
# The greedy loops make one choice per row per step.  numpy's argmin/argmax walk the
# rows one at a time, which costs more than the rest of a step; instead every candidate
# gets one int64 key that orders exactly as the greedy rule does (the bits of a
# non-negative float32 compare like the float), so a single min/max reduction across
# candidates yields the winner of every row at once, value and index together.
_LOW16 = 0xFFFF
_LOW32 = 0xFFFFFFFF
_MAX_F32_BITS = 0x7FFFFFFF


def _f32_bits(values: np.ndarray) -> np.ndarray:
    """float32 values ``>= 0`` -> their bit patterns as int64 (order preserving)."""
    return values.view(np.int32).astype(np.int64)


def _bits_f32(bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_f32_bits`."""
    return bits.astype(np.int32).view(np.float32)


def _gather_rows(source: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``out[r, j] = source[r, index[r, j]]`` for 2-D arrays (flat fancy indexing,
    cheaper than ``np.take_along_axis`` at these sizes)."""
    rows, width = source.shape
    offsets = (np.arange(rows, dtype=np.int64) * width)[:, None]
    return source.reshape(-1)[index + offsets]


def _scatter_rows(target: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``target[r, index[r, j]] = values[r, j]`` for 2-D arrays, in place."""
    rows, width = target.shape
    offsets = (np.arange(rows, dtype=np.int64) * width)[:, None]
    target.reshape(-1)[(index + offsets).reshape(-1)] = np.broadcast_to(
        values, index.shape
    ).reshape(-1)


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of int64 permutations ``[X, n]``."""
    inverse = np.empty_like(perm)
    _scatter_rows(inverse, perm, np.arange(perm.shape[1], dtype=np.int64))
    return inverse


def _sort_descending(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable descending sort of each row of float32 ``[X, n]`` (values ``>= 0``).

    Returns ``(order, sorted_weight)``, int64 and float32 ``[X, n]``.  Sorting unique
    int64 keys (descending value, then index) is several times faster than a stable
    argsort of the floats.
    """
    n = weight.shape[1]
    key = ((_MAX_F32_BITS - _f32_bits(weight)) << 32) | np.arange(n, dtype=np.int64)
    key.sort(axis=1)
    return key & _LOW32, _bits_f32(_MAX_F32_BITS - (key >> 32))


# --------------------------------------------------------------------------- greedy steps
def _balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy balanced packing of every row's items, exactly ``n / num_packs`` per pack.

    Args:
        weight: float32 ``[X, n]``, finite, ``>= 0`` and no ``-0.0``; ``n`` a multiple
            of ``num_packs``; ``num_packs`` and ``n / num_packs`` below 65536.
        num_packs: packs per row.

    Returns:
        ``(pack_index, rank_in_pack)``, int64 ``[X, n]``: the pack of each item and its
        position inside the pack (items enter a pack heaviest first).
    """
    rows, n = weight.shape
    capacity = n // num_packs
    if capacity == 1:
        # EPLB skips the greedy here: item i -> pack i, not heaviest -> pack 0.
        return (
            np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n)).copy(),
            np.zeros((rows, n), dtype=np.int64),
        )
    if rows * num_packs > _LOW16 + 1:
        # Keys number the (pack, row) cells in 16 bits: split very tall inputs.
        step = (_LOW16 + 1) // num_packs
        parts = [_balanced_packing(weight[i : i + step], num_packs) for i in range(0, rows, step)]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))  # type: ignore[return-value]
    order, sorted_weight = _sort_descending(weight)
    sorted_weight = np.ascontiguousarray(sorted_weight.T)  # [n, X]: one row per step
    # key[p, x] = load bits << 32 | cell << 16 | items in p, with cell = p * X + x the
    # flat index of (p, x).  A pack that receives its last item gets load +inf, so the
    # minimum is the lightest open pack, the lowest-numbered on ties (Python's min() in
    # EPLB).
    cells = np.arange(num_packs * rows, dtype=np.int64).reshape(num_packs, rows)
    key = cells << 16
    chosen = np.empty((n, rows), dtype=np.int64)  # low 32 bits of the chosen key, per step
    first = 0
    if bool((sorted_weight[num_packs - 1] > 0).all()):
        # The num_packs heaviest items are all > 0, so item k lands in empty pack k.
        key |= (_f32_bits(sorted_weight[:num_packs]) << 32) | 1
        chosen[:num_packs] = cells << 16
        first = num_packs
    key_flat = key.reshape(-1)
    close = np.zeros(capacity, dtype=np.float32)  # added to a load, by items before
    close[-1] = np.inf
    for k in range(first, n):
        best = np.minimum.reduce(key, axis=0)
        low = best & _LOW32
        chosen[k] = low
        load = _bits_f32(best >> 32) + sorted_weight[k]  # float32 sum, as EPLB's
        load += close[low & _LOW16]
        key_flat[low >> 16] = (_f32_bits(load) << 32) | (low + 1)
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    _scatter_rows(pack_index, order, ((chosen >> 16) // rows).T)
    _scatter_rows(rank_in_pack, order, (chosen & _LOW16).T)
    return pack_index, rank_in_pack


def _replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy replication of every row's experts to ``num_phy`` copies.

    Slots ``[0, n)`` hold copy 0 of experts ``0..n-1``; each further slot gets a new copy
    of the expert with the largest ``weight / count`` (first one on ties).

    Args:
        weight: float32 ``[X, n]``, values ``>= 0`` (no ``-0.0``).
        num_phy: copies per row, ``>= n`` and below 65536.

    Returns:
        ``(phy2log, phy_rank, logcnt)``: int64 ``[X, num_phy]`` expert of each slot,
        int64 ``[X, num_phy]`` copy index of each slot, int64 ``[X, n]`` copies per
        expert.
    """
    rows, n = weight.shape
    if rows * n > _LOW16 + 1:
        # Keys number the (expert, row) cells in 16 bits: split very tall inputs.
        step = (_LOW16 + 1) // n
        parts = [_replicate(weight[i : i + step], num_phy) for i in range(0, rows, step)]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))  # type: ignore[return-value]
    weight_t = np.ascontiguousarray(weight.T)  # [n, X]
    weight_flat = weight_t.reshape(-1)
    # key[e, x] = (weight / count) bits << 32 | (65535 - cell) << 16 | count, with
    # cell = e * X + x the flat index of (e, x).  The maximum is the largest load per
    # copy, the lowest expert id on ties (torch.max in EPLB).
    cells = np.arange(n * rows, dtype=np.int64).reshape(n, rows)
    key = (_f32_bits(weight_t) << 32) | ((_LOW16 - cells) << 16) | 1
    key_flat = key.reshape(-1)
    chosen = np.empty((num_phy - n, rows), dtype=np.int64)  # low 32 bits of the winner
    for step in range(num_phy - n):
        low = np.maximum.reduce(key, axis=0) & _LOW32
        chosen[step] = low
        cell = _LOW16 - (low >> 16)
        count = (low & _LOW16) + 1
        # float32 / float32, as EPLB's float32 tensor / int64 tensor.
        per_copy = weight_flat[cell] / count.astype(np.float32)
        key_flat[cell] = (_f32_bits(per_copy) << 32) | (low + 1)
    phy2log = np.empty((rows, num_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n, dtype=np.int64)
    phy2log[:, n:] = ((_LOW16 - (chosen >> 16)) // rows).T
    phy_rank = np.zeros((rows, num_phy), dtype=np.int64)
    phy_rank[:, n:] = (chosen & _LOW16).T
    return phy2log, phy_rank, np.ascontiguousarray((key & _LOW16).T)


# --------------------------------------------------------------------------- policy steps
def _group_loads(weight: np.ndarray, num_groups: int) -> np.ndarray:
    """Summed load of each expert group: float32 ``[L, num_groups]`` from ``[L, E]``.

    Summed in float64 in index order (cumsum is sequential) and rounded once, so the
    result does not depend on the SIMD width of a float32 reduction.
    """
    layers, experts = weight.shape
    grouped = weight.astype(np.float64).reshape(layers, num_groups, experts // num_groups)
    return np.cumsum(grouped, axis=2)[:, :, -1].astype(np.float32)


def _pack_groups_to_nodes(weight: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """Step 1: order the logical experts node by node.

    Args:
        weight: float32 ``[L, E]``.

    Returns:
        ``log2mlog`` int64 ``[L, E]``: position of each logical expert in the
        node-major order, node ``n`` owning positions ``[n*E/N, (n+1)*E/N)``; a group's
        experts stay contiguous and in order.
    """
    layers, experts = weight.shape
    group_size = experts // num_groups
    pack, rank = _balanced_packing(_group_loads(weight, num_groups), num_nodes)
    first = (pack * (num_groups // num_nodes) + rank) * group_size  # [L, G]
    return (first[:, :, None] + np.arange(group_size, dtype=np.int64)).reshape(layers, experts)


def _pack_copies_to_gpus(
    per_copy_load: np.ndarray, gpus_per_node: int
) -> np.ndarray:
    """Step 3: place each node's copies on the node's GPUs.

    Args:
        per_copy_load: float32 ``[L*N, R/N]``, the load each copy carries.

    Returns:
        ``slot_of_copy`` int64 ``[L*N, R/N]``: node-local slot of each copy, GPU-major,
        heaviest copy first inside a GPU.
    """
    copies = per_copy_load.shape[1]
    pack, rank = _balanced_packing(per_copy_load, gpus_per_node)
    return pack * (copies // gpus_per_node) + rank


def _hierarchical(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the three steps; return ``(phy2log [L, R], phy_rank [L, R], logcnt [L, E])``."""
    layers, experts = weight.shape
    experts_per_node = experts // num_nodes

    log2mlog = _pack_groups_to_nodes(weight, num_groups, num_nodes)
    mlog2log = _inverse(log2mlog)
    node_weight = _gather_rows(weight, mlog2log).reshape(
        layers * num_nodes, experts_per_node
    )

    copy2mlog, copy_rank, mlogcnt = _replicate(node_weight, num_replicas // num_nodes)

    per_copy = node_weight / mlogcnt.astype(np.float32)
    slot_of_copy = _pack_copies_to_gpus(
        _gather_rows(per_copy, copy2mlog), num_gpus // num_nodes
    )
    copy_in_slot = _inverse(slot_of_copy)

    # Node-local expert ids -> node-major ids -> logical ids.
    node_offset = (np.arange(num_nodes, dtype=np.int64) * experts_per_node)[None, :, None]
    slot2mlog = _gather_rows(copy2mlog, copy_in_slot).reshape(
        layers, num_nodes, -1
    ) + node_offset
    phy2log = _gather_rows(mlog2log, slot2mlog.reshape(layers, num_replicas))
    phy_rank = _gather_rows(copy_rank, copy_in_slot).reshape(layers, num_replicas)
    logcnt = _gather_rows(mlogcnt.reshape(layers, experts), log2mlog)
    return phy2log, phy_rank, logcnt


def _log2phy(phy2log: np.ndarray, phy_rank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """Invert the slot map: int64 ``[L, E, max(logcnt)]``, ``[l, e, k]`` = slot of copy
    ``k`` of expert ``e``, ``-1`` past its last copy."""
    layers, experts = logcnt.shape
    max_count = int(logcnt.max())
    table = np.full((layers, experts * max_count), -1, dtype=np.int64)
    _scatter_rows(
        table, phy2log * max_count + phy_rank, np.arange(phy2log.shape[1], dtype=np.int64)
    )
    return table.reshape(layers, experts, max_count)


# --------------------------------------------------------------------------- entry point
def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB-compatible placement of replicated experts.

    Args:
        weight: ``[num_layers, num_logical]`` non-negative finite loads (torch tensor of
            any real dtype and device, numpy array or nested list).
        num_replicas: physical slots per layer, a multiple of ``num_gpus`` and at least
            ``num_logical``.
        num_groups: expert groups; must divide ``num_logical``.
        num_nodes: server nodes; must divide ``num_gpus``.  The hierarchical policy is
            used when it divides ``num_groups``, the global one otherwise.
        num_gpus: GPUs; slot ``p`` lives on GPU ``p // (num_replicas // num_gpus)``.

    Returns:
        ``(phy2log, log2phy, logcnt)``, CPU int64:
        ``phy2log [num_layers, num_replicas]`` the logical expert of each slot;
        ``log2phy [num_layers, num_logical, max(logcnt)]`` the slots of each expert's
        copies in creation order, ``-1`` padded;
        ``logcnt [num_layers, num_logical]`` the number of copies of each expert (>= 1).

    Raises:
        LPLBInputError: on a malformed ``weight`` or sizes that do not split evenly.
    """
    array = _as_weight(weight)
    num_replicas = _check_count("num_replicas", num_replicas)
    num_groups = _check_count("num_groups", num_groups)
    num_nodes = _check_count("num_nodes", num_nodes)
    num_gpus = _check_count("num_gpus", num_gpus)
    _check_shapes(array.shape[1], num_replicas, num_groups, num_nodes, num_gpus)

    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    phy2log, phy_rank, logcnt = _hierarchical(array, num_replicas, num_groups, num_nodes, num_gpus)
    log2phy = _log2phy(phy2log, phy_rank, logcnt)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
