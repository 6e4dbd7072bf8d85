// S^-1 for the one-warp IPM's Newton matrix (SPD, up to 32 x 32), computed by helper
// warps: warp 0 of the block runs the solver and posts commands; warps 1 .. kHelpers
// serve them (serve()) and hold the inverse, so that the largest components' Newton
// systems are spread over several schedulers while everything else stays in one warp.
//
// Why an inverse, and why helpers: on the torus 8x4 component (32 ranks) the one-warp
// elimination (pair::factor_reg) and its substitutions were two thirds of the IPM's
// time (clock64 profile on H200, 4 iterations: assembly + elimination 74-76k cycles,
// substitutions + direction passes 57-62k, of ~170k).  The elimination is issue-bound
// in one warp (a step is ~110 instructions), the substitutions are chains of 63
// dependent shuffle + multiply-add steps.  With an explicit inverse a solve is a
// product whose terms are independent, and the inverse's updates are spread over the
// helpers.  Warp 0, which carries the solver's registers, takes no part in them (with
// warp 0 sharing the work, four warps: 63.6 us against 53.5 for warp 0 + four
// helpers; docs/benchmarks.md).
//
// The inverse is the symmetric sweep (Gauss-Jordan without pivoting, in place) taken
// two pivots at a time: step k eliminates rows and columns k and k + 1 through the
// inverse of their 2 x 2 block, adj / det with one division (det = p00 * s, the
// product of the two pivots L D L^T has there, s = p11 - p01^2 / p00).  Formed from
// 1 / p00 and 1 / s instead, two divisions on the step's chain, the torus IPM took
// 53.0 us instead of 50.5.  The pivot tests are L D L^T's: p00 > 0, and det > 0
// (s > 0); a failed one is counted (the IPM then rebuilds S with more
// regularisation, as after pair::factor_reg) and its pivot used as 1e-300.  By
// symmetry, row i's multipliers are entries of the two pivot rows, which the rows'
// owners publish in shared memory (double-buffered, one helpers' barrier per step): no
// shuffles, and every helper computes the same pivots.
//
// Layout: helper thread t (warp h + 1, lane i) holds row i, columns kCols * h ..
// kCols * h + kCols - 1, of the matrix and in the end of -S^-1.  Rows and columns from
// n on are the identity's (skipped).
#pragma once

#include "block_ops.cuh"

namespace lplb {
namespace team_inverse {

constexpr int kN = 32;                // the largest matrix; rows are lanes
constexpr int kHelpers = 4;           // helper warps (warps 1 .. kHelpers; 2 and 7 measured slower)
constexpr int kCols = kN / kHelpers;  // columns per helper thread
static_assert(kN % kHelpers == 0 && kCols % 2 == 0, "a step's pair of columns lies in one helper's block");
constexpr int kThreads = 32 * (1 + kHelpers);  // the block

// Commands: invert the matrix and apply the inverse to the two staged right-hand
// sides (the IPM's predictor); apply it to one (the corrector); leave.
enum Cmd : int { kInvert = 1, kApply1 = 2, kExit = 3 };

// Shared arrays of a team.
struct Smem {
  double* rows;  // [2][2][kN]: the pivot rows of a step, double-buffered
  double* rhs;   // [2][kN]: right-hand sides posted by warp 0
  double* part;  // [2][kHelpers][kN]: each helper warp's share of the products
  double* cmd;   // [3]: the posted command; the number of bad pivots; nu

