// The per-slot split x[p] and the cumulative copy shares cum[e, :] of every logical
// expert (the bit-exact definition of lplb_plugin.redirect.copy_fractions), written by
// the solve kernels themselves (lplb_solve.cu), not by a kernel of their own:
//   * a component's block, once its flows are out, for the component's movable
//     experts (component_split), from a table built once per placement that names each
//     copy's slot and local edge, so that a row reads its flows where the solver left
//     them (one dependent load, the table's, instead of slot -> edge -> flow);
//   * blocks past the last component, for the experts that cannot move, whose split
//     depends on the loads only (fixed_split), while the components are solved.
// Why here: a kernel of their own after the solve cost every exact solve and run()
// graph 2.1-3.1 us (its launch, its wait for the solve's end and its own load chain;
// H200, docs/benchmarks.md).  Device code only.
#pragma once

#include <cstdint>

#include "pdl.cuh"
#include "solve_view.cuh"

namespace lplb {
namespace slots {

// Copies whose loads are issued together (component_split).
constexpr int kCols = 4;

// Running sums out[0..C-1] of an expert with cnt copies (total: the last) into its
// cumulative shares; an expert with no tokens splits evenly.
__device__ __forceinline__ void normalise_row(const SlotSplit& s, double* out, double total, int64_t cnt) {
  for (int k = 0; k < s.n_cols; ++k) {
    double v = total > 0.0 ? __ddiv_rn(out[k], total)
                           : __ddiv_rn(static_cast<double>(k + 1), static_cast<double>(cnt < 1 ? 1 : cnt));
    v = v > 1.0 ? 1.0 : v;
    out[k] = k >= cnt - 1 ? 1.0 : v;
  }
}

// Expert e's row from its copies: x at its slots, cum[e, :] = out.  cnt: its copies;
// copy(k, p, xp) gives copy k's slot p (< 0: none) and its tokens xp (read only where
// k < cnt and p >= 0).  The arithmetic runs in copy order as the reference's.
template <typename Copy>
__device__ __forceinline__ void write_row(const SlotSplit& s, int e, int64_t cnt, Copy&& copy) {
  double* out = s.cum + static_cast<int64_t>(e) * s.n_cols;
  double sum = 0.0;
  for (int k = 0; k < s.n_cols; ++k) {
    int64_t p = -1;
    double xp = 0.0;
    copy(k, p, xp);
    if (k < cnt && p >= 0) {
      s.x[p] = xp;
      sum = sum + (xp > 0.0 ? xp : 0.0);
    }
    out[k] = sum;  // running sums for now
  }
  normalise_row(s, out, sum, cnt);
}

// Expert e's row read from the placement's tables in global memory: its slots, their
// edges (graph numbering) and the flow the solve wrote there (edge_flow; never read for
// an expert that cannot move, whose slots are on no edge: those take load over the
// slot's share).
__device__ __forceinline__ void global_row(const SlotSplit& s, int e, double load, const double* edge_flow) {
  const int64_t* row = s.log2phy + static_cast<int64_t>(e) * s.n_cols;
  const int64_t cnt = s.logcnt[e];
  write_row(s, e, cnt, [&](int k, int64_t& p, double& xp) {
    p = row[k];
    if (k >= cnt || p < 0) return;
    const int g = s.slot_edge[p];
    xp = g >= 0 ? edge_flow[g] / s.edge_mult[g] : load / s.slot_share[p];
  });
}

// A component's block after write_out: the rows of the component's movable experts,
// one per thread, from s.copies (ComponentArrays.copy_table: per expert its copies'
// slots and local edges, so a copy's tokens are flow[edge] / v.edge_mult[edge] with
// flow the solver's local flow array), and a fallback split (status 0) counted in
// s.total_fallback.  An expert's copies are read kCols at a time, all loads of a batch
// before its stores.
__device__ __forceinline__ void component_split(const CompArrays& a, int c, const View& v, int status,
                                                const SlotSplit& s, const double* flow) {
  if (threadIdx.x == 0 && status == 0 && s.total_fallback != nullptr)
    atomicAdd(reinterpret_cast<unsigned long long*>(s.total_fallback), 1ull);
  const int stride = 1 + 2 * s.n_cols;
  for (int m = threadIdx.x; m < v.M; m += blockDim.x) {
    const int* t = s.copies + static_cast<int64_t>(a.comp_exp_off[c] + m) * stride;
    const int e = v.exp_log[m];
    const int cnt = t[0];
    double* out = s.cum + static_cast<int64_t>(e) * s.n_cols;
    double sum = 0.0;
    for (int k0 = 0; k0 < s.n_cols; k0 += kCols) {
      int p[kCols], i[kCols];
#pragma unroll
      for (int q = 0; q < kCols; ++q) {
        p[q] = k0 + q < s.n_cols ? t[1 + 2 * (k0 + q)] : -1;
        i[q] = k0 + q < s.n_cols ? t[2 + 2 * (k0 + q)] : -1;
      }
      double xp[kCols];
#pragma unroll
      for (int q = 0; q < kCols; ++q) xp[q] = i[q] >= 0 ? flow[i[q]] / v.edge_mult[i[q]] : 0.0;
#pragma unroll
      for (int q = 0; q < kCols; ++q) {
        if (k0 + q >= s.n_cols) break;
        if (k0 + q < cnt && p[q] >= 0) {
          s.x[p[q]] = xp[q];
          sum = sum + (xp[q] > 0.0 ? xp[q] : 0.0);
        }
        out[k0 + q] = sum;  // running sums for now
      }
    }
    normalise_row(s, out, sum, cnt);
  }
}

// A block at or past n_comp: the rows of the experts that cannot move (no slot on an
// edge), one per thread, over blocks n_comp .. gridDim.x - 1.  Waits for the kernel
// before it like the component blocks (the loads are its output in Planner.run).
template <typename T>
__device__ __forceinline__ void fixed_split(const SlotSplit& s, const T* loads, int n_comp) {
  pdl_wait();
  pdl_trigger();
  const int stride = (gridDim.x - n_comp) * blockDim.x;
  for (int e = (blockIdx.x - n_comp) * blockDim.x + threadIdx.x; e < s.n_logical; e += stride) {
    const int64_t p0 = s.logcnt[e] > 0 ? s.log2phy[static_cast<int64_t>(e) * s.n_cols] : -1;
    if (p0 >= 0 && s.slot_edge[p0] >= 0) continue;  // movable: its component's block writes it
    global_row(s, e, static_cast<double>(loads[e]), nullptr);
  }
}

// Blocks past the components that fixed_split needs with `threads` threads per block.
inline int fixed_blocks(const SlotSplit& s, int threads) { return (s.n_logical + threads - 1) / threads; }

}  // namespace slots
}  // namespace lplb
