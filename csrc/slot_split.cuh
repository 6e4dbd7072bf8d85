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
// H200, docs/benchmarks.md).
#pragma once

#include <cstdint>

#include "solve_view.cuh"
#if defined(__CUDACC__)
#include "pdl.cuh"
#endif

// The rows' arithmetic is LPLB_HD, so that the CPU build (solve_host.cpp) checks it
// against the reference on machines without a GPU; the kernels' loops over threads and
// blocks are device code.
namespace lplb {
namespace slots {

// Copies whose loads are issued together (movable_row).
constexpr int kCols = 4;

// Running sums out[0..C-1] of an expert with cnt copies (total: the last) into its
// cumulative shares; an expert with no tokens splits evenly.  The divisions are the
// reference's, rounded to nearest (a double division is IEEE's on the device too);
// div_nz spares the many zero shares the division's slow path.
LPLB_HD void normalise_row(const SlotSplit& s, double* out, double total, int64_t cnt) {
  for (int k = 0; k < s.n_cols; ++k) {
    double v = total > 0.0 ? blk::div_nz(out[k], total)
                           : blk::div_nz(static_cast<double>(k + 1), static_cast<double>(cnt < 1 ? 1 : cnt));
    v = v > 1.0 ? 1.0 : v;
    out[k] = k >= cnt - 1 ? 1.0 : v;
  }
}

// Copy k of an expert with cnt copies, at slot p (< 0: none) with xp tokens: x[p], and
// out[k] the running sum of the copies' tokens (clamped at 0) in copy order, as the
// reference sums them.
template <typename I>  // (int or int64_t: the index types of the caller's tables)
LPLB_HD void add_copy(const SlotSplit& s, double* out, int k, I cnt, I p, double xp, double& sum) {
  if (k < cnt && p >= 0) {
    s.x[p] = xp;
    sum = sum + (xp > 0.0 ? xp : 0.0);
  }
  out[k] = sum;  // running sums for now
}

// Expert e's row from its copies: x at its slots, cum[e, :] = out.  cnt: its copies;
// copy(k, p, xp) gives copy k's slot p (< 0: none) and its tokens xp (read only where
// k < cnt and p >= 0).  The arithmetic runs in copy order as the reference's.
template <typename Copy>
LPLB_HD void write_row(const SlotSplit& s, int e, int64_t cnt, Copy&& copy) {
  double* out = s.cum + static_cast<int64_t>(e) * s.n_cols;
  double sum = 0.0;
  for (int k = 0; k < s.n_cols; ++k) {
    int64_t p = -1;
    double xp = 0.0;
    copy(k, p, xp);
    add_copy(s, out, k, cnt, p, xp, sum);
  }
  normalise_row(s, out, sum, cnt);
}

// Expert e's row read from the placement's tables in global memory: its slots, their
// edges (graph numbering) and the flow the solve wrote there (edge_flow; never read for
// an expert that cannot move, whose slots are on no edge: those take load over the
// slot's share).
LPLB_HD void global_row(const SlotSplit& s, int e, double load, const double* edge_flow) {
  const int64_t* row = s.log2phy + static_cast<int64_t>(e) * s.n_cols;
  const int64_t cnt = s.logcnt[e];
  write_row(s, e, cnt, [&](int k, int64_t& p, double& xp) {
    p = row[k];
    if (k >= cnt || p < 0) return;
    const int g = s.slot_edge[p];
    xp = g >= 0 ? blk::div_nz(edge_flow[g], s.edge_mult[g]) : blk::div_nz(load, s.slot_share[p]);
  });
}

// The rows of the experts that cannot move (no slot on an edge: their tokens stay on
// their slots, load over each slot's share), every stride-th expert from first; a
// movable expert's row is its component's block's.
template <typename T>
LPLB_HD void fixed_rows(const SlotSplit& s, const T* loads, int first, int stride) {
  for (int e = first; e < s.n_logical; e += stride) {
    const int64_t p0 = s.logcnt[e] > 0 ? s.log2phy[static_cast<int64_t>(e) * s.n_cols] : -1;
    if (p0 >= 0 && s.slot_edge[p0] >= 0) continue;
    global_row(s, e, static_cast<double>(loads[e]), nullptr);
  }
}

// A movable expert's row from its line t of s.copies (ComponentArrays.copy_table: its
// copies, then each copy's slot and local edge): a copy's tokens are flow[edge] /
// edge_mult[edge], flow and edge_mult its component's local arrays (the solver's flow).
// Its copies are read kCols at a time, all loads of a batch before its stores.
LPLB_HD void movable_row(const SlotSplit& s, const int* t, int e, const double* flow, const int* edge_mult) {
  const int cnt = t[0];
  double* out = s.cum + static_cast<int64_t>(e) * s.n_cols;
  double sum = 0.0;
  for (int k0 = 0; k0 < s.n_cols; k0 += kCols) {
    int p[kCols], i[kCols];
LPLB_PRAGMA(unroll)
    for (int q = 0; q < kCols; ++q) {
      p[q] = k0 + q < s.n_cols ? t[1 + 2 * (k0 + q)] : -1;
      i[q] = k0 + q < s.n_cols ? t[2 + 2 * (k0 + q)] : -1;
    }
    double xp[kCols];
LPLB_PRAGMA(unroll)
    for (int q = 0; q < kCols; ++q) xp[q] = i[q] >= 0 ? blk::div_nz(flow[i[q]], edge_mult[i[q]]) : 0.0;
LPLB_PRAGMA(unroll)
    for (int q = 0; q < kCols; ++q) {
      if (k0 + q >= s.n_cols) break;
      add_copy(s, out, k0 + q, cnt, p[q], xp[q], sum);
    }
  }
  normalise_row(s, out, sum, cnt);
}

// Line m (global movable index) of s.copies.
LPLB_HD const int* copy_line(const SlotSplit& s, int m) {
  return s.copies + static_cast<int64_t>(m) * (1 + 2 * s.n_cols);
}

#if defined(__CUDACC__)
// A component's block after write_out: the rows of the component's movable experts,
// one per thread, and a fallback split (status 0) counted in s.total_fallback.
__device__ __forceinline__ void component_split(const CompArrays& a, int c, const View& v, int status,
                                                const SlotSplit& s, const double* flow) {
  if (threadIdx.x == 0 && status == 0 && s.total_fallback != nullptr)
    atomicAdd(reinterpret_cast<unsigned long long*>(s.total_fallback), 1ull);
  for (int m = threadIdx.x; m < v.M; m += blockDim.x)
    movable_row(s, copy_line(s, a.comp_exp_off[c] + m), v.exp_log[m], flow, v.edge_mult);
}

// A block at or past n_comp: the rows of the experts that cannot move (fixed_rows), one
// expert per thread, over blocks n_comp .. gridDim.x - 1.  Waits for the kernel before
// it like the component blocks (the loads are its output in Planner.run), and lets
// the map kernel in only then (see begin_solve).
template <typename T>
__device__ __forceinline__ void fixed_split(const SlotSplit& s, const T* loads, int n_comp) {
  pdl_wait();
  pdl_trigger();
  const int stride = (gridDim.x - n_comp) * blockDim.x;
  fixed_rows(s, loads, (blockIdx.x - n_comp) * blockDim.x + threadIdx.x, stride);
}
#endif

// Blocks past the components that fixed_split needs with `threads` threads per block.
inline int fixed_blocks(const SlotSplit& s, int threads) { return (s.n_logical + threads - 1) / threads; }

}  // namespace slots
}  // namespace lplb
