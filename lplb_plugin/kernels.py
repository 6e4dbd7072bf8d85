"""The CUDA path of the count, solve and map stages (``lplb_plugin._C``).

``setup.py`` builds ``lplb_plugin._C`` when a CUDA build of torch and nvcc are present
at install time (``LPLB_BUILD_CUDA=0/1`` forces it off/on; it needs
``pip install --no-build-isolation`` so the build sees torch).  Otherwise the first
use on a GPU JIT-compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` into
``$LPLB_CACHE_DIR`` (default ``~/.cache/lplb_plugin``), logging one line.  On a
machine without a GPU, or with ``LPLB_DISABLE_CUDA=1``, :func:`get` returns ``None``
and the torch path runs.  Count and map give bit-identical results to the torch path;
the solve kernels give the reference solvers' answer to float64 rounding (tests/gpu,
and tests/test_kernel_emulation.py for their CPU build).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .component_arrays import ComponentArrays
from .errors import LPLBInputError
from .problem import SplitGraph

__all__ = ["get", "count_tokens", "count_tokens_checked", "map_tokens", "csrc_dir", "DeviceSolver", "DeviceSplit"]

log = logging.getLogger("lplb_plugin")
_module = None
_tried = False


def csrc_dir() -> Path | None:
    """The CUDA sources: packaged next to the modules, or the repository's csrc/."""
    for cand in (Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc"):
        if (cand / "lplb_kernels.cu").exists():
            return cand
    return None


def get():
    """The compiled extension, or ``None`` when the torch path must be used."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("LPLB_DISABLE_CUDA") == "1" or not torch.cuda.is_available():
        return None
    try:
        from . import _C  # built by setup.py

        _module = _C
        return _module
    except ImportError:
        pass
    src = csrc_dir()
    if src is None:
        log.warning("lplb: no compiled CUDA kernels and no csrc/ sources found; using the torch path")
        return None
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("LPLB_CACHE_DIR", Path.home() / ".cache" / "lplb_plugin")) / (
        f"torch{torch.__version__.replace('+', '_')}"
    )
    build.mkdir(parents=True, exist_ok=True)
    log.info("lplb: JIT-compiling the CUDA kernels into %s (first use only)", build)
    try:
        _module = load(
            name="lplb_plugin_C",
            sources=[str(src / "binding.cpp"), str(src / "lplb_kernels.cu"), str(src / "lplb_solve.cu")],
            build_directory=str(build),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-std=c++17"],
            verbose=False,
        )
    except Exception as exc:  # a broken toolchain must not stop training: torch path
        log.warning("lplb: CUDA kernels failed to compile (%s); using the torch path", exc)
        _module = None
    return _module


def _check_totals(totals: torch.Tensor | None, device: torch.device, slot: int) -> None:
    """``totals``: None, or a contiguous int64 tensor of at least ``slot + 1`` entries on
    ``device`` (the kernels add to ``totals[slot]``)."""
    if totals is None:
        return
    if not (
        isinstance(totals, torch.Tensor) and totals.dtype == torch.int64 and totals.is_contiguous()
        and totals.device == device and totals.numel() > slot
    ):
        got = f"{totals.dtype} [{totals.numel()}] on {totals.device}" if isinstance(totals, torch.Tensor) else type(totals).__name__
        raise LPLBInputError(
            f"totals must be a contiguous int64 tensor of at least {slot + 1} entries on {device}, got {got}"
        )


def count_tokens(idx: torch.Tensor, n_logical: int, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA count stage; same contract as :func:`lplb_plugin.counting.count_tokens`."""
    counts, prefix, _ = get().count(idx, n_logical, n_chunks)
    return counts, prefix


def count_tokens_checked(
    idx: torch.Tensor, n_logical: int, n_chunks: int, totals: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`count_tokens` plus int32 ``[1]``: how many ids are neither ``-1`` nor in
    ``[0, n_logical)`` (read it later; reading it now would sync).  With ``totals``
    (int64, on ``idx``'s device), that number is also added to ``totals[0]`` by the
    kernel itself (a running count, no extra kernel)."""
    _check_totals(totals, idx.device, 0)
    return get().count(idx, n_logical, n_chunks, totals)


def map_tokens(
    idx: torch.Tensor,
    prefix: torch.Tensor,
    counts: torch.Tensor,
    cum_frac: torch.Tensor,
    log2phy: torch.Tensor,
    after_solve: bool = False,
) -> torch.Tensor:
    """CUDA map stage; same result as :func:`lplb_plugin.redirect.redirect` (with the
    count stage's ``prefix`` and ``counts`` of the same ``idx``).

    ``after_solve=True`` only when the last kernel launched on the current stream is
    :meth:`DeviceSolver.solve`'s (as in :meth:`Planner.run`): the map kernel then counts
    its part of ``idx`` while the solve still runs, and waits for the solve only to
    read ``cum_frac``.  With the default it is an ordinary launch: it starts once the
    kernels before it have ended, whatever they were.  The result is the same either
    way."""
    return get().map(idx, prefix, counts, cum_frac, log2phy, after_solve)


@dataclass(frozen=True)
class DeviceSplit:
    """One solve on the GPU; every tensor stays on the device (nothing is read back).

    Attributes:
        edge_flow: float64 ``[E]`` flow per edge of the graph.
        rank_loads: float64 ``[R]`` planned load per rank.
        status: int32 ``[C]`` per connected component: 1 = proven optimal (exact) or
            converged (ipm), 0 = fallback split (valid, not proven optimal).
        bound: float64 ``[C]`` the proven lower bound (exact) / objective (ipm).
        iters: int32 ``[C, 2]`` (rounds, Newton iterations) for exact, (iterations, 0)
            for ipm.
        x: float64 ``[P]`` tokens per physical slot.
        cum_frac: float64 ``[L, C]`` cumulative copy shares, as
            :func:`lplb_plugin.redirect.copy_fractions` defines them (bit for bit, given
            ``x``).
    """

    edge_flow: torch.Tensor
    rank_loads: torch.Tensor
    status: torch.Tensor
    bound: torch.Tensor
    iters: torch.Tensor
    x: torch.Tensor
    cum_frac: torch.Tensor


class DeviceSolver:
    """The solve kernels for one placement on one GPU: one thread block per connected
    component of the replica graph, which also writes the per-slot split.  Built once
    per placement (the index arrays and the copy table move to the device here);
    :meth:`solve` never synchronises and can be captured in a CUDA graph.

    Args:
        graph: the placement's :class:`~lplb_plugin.problem.SplitGraph`.
        log2phy: int ``[L, C]``; logcnt: int ``[L]`` (the placement's tables).
        device: a CUDA device.
    """

    METHODS = {"exact": 0, "ipm": 1}

    def __init__(self, graph: SplitGraph, log2phy: torch.Tensor, logcnt: torch.Tensor, device: torch.device) -> None:
        arrays = ComponentArrays.from_graph(graph)
        self.arrays = arrays.to(device)
        self._tensors = self.arrays.tensors()
        self.sizes = [arrays.n_comp, arrays.max_ranks, arrays.max_experts, arrays.max_edges, int(arrays.two_copy)]
        #: let small components take the one-warp solvers (two-copy components of at
        #: most 32 ranks and 64 experts: csrc/solve_pair.cuh for exact and
        #: csrc/solve_ipm_pair.cuh for ipm; other components of at most 32 ranks,
        #: experts and edges: csrc/solve_exact_warp.cuh for exact and
        #: csrc/solve_ipm_warp.cuh for ipm).  Same answers to rounding, faster; False
        #: forces the block kernels (the tests compare them).
        self.use_warp = True
        i32 = dict(dtype=torch.int32, device=device)
        self._graph = [
            graph.slot_edge.to(**i32).contiguous(),
            graph.edge_mult.to(**i32).contiguous(),
            graph.log_slots_on_rank.to(**i32).contiguous(),
            log2phy.to(device=device, dtype=torch.int64).contiguous(),
            logcnt.to(device=device, dtype=torch.int64).contiguous(),
            arrays.copy_table(graph, log2phy, logcnt).to(device).contiguous(),
        ]
        self.n_ranks = graph.n_ranks
        self.n_logical = graph.n_logical
        self.device = device

    def solve(
        self, loads: torch.Tensor, method: str = "exact", *, max_rounds: int = 5, ipm_max_iters: int = 100,
        ipm_tol: float = 1e-6, totals: torch.Tensor | None = None,
    ) -> DeviceSplit:
        """Split ``loads`` (``[L]`` global tokens per logical expert on this GPU; int32
        is read directly, other dtypes are converted to float64 first).

        ``method``: ``"exact"`` or ``"ipm"``; ``max_rounds`` (exact, 1..5),
        ``ipm_max_iters`` and ``ipm_tol`` as the reference solvers take them.
        ``totals``: optional int64 tensor on this device; the number of components
        whose split is a fallback (status 0) is added to ``totals[1]`` on the GPU.
        """
        if method not in self.METHODS:
            raise ValueError(f"method={method!r}; expected one of {sorted(self.METHODS)}")
        _check_totals(totals, loads.device, 1)
        if loads.dtype not in (torch.int32, torch.float64):
            loads = loads.to(torch.float64)
        out = get().solve(
            self._tensors, self.sizes + [int(self.use_warp)], self._graph, loads, self.n_ranks, self.METHODS[method],
            float(self.arrays.lipschitz), int(max_rounds), int(ipm_max_iters), float(ipm_tol), totals,
        )
        return DeviceSplit(*out)

    def global_scratch(self, method: str = "exact") -> int:
        """Doubles of GPU global memory per component that :meth:`solve` takes as the
        kernels' scratch with ``method``: 0 when a component's scratch fits in one
        block's shared memory, ``max_ranks**2`` when only the ``R x R`` Newton matrix
        moves out, more when everything does (components too large for shared memory
        are solved from global memory, slower, with no other limit).  Allocated per
        call from torch's caching allocator."""
        if method not in self.METHODS:
            raise ValueError(f"method={method!r}; expected one of {sorted(self.METHODS)}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return int(get().global_doubles(self.sizes[1:5], self.METHODS[method], index))
