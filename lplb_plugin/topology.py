"""Redundancy topologies of upstream LPLB as ``r2o`` tensors.

``r2o`` has shape ``[group_size, n_redundant]`` (int64).  ``r2o[g, d]`` is the rank,
inside a group of ``group_size`` consecutive EP ranks, whose ``d``-th hot expert is
copied into rank ``g``'s ``d``-th redundant slot.  Each column must be a permutation of
``range(group_size)`` so that every rank exports exactly one expert per column.

Upstream ships these only in its tests, printed transposed (one row per redundant
slot); the functions here return the ``[group_size, n_redundant]`` orientation that
``Planner`` takes.
"""

from __future__ import annotations

import torch

from .errors import LPLBInputError

__all__ = ["ring", "cube", "hypercube", "torus_2d", "validate_r2o", "by_name"]


def ring(n: int = 8) -> torch.Tensor:
    """Ring of ``n`` ranks, one redundant slot each: rank ``g`` hosts a copy of rank
    ``(g + 1) % n``'s hot expert.

    Returns:
        ``r2o`` int64 ``[n, 1]``.
    """
    _check_positive("n", n, minimum=2)
    return ((torch.arange(n, dtype=torch.int64) + 1) % n).unsqueeze(1)


def cube() -> torch.Tensor:
    """Upstream's 8x2 "cube": two rings of four plus the link between the two halves.

    Returns:
        ``r2o`` int64 ``[8, 2]``.
    """
    return torch.tensor(
        [[3, 0, 1, 2, 7, 4, 5, 6], [6, 7, 4, 5, 0, 1, 2, 3]], dtype=torch.int64
    ).t().contiguous()


def hypercube() -> torch.Tensor:
    """Upstream's 16x2 "hypercube": four rings of four, second column ``(g + 12) % 16``.

    Returns:
        ``r2o`` int64 ``[16, 2]``.
    """
    g = torch.arange(16, dtype=torch.int64)
    first = (g // 4) * 4 + (g + 3) % 4
    second = (g + 12) % 16
    return torch.stack([first, second], dim=1)


def torus_2d(m: int, n: int) -> torch.Tensor:
    """2-D torus of ``m x n`` ranks: rank ``i*n + j`` hosts copies of the hot experts
    of ``((i+1) % m)*n + j`` and ``i*n + (j+1) % n``.

    Returns:
        ``r2o`` int64 ``[m*n, 2]``.
    """
    _check_positive("m", m, minimum=2)
    _check_positive("n", n, minimum=2)
    i = torch.arange(m, dtype=torch.int64).repeat_interleave(n)
    j = torch.arange(n, dtype=torch.int64).repeat(m)
    return torch.stack([((i + 1) % m) * n + j, i * n + (j + 1) % n], dim=1)


def by_name(name: str, shape: list[int] | tuple[int, ...] | None = None) -> torch.Tensor:
    """Build a topology from its config name (``ring``, ``cube``, ``hypercube``,
    ``torus``); ``shape`` is ``[n]`` for ``ring`` and ``[m, n]`` for ``torus``."""
    if name == "ring":
        return ring(*(shape or [8]))
    if name == "cube":
        return cube()
    if name == "hypercube":
        return hypercube()
    if name == "torus":
        if shape is None or len(shape) != 2:
            raise LPLBInputError(f"torus topology needs shape=[m, n], got shape={shape!r}")
        return torus_2d(*shape)
    raise LPLBInputError(
        f"topology name={name!r} is unknown; expected one of 'ring', 'cube', 'hypercube', 'torus'"
    )


def validate_r2o(r2o: torch.Tensor) -> torch.Tensor:
    """Check an ``r2o`` tensor and return it as CPU int64.

    Raises:
        LPLBInputError: not 2-D, not integer, or a column that is not a permutation of
            ``range(group_size)``.
    """
    if not isinstance(r2o, torch.Tensor):
        r2o = torch.as_tensor(r2o)
    if r2o.dim() != 2:
        raise LPLBInputError(
            f"redundant_to_original must be 2-D [group_size, n_redundant], got shape {tuple(r2o.shape)}"
        )
    if r2o.dtype.is_floating_point or r2o.dtype == torch.bool or r2o.is_complex():
        raise LPLBInputError(f"redundant_to_original must be an integer tensor, got dtype {r2o.dtype}")
    r2o = r2o.detach().to("cpu", torch.int64)
    group_size, n_redundant = r2o.shape
    if group_size < 1 or n_redundant < 1:
        raise LPLBInputError(
            f"redundant_to_original must have group_size >= 1 and n_redundant >= 1, got shape {tuple(r2o.shape)}"
        )
    expected = torch.arange(group_size)
    for d in range(n_redundant):
        col = r2o[:, d]
        if not torch.equal(torch.sort(col).values, expected):
            raise LPLBInputError(
                f"redundant_to_original[:, {d}] = {col.tolist()} must be a permutation of range({group_size})"
            )
        if n_redundant and bool((col == expected).any()) and group_size > 1:
            g = int(torch.nonzero(col == expected)[0])
            raise LPLBInputError(
                f"redundant_to_original[{g}, {d}] = {g}: a rank cannot host a copy of its own expert"
            )
    return r2o


def _check_positive(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise LPLBInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
