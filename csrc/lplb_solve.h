// Solve stage of the Planner on the GPU (torch-free C++ API); see lplb_solve.cu.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "solve_view.cuh"

namespace lplb {

// Largest component of the graph (sizes the per-block scratch); two_copy: every movable
// expert has exactly two edges; one_warp: small components may take the one-warp
// solvers (two-copy: solve_pair.cuh for exact, solve_ipm_pair.cuh for ipm; others:
// solve_exact_warp.cuh for exact, solve_ipm_warp.cuh for ipm).
struct SolveSizes {
  int max_ranks, max_experts, max_edges;
  bool two_copy, one_warp;
};

// Doubles of global memory per component that `method`'s kernel needs for components of
// these sizes (0 when a block's scratch fits in its shared memory on the current
// device): the R x R Newton / Schur matrix when only that does not fit, all of the
// scratch when even the rest does not.  The caller passes n_comp times that to
// solve_split.
size_t solve_global_doubles(const SolveSizes& sz, int method);

// One block per component, in one kernel.  loads: int32 or float64 [L] global tokens
// per logical expert.  method 0 = exact (lipschitz, max_rounds), 1 = ipm
// (ipm_max_iters, ipm_tol, as lplb_plugin.solvers.ipm.solve_ipm takes them).  global:
// solve_global_doubles(sz, method) doubles per component, or null when that is 0.
// Writes out (graph numbering), and the per-slot split x [P] and cumulative copy
// shares cum [L, C] into slots (the same kernel: slot_split.cuh); when
// slots.total_fallback is not null, the number of components whose status is 0 is
// added to it (a running count).  No host sync.
cudaError_t solve_split(const CompArrays& a, const SolveSizes& sz, const void* loads, bool loads_int32, int method,
                        double lipschitz, int max_rounds, const SolveOut& out, const SlotSplit& slots,
                        double* global, int ipm_max_iters, double ipm_tol, cudaStream_t stream);

}  // namespace lplb
