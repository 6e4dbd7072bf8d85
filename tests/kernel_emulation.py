"""The solve kernels' code built for the CPU (csrc/solve_host.cpp, through ctypes).

``csrc/block_ops.cuh`` makes the kernels' source a valid serial C++ program; compiling
it with the host compiler lets the tests check the kernels' algorithm against the
numpy/torch reference without a GPU.  Built once per source content into
``$LPLB_CACHE_DIR`` (default ``~/.cache/lplb_plugin``).
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from instances import instances, rel_diff
from lplb_plugin.component_arrays import ComponentArrays
from lplb_plugin.kernels import csrc_dir
from lplb_plugin.problem import SplitGraph
from lplb_plugin.solvers.exact import solve_exact


@dataclass
class HostSolve:
    edge_flow: torch.Tensor  # float64 [E]
    rank_load: torch.Tensor  # float64 [R]
    status: np.ndarray  # int32 [C]
    bound: np.ndarray  # float64 [C]
    iters: np.ndarray  # int32 [C, 2]
    arrays: ComponentArrays


def compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


# The GPU build fuses a * b + c into one rounding (nvcc's default); the host compiler
# does not unless asked.  A build with these flags brings the CPU's rounding closer to
# the GPU's, so that an algorithm that only works without fused multiply-adds fails
# here too (a Bareiss-form elimination passed the plain build and failed on the GPU).
FMA_FLAGS = ("-mfma", "-ffp-contract=fast")


def fma_supported() -> bool:
    """Whether this machine can run the FMA build: an x86-64 CPU with FMA."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and " fma " in f"{line} " for line in info.splitlines())


@lru_cache(maxsize=4)
def library(fma: bool = False, rounds_only: bool = False) -> ctypes.CDLL:
    """The CPU build of csrc/solve_host.cpp; ``fma``: with :data:`FMA_FLAGS`;
    ``rounds_only``: the one-warp exact solvers bound every component by their FISTA
    rounds, also those small enough for the enumerated bound (csrc/solve_pair.cuh's
    subset_bound; ``-DLPLB_NO_SUBSET_BOUND``, csrc/solve_host.cpp), so that the tests
    reach that path on them."""
    src = csrc_dir()
    files = sorted(src.glob("*.cuh")) + [src / "warp_emulation.h", src / "solve_host.cpp"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    cache = Path(os.environ.get("LPLB_CACHE_DIR", Path.home() / ".cache" / "lplb_plugin")) / "host"
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"solve_host_{digest}{'_fma' if fma else ''}{'_rounds' if rounds_only else ''}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [compiler(), "-std=c++20", "-O2", *(FMA_FLAGS if fma else ()),
             *(("-DLPLB_NO_SUBSET_BOUND",) if rounds_only else ()), "-Wall", "-Werror", "-shared", "-fPIC",
             "-pthread", str(src / "solve_host.cpp"), "-o", str(tmp)],
            check=True,
        )
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def _int_arrays(arrays: ComponentArrays) -> list[np.ndarray]:
    return [np.ascontiguousarray(t.numpy(), dtype=np.int32) for t in arrays.tensors()]


def _ipm_defaults() -> dict:
    """``max_iters`` and ``tol`` defaults of the torch IPM (lplb_plugin.solvers.ipm.solve_ipm)."""
    from lplb_plugin.solvers.ipm import solve_ipm

    params = inspect.signature(solve_ipm).parameters
    return {k: params[k].default for k in ("max_iters", "tol")}