  // Carves the arrays next in buf (a solver's Smem::layout; buf without a base: sizes
  // only).
  LPLB_HD static void carve(blk::Carve& buf, Smem& o) {
    buf.dbl(o.rows, 4 * kN);
    buf.dbl(o.rhs, 2 * kN);
    buf.dbl(o.part, 2 * kHelpers * kN);
    buf.dbl(o.cmd, 3);
  }
};

#if defined(__CUDA_ARCH__) || defined(LPLB_WARP_EMULATION)

// The block's barrier (named barrier 1; __syncthreads' 0 stays free): a command's
// start and end.
__device__ __forceinline__ void bar_all() {
#if defined(__CUDA_ARCH__)
  asm volatile("bar.sync 1, %0;" ::"r"(kThreads) : "memory");
#else
  ::lplb::emu::named_bar(1);
#endif
}

// The helpers' barrier (named barrier 2): the inverse's steps.
__device__ __forceinline__ void bar_helpers() {
#if defined(__CUDA_ARCH__)
  asm volatile("bar.sync 2, %0;" ::"r"(32 * kHelpers) : "memory");
#else
  ::lplb::emu::named_bar(2);
#endif
}

// A helper's entries of -S^-1: row (lane), columns kCols * h + q.
struct Part {
  double a[kCols];
};

// Helpers: -S^-1 into p for S = -A + nu off the diagonal and A on it (n <= kN, row i
// at A + i * lda, both triangles: the IPM's sums, ipm_pair::assemble<true>), leaving
// A's n x n entries zero for the next sums.  Returns the number of failed pivot tests
// (see above), the same in every helper.
__device__ __forceinline__ int invert(double* A, int n, int lda, double nu, const Smem& s, Part& p) {
  const int t = threadIdx.x, i = t & 31, c0 = ((t >> 5) - 1) * kCols;
LPLB_PRAGMA(unroll)
  for (int q = 0; q < kCols; ++q) {
    const int j = c0 + q;
    double* e = A + static_cast<size_t>(i) * lda + j;
    const bool in = i < n && j < n;
    p.a[q] = in ? (i == j ? *e : -*e + nu) : (i == j ? 1.0 : 0.0);
    if (in) *e = 0.0;
  }
  int bad = 0;
LPLB_PRAGMA(unroll)
  for (int k = 0; k < kN; k += 2) {
    if (k >= n) break;  // (uniform) the identity's rows are left as they are
    double* r0 = s.rows + (k & 2) * kN;
    double* r1 = r0 + kN;
    if (i == k)
LPLB_PRAGMA(unroll)
      for (int q = 0; q < kCols; ++q) r0[c0 + q] = p.a[q];
    if (i == k + 1)
LPLB_PRAGMA(unroll)
      for (int q = 0; q < kCols; ++q) r1[c0 + q] = p.a[q];
    bar_helpers();
    const double p00 = r0[k], p01 = r0[k + 1], p11 = r1[k + 1];
    const double ai0 = r0[i], ai1 = r1[i];  // a[i][k], a[i][k + 1] (symmetric)
    double x0[kCols], x1[kCols];
LPLB_PRAGMA(unroll)
    for (int q = 0; q < kCols; ++q) {
      x0[q] = r0[c0 + q];
      x1[q] = r1[c0 + q];
    }
    // the pair's inverse P = adj / det (one division on the step's chain, not two)
    const bool b0 = !(p00 > 0.0);
    const double det = p00 * p11 - p01 * p01;
    const bool b1 = !(det > 0.0);
    const double id = 1.0 / ((b0 || b1) ? 1e-300 : det);
    bad += (b0 ? 1 : 0) + (b1 ? 1 : 0);
    const double P11 = p00 * id, P01 = -p01 * id, P00 = p11 * id;
    // rows outside the pair: a - f x with f = (a[i][k], a[i][k + 1]) P, and f in the
    // pair's columns; the pair's rows: P x, and -P in the pair's columns
    const bool own0 = i == k, own1 = i == k + 1;
    const double m = (own0 || own1) ? 0.0 : 1.0;
    const double f0 = own0 ? -P00 : (own1 ? -P01 : ai0 * P00 + ai1 * P01);
    const double f1 = own0 ? -P01 : (own1 ? -P11 : ai0 * P01 + ai1 * P11);
LPLB_PRAGMA(unroll)
    for (int q = 0; q < kCols; ++q) p.a[q] = (m * p.a[q] - f0 * x0[q]) - f1 * x1[q];
    if (c0 == k - k % kCols) {  // (uniform over the warp) the pair's columns are this helper's
      p.a[k % kCols] = f0;
      p.a[(k + 1) % kCols] = f1;
    }
  }
  return bad;
}

// Helpers: their shares of u_r = S^-1 b_r (r < NB, b_r in s.rhs) into s.part.
template <int NB>
__device__ __forceinline__ void apply(const Part& p, const Smem& s) {
  const int t = threadIdx.x, i = t & 31, h = (t >> 5) - 1;
LPLB_PRAGMA(unroll)
  for (int r = 0; r < NB; ++r) {
    double acc = 0.0;
LPLB_PRAGMA(unroll)
    for (int q = 0; q < kCols; ++q) acc -= p.a[q] * s.rhs[r * kN + h * kCols + q];
    s.part[(r * kHelpers + h) * kN + i] = acc;
  }
}

// The whole block, before warp 0's first sums: A's n x n entries zero.
__device__ __forceinline__ void clear(double* A, int n, int lda) {
  for (int x = threadIdx.x; x < n * n; x += kThreads) A[static_cast<size_t>(x / n) * lda + x % n] = 0.0;
}

// Helpers: serve warp 0's commands on A (n x n, lda) until dismissed.  A command
// starts and ends with the block's barrier.
__device__ __forceinline__ void serve(double* A, int n, int lda, const Smem& s) {
  Part p;
  for (;;) {
    bar_all();
    const int cmd = static_cast<int>(s.cmd[0]);
    if (cmd == kExit) break;
    if (cmd == kInvert) {
      const int bad = invert(A, n, lda, s.cmd[2], s, p);
      if (threadIdx.x == 32) s.cmd[1] = bad;
      apply<2>(p, s);
    } else {
      apply<1>(p, s);
    }
    bar_all();
  }
}

// Warp 0: hands cmd to the helpers (waiting in serve()).
__device__ __forceinline__ void post(const Smem& s, Cmd cmd) {
  if (threadIdx.x == 0) s.cmd[0] = static_cast<double>(cmd);
  bar_all();
}

// Warp 0: runs cmd on the helpers and waits for its end.
__device__ __forceinline__ void run(const Smem& s, Cmd cmd) {
  post(s, cmd);
  bar_all();
}

// Warp 0: stages the right-hand sides b1 (and b2 when kTwo): lane i passes b1[i],
// b2[i]; lanes from n on pass anything (0 is used).
template <bool kTwo>
__device__ __forceinline__ void stage(int n, const Smem& s, double b1, double b2) {
  const int i = threadIdx.x;
  s.rhs[i] = i < n ? b1 : 0.0;
  if (kTwo) s.rhs[kN + i] = i < n ? b2 : 0.0;
}

// Warp 0: lane i's entries of the last products (r < 2), from the helpers' shares.
__device__ __forceinline__ double shares(const Smem& s, int r) {
  const int i = threadIdx.x;
  double u = 0.0;
LPLB_PRAGMA(unroll)
  for (int h = 0; h < kHelpers; ++h) u += s.part[(r * kHelpers + h) * kN + i];
  return u;
}

// Warp 0: the helpers invert S (from the sums in A and nu: invert()) and apply the
// inverse to the two staged right-hand sides (stage<true>).  Returns the number of
// bad pivots.
__device__ __forceinline__ int invert_on_helpers(const Smem& s, double nu) {
  if (threadIdx.x == 0) s.cmd[2] = nu;
  run(s, kInvert);
  return static_cast<int>(s.cmd[1]);
}

// Warp 0: lane i gets x1[i] = (S^-1 b1)[i] (and x2) for the right-hand sides b1 (and b2
// when kTwo) from the helpers' inverse; lanes from n on get 0.  With kTwo, the
// products of the staged right-hand sides, formed with the inverse (b1, b2 unused).
template <bool kTwo>
__device__ __forceinline__ void solve_on_helpers(int n, const Smem& s, double b1, double b2, double& x1, double& x2) {
  const int i = threadIdx.x;
  if (!kTwo) {
    stage<false>(n, s, b1, b2);
    run(s, kApply1);
  }
  x1 = i < n ? shares(s, 0) : 0.0;
  x2 = (kTwo && i < n) ? shares(s, 1) : 0.0;
}

// Warp 0, when it is done: lets the helpers leave serve().
__device__ __forceinline__ void dismiss(const Smem& s) { post(s, kExit); }

#endif  // __CUDA_ARCH__ || LPLB_WARP_EMULATION

}  // namespace team_inverse
}  // namespace lplb