def div_small(a: np.ndarray, n: np.ndarray) -> np.ndarray:
    """csrc/block_ops.cuh's ``blk::div_small(a, n, 1 / n)`` elementwise (float64)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    n = np.ascontiguousarray(np.broadcast_to(n, a.shape), dtype=np.float64)
    out = np.empty_like(a)
    c = ctypes.c_double
    assert library().lplb_div_small_host(_ptr(a, c), _ptr(n, c), ctypes.c_int(a.size), _ptr(out, c)) == 0
    return out


def fits_pair(graph: SplitGraph) -> bool:
    """Whether the one-warp two-copy solvers ("pair", "ipm_pair") take the graph:
    two-copy, components of at most 32 ranks and 64 experts."""
    a = ComponentArrays.from_graph(graph)
    return a.two_copy and a.max_ranks <= 32 and a.max_experts <= 64


def fits_exact_warp(graph: SplitGraph) -> bool:
    """Whether the one-warp any-placement solvers ("exact_warp", "ipm_warp") take the
    graph: components of at most 32 ranks, 32 movable experts and 32 edges."""
    a = ComponentArrays.from_graph(graph)
    return a.max_ranks <= 32 and a.max_experts <= 32 and a.max_edges <= 32


def solve_host(graph: SplitGraph, loads: torch.Tensor, method: str = "exact", fma: bool = False,
               rounds_only: bool = False, **options) -> HostSolve:
    """Run the kernels' solve on the CPU.  ``loads`` float64 ``[L]``.  ``method``:
    ``"exact"`` (option ``max_rounds``), ``"pair"`` (the exact method's one-warp
    two-copy solver, its warp emulated by 32 threads; same option; the graph must be
    two-copy with small components), ``"exact_warp"`` (the exact method's one-warp
    solver for components of at most 32 ranks, experts and edges, any placement,
    emulated likewise; same option), ``"ipm"`` (options ``max_iters``, ``tol``;
    defaults those of the torch IPM), ``"ipm_pair"`` (the IPM's one-warp two-copy
    solver, emulated likewise; same options and the same restriction as ``"pair"``)
    or ``"ipm_warp"`` (the IPM's one-warp solver for components of at most 32 ranks,
    experts and edges, any placement).  ``fma``: the build with fused multiply-adds
    (:func:`library`; needs :func:`fma_supported`); ``rounds_only``: the build without
    the one-warp exact solvers' enumerated bound (:func:`library`)."""
    arrays = ComponentArrays.from_graph(graph)
    lib = library(fma, rounds_only)
    ints = _int_arrays(arrays)
    ld = np.ascontiguousarray(loads.to(torch.float64).numpy())
    C = arrays.n_comp
    flow = np.zeros(graph.n_edges)
    rank = np.zeros(graph.n_ranks)
    status = np.zeros(C, np.int32)
    bound = np.zeros(C)
    iters = np.zeros(2 * C, np.int32)
    pi = [_ptr(a, ctypes.c_int) for a in ints]
    tail = [_ptr(flow, ctypes.c_double), _ptr(rank, ctypes.c_double), _ptr(status, ctypes.c_int),
            _ptr(bound, ctypes.c_double), _ptr(iters, ctypes.c_int)]
    if method in ("exact", "pair", "exact_warp"):
        fn = {"exact": lib.lplb_solve_exact_host, "pair": lib.lplb_solve_pair_host,
              "exact_warp": lib.lplb_solve_exact_warp_host}[method]
        rc = fn(ctypes.c_int(C), *pi, _ptr(ld, ctypes.c_double), ctypes.c_double(arrays.lipschitz),
                ctypes.c_int(options.get("max_rounds", 5)), *tail)
    elif method in ("ipm", "ipm_pair", "ipm_warp"):
        defaults = _ipm_defaults()
        fn = {"ipm": lib.lplb_solve_ipm_host, "ipm_pair": lib.lplb_solve_ipm_pair_host,
              "ipm_warp": lib.lplb_solve_ipm_warp_host}[method]
        rc = fn(ctypes.c_int(C), *pi, _ptr(ld, ctypes.c_double),
                ctypes.c_int(int(options.get("max_iters", defaults["max_iters"]))),
                ctypes.c_double(float(options.get("tol", defaults["tol"]))), *tail)
    else:
        raise ValueError(method)
    assert rc == 0
    return HostSolve(torch.from_numpy(flow), torch.from_numpy(rank), status, bound, iters.reshape(C, 2), arrays)


def slot_split_host(graph: SplitGraph, log2phy: torch.Tensor, logcnt: torch.Tensor, loads: torch.Tensor,
                    edge_flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-slot split ``x`` (float64 ``[P]``) and copy shares ``cum`` (float64
    ``[L, C]``) of ``edge_flow`` (float64 ``[E]``) as the solve kernels write them
    (csrc/slot_split.cuh, built for the CPU): from ComponentArrays.copy_table and each
    component's local flows, then the experts that cannot move."""
    arrays = ComponentArrays.from_graph(graph)
    lib = library()
    ints = _int_arrays(arrays)
    i32 = [np.ascontiguousarray(t.numpy(), dtype=np.int32) for t in (
        arrays.copy_table(graph, log2phy, logcnt), graph.slot_edge, graph.edge_mult, graph.log_slots_on_rank)]
    i64 = [np.ascontiguousarray(t.numpy(), dtype=np.int64) for t in (log2phy, logcnt)]
    ld = np.ascontiguousarray(loads.to(torch.float64).numpy())
    flow = np.ascontiguousarray(edge_flow.to(torch.float64).numpy())
    L, C = log2phy.shape
    x = np.full(graph.slot_edge.numel(), np.nan)
    cum = np.full((L, C), np.nan)
    rc = lib.lplb_slot_split_host(
        ctypes.c_int(arrays.n_comp), *[_ptr(a, ctypes.c_int) for a in ints], _ptr(i32[0], ctypes.c_int),
        ctypes.c_int(L), ctypes.c_int(C), _ptr(i64[0], ctypes.c_int64), _ptr(i64[1], ctypes.c_int64),
        _ptr(i32[1], ctypes.c_int), _ptr(i32[2], ctypes.c_int), _ptr(i32[3], ctypes.c_int),
        _ptr(ld, ctypes.c_double), _ptr(flow, ctypes.c_double), _ptr(x, ctypes.c_double), _ptr(cum, ctypes.c_double),
    )
    assert rc == 0
    return torch.from_numpy(x), torch.from_numpy(cum)


def failed_attempts_check(method: str, usable=lambda graph: True) -> int:
    """Components that certify only in a later round: each failed attempt stops as soon
    as the projection's dual proves its bound too low (exact::project), so together
    they cost fewer Newton iterations than one attempt's cap (30); before that check
    they ran to the cap (on these instances the reference took 34-66 iterations).
    The one-warp solvers run without their enumerated bound (``rounds_only``), which
    on small components certifies at once.  Returns how many such components were
    seen."""
    seen = 0
    for inst in instances(42, seed=11):
        if not usable(inst.graph):
            continue
        got = solve_host(inst.graph, inst.loads, method, rounds_only=method != "exact")
        ref = solve_exact(inst.graph, inst.loads)
        assert rel_diff(got.edge_flow, ref.edge_flow, float(inst.loads.max())) <= 1e-9, inst.name
        for rounds, newton in got.iters.tolist():
            if rounds >= 2:
                seen += 1
                assert newton < 30 * (rounds - 1), (inst.name, rounds, newton)
    return seen
