// Exact split of one component in one warp, for components whose movable experts all
// have exactly two edges (copies on two ranks: every upstream topology) and that are
// small: at most kMaxRanks ranks, kMaxExperts experts and kMaxDegree edges per rank.
// Device code; the CPU build for the tests emulates the warp (warp_emulation.h).
//
// The same steps and the same answer as exact::solve (solve_exact.cuh), which stays
// the reference kernel and handles every other component: FISTA sweeps order the
// ranks, the best prefix gives the bound, and the semismooth-Newton projection of the
// even split certifies it (when no component has more than kSubsetRanks ranks, the
// first bound comes from every rank set instead: subset_bound; the same unique
// answer, one round).  What differs is where the data lives and what the
// critical path costs.  exact::solve keeps everything in shared memory and walks CSR
// lists in every pass, one work item per thread, and a Newton iteration there is a
// chain of ~15 block steps (the LDL^T alone one per rank).  Here:
//   * each lane keeps its rank (lane r) and its experts (lanes m, m + 32) in registers,
//     with its rank's edge ids; an expert reads its two ranks' values with one shuffle
//     each, a rank sums its edges' values from a shared array indexed by edge;
//   * reductions are warp butterflies, two at a time where a pass needs two;
//   * the Newton system, over the active ranks only (as in exact::solve), is solved
//     by Gauss-Jordan over the whole warp, two entries per lane, when at most 8
//     ranks are active (solve_gj8), else by Gaussian elimination with lane i owning
//     row i in shared memory (solve_spd; padded rows: no bank conflicts); SPD, no
//     pivoting, one reciprocal per column on the critical path;
//   * divisions by a Hessian diagonal become products with its reciprocal, formed
//     once per projection for each of the three supports an expert can have;
//   * the fixed loads, up to 32 entries per rank at EP8, are summed by 32 / R lanes
//     per rank.
// Measured on H100 (docs/benchmarks.md): 2-3x faster than exact::solve on 8-rank
// components.  Its own clock64 profile (build with -DLPLB_PROF): on the slowest cube
// EP32 component (4 Newton iterations, ~48k cycles) the elimination was ~40%
// (~5k cycles per Newton iteration at 8 active ranks; ~2.8k with factor_reg, ~1.75k
// with solve_gj8), the gradient and Schur passes ~25%, setup, FISTA and the bound
// ~20%.  Both kernels
// agree to rounding (tests/gpu/test_solve_kernels.py compares them on every two-copy
// placement).
#pragma once

#include "block_ops.cuh"
#include "solve_exact.cuh"
#include "solve_view.cuh"

namespace lplb {
namespace pair {

constexpr int kMaxRanks = 32;
constexpr int kMaxExperts = 64;  // two per lane
constexpr int kMaxDegree = 8;    // edges per rank kept in registers
constexpr int kSubsetRanks = 8;  // components this small: the bound by enumeration (subset_bound)

// Whether the one-warp exact solvers take their instances with the enumerated bound,
// from the largest component's ranks and movable experts (one expert per lane): the
// CUDA launcher's choice, and the CPU build's.
constexpr bool takes_subsets(int max_ranks, int max_experts) {
  return max_ranks <= kSubsetRanks && max_experts <= 32;
}

#if defined(__CUDA_ARCH__) || defined(LPLB_WARP_EMULATION)

constexpr unsigned kFull = 0xffffffffu;

using Prof = blk::Prof<true>;  // phase timers of -DLPLB_PROF builds

// A block's static shared array (subset_bound's table); the CPU build solves one
// component at a time, so one array serves its 32 lane threads.
#if defined(__CUDA_ARCH__)
#define LPLB_WARP_SHARED __shared__
#else
#define LPLB_WARP_SHARED static
#endif

// Butterfly reductions; lane 0's result is broadcast so every lane holds the same bits.
__device__ __forceinline__ double wsum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += shfl_xor(v, off);
  return shfl(v, 0);
}

__device__ __forceinline__ double wmax(double v) {
  for (int off = 16; off > 0; off >>= 1) v = blk::nanmax(v, shfl_xor(v, off));
  return shfl(v, 0);
}

// max and sum at once (independent chains, so the shuffles overlap)
__device__ __forceinline__ void wmax_sum(double& mx, double& sm) {
  for (int off = 16; off > 0; off >>= 1) {
    const double a = shfl_xor(mx, off), b = shfl_xor(sm, off);
    mx = blk::nanmax(mx, a);
    sm += b;
  }
  mx = shfl(mx, 0);
  sm = shfl(sm, 0);
}

// N warp reductions at once (independent chains, so the shuffles overlap): slot k is a
// sum, or a NaN-propagating max when bit k of kMaxMask is set.  Every lane gets lane
// 0's bits.
template <int N, unsigned kMaxMask>
__device__ __forceinline__ void wreduce(double (&acc)[N]) {
  for (int off = 16; off > 0; off >>= 1) {
    double o[N];
LPLB_PRAGMA(unroll)
    for (int k = 0; k < N; ++k) o[k] = shfl_xor(acc[k], off);
LPLB_PRAGMA(unroll)
    for (int k = 0; k < N; ++k) acc[k] = ((kMaxMask >> k) & 1u) ? blk::nanmax(acc[k], o[k]) : acc[k] + o[k];
  }
LPLB_PRAGMA(unroll)
  for (int k = 0; k < N; ++k) acc[k] = shfl(acc[k], 0);
}

// A x = b for SPD A (n <= 32, row i at A + i * lda), one warp; lane i passes b[i] and
// gets x[i] (0 beyond n).  Gaussian elimination without pivoting (SPD), lane i
// updating its own row in shared memory (A is overwritten); a pivot <= 0 (not
// numerically SPD) is used as 1e-300, as blk::ldlt_factor does.  (Measured on H100:
// faster than keeping the row in registers and publishing the pivot row, and than
// register elimination with shuffles unrolled for 16-32 rows.  Up to 8 active ranks
// solve_gj8 is faster: docs/benchmarks.md.)
__device__ __forceinline__ double solve_spd(double* A, int n, int lda, double rhs) {
  const int i = threadIdx.x;
  const bool has = i < n;
  double r = has ? rhs : 0.0, my_inv = 0.0;
  double* row = A + static_cast<size_t>(i) * lda;
  for (int k = 0; k < n; ++k) {
    __syncwarp();  // row k is final
    const double* rk = A + static_cast<size_t>(k) * lda;
    const double d = rk[k];
    const double inv = 1.0 / (d > 0.0 ? d : 1e-300);
    if (i == k) my_inv = inv;
    const double bk = shfl(r, k);
    if (has && i > k) {
      const double f = row[k] * inv;
      for (int j = k + 1; j < n; ++j) row[j] -= f * rk[j];
      r -= f * bk;
    }
  }
  __syncwarp();
  double x = 0.0;
  for (int k = n - 1; k >= 0; --k) {
    if (i == k) x = r * my_inv;
    const double xk = shfl(x, k);
    if (has && i < k) r -= row[k] * xk;
  }
  __syncwarp();  // A may be rebuilt next
  return x;
}

// A x = b for SPD A (n <= 8, row i at A + i * lda), by Gauss-Jordan over the whole
// warp: lane 4 i + c holds A[i][c] and A[i][c + 4] and a copy of b[i] (rows and
// columns from n on act as the identity).  Lane i passes b[i] and gets x[i] (0 beyond
// n).  Step k brings each lane the pivot, its row's multiplier and the pivot row's
// entries in its columns by five independent shuffles, then one reciprocal and three
// updates, so a step's critical path is a shuffle, a division, a product and a fused
// multiply-add; the elimination with a row per lane (factor_reg) fetches the pivot
// row the same way but leaves two substitutions, chains of n shuffles each.  No
// pivoting (SPD); a pivot <= 0 is used as 1e-300, as in solve_spd.  Not the same
// rounding as solve_spd: the projection reaches the same point either way, to its
// convergence tolerance.  (Not kept: Bareiss's fraction-free form, which takes the
// division off the critical path; with fused multiply-adds, as nvcc emits them, its
// near-singular systems (a tight component's Laplacian plus the 1e-12 regularisation)
// lost the Newton direction: cube EP64 components took 17-20 Newton iterations
// instead of 2, in the CPU build with -mfma -ffp-contract=fast as on the GPU.)
__device__ __forceinline__ double solve_gj8(const double* A, int n, int lda, double rhs) {
  const int l = threadIdx.x, i = l >> 2, c = l & 3;
  __syncwarp();  // the rows are final
  // (rows from n on may lie past the caller's array: their lanes address row 0, and
  // the selects below never use what they would read)
  const double* row = A + static_cast<size_t>(i < n ? i : 0) * lda;
  double a0 = (i < n && c < n) ? row[c] : (i == c ? 1.0 : 0.0);
  double a1 = (i < n && c + 4 < n) ? row[c + 4] : (i == c + 4 ? 1.0 : 0.0);
  double b = shfl(l < n ? rhs : 0.0, i);
LPLB_PRAGMA(unroll)
  for (int k = 0; k < 8; ++k) {
    if (k >= n) break;
    const int src = 4 * k + c;
    const double dkk = shfl(k < 4 ? a0 : a1, 4 * k + (k & 3));
    const double mik = shfl(k < 4 ? a0 : a1, 4 * i + (k & 3));
    const double p0 = shfl(a0, src), p1 = shfl(a1, src);
    const double bk = shfl(b, 4 * k);
    const double inv = 1.0 / (dkk > 0.0 ? dkk : 1e-300);
    // row k: p / pivot; the others: a - (multiplier / pivot) p (selects, not a branch)
    const bool piv = i == k;
    const double f = piv ? -inv : mik * inv;
    a0 = (piv ? 0.0 : a0) - f * p0;
    a1 = (piv ? 0.0 : a1) - f * p1;
    b = (piv ? 0.0 : b) - f * bk;
  }
  const double x = shfl(b, 4 * (l & 7));
  __syncwarp();  // A may be rebuilt next
  return l < n ? x : 0.0;
}

// Gaussian elimination of an SPD A (n <= NR, row i at A + i * lda) without pivoting,
// row i in lane i's registers (rows and columns from n to NR act as the identity):
// step k takes row k by shuffles and updates rows i > k, keeping the multipliers
// L[i][k] in place of the eliminated entries, so that several right-hand sides can be
// substituted with one factor (subst_reg).  inv: lane i's 1 / pivot.  Pivots <= 0
// are used as 1e-300, as blk::ldlt_factor does; returns whether lane i's was one
// (false from n on), so that a caller that counts them votes (the IPM) and one that
// does not skips the vote (the exact projection).  Every index is a compile-time constant.  With subst_reg,
// the same operations in the same order as solve_spd.  (Measured on H200 against
// the elimination on rows in shared memory: the IPM's factor and substitutions ~1.8x
// faster at 8 ranks, its whole solve 5% faster at 32; applying each shuffled entry
// as it arrives instead of fetching the whole row first was slower.  The IPM keeps
// the factor for two substitutions; the exact projection, one right-hand side,
// takes solve_gj8.)
template <int NR>
__device__ __forceinline__ bool factor_reg(const double* A, int n, int lda, double (&a)[NR], double& inv) {
  const int i = threadIdx.x;
  const double* row = A + static_cast<size_t>(i) * lda;
LPLB_PRAGMA(unroll)
  for (int j = 0; j < NR; ++j) a[j] = (i < n && j < n) ? row[j] : (i == j ? 1.0 : 0.0);
  bool my_bad = false;
  auto recip = [&](double d) {
    my_bad = !(d > 0.0);
    inv = 1.0 / (my_bad ? 1e-300 : d);
  };
  inv = 0.0;
  if (i == 0) recip(a[0]);
LPLB_PRAGMA(unroll)
  for (int k = 0; k < NR - 1; ++k) {
    const double ik = shfl(inv, k);
    double rk[NR];
LPLB_PRAGMA(unroll)
    for (int j = k + 1; j < NR; ++j) rk[j] = shfl(a[j], k);
    if (i > k) {
      const double l = a[k] * ik;
      a[k] = l;
LPLB_PRAGMA(unroll)
      for (int j = k + 1; j < NR; ++j) a[j] -= l * rk[j];
      if (i == k + 1) recip(a[k + 1]);
    }
  }
  __syncwarp();  // (the rows in shared memory may be rebuilt)
  return i < n && my_bad;
}

// Solves A x = b with factor_reg's factor: lane i passes b1[i] (and b2[i] when kTwo)
// and gets x1[i] (and x2[i]); lanes from n on pass anything.  (kTwo is a template
// argument: as a runtime flag each step branched around the second right-hand side's
// shuffles, and the branch sat on the substitution's chain.)
template <int NR, bool kTwo>
__device__ __forceinline__ void subst_reg(const double (&a)[NR], int n, double inv, double b1, double b2, double& x1,
                                          double& x2) {
  const int i = threadIdx.x;
  double p = i < n ? b1 : 0.0, q = (kTwo && i < n) ? b2 : 0.0;
LPLB_PRAGMA(unroll)
  for (int k = 0; k < NR - 1; ++k) {
    const double pk = shfl(p, k);
    const double qk = kTwo ? shfl(q, k) : 0.0;
    if (i > k) {
      p -= a[k] * pk;
      q -= a[k] * qk;
    }
  }
  x1 = 0.0;
  x2 = 0.0;
LPLB_PRAGMA(unroll)
  for (int k = NR - 1; k >= 0; --k) {
    if (i == k) {
      x1 = p * inv;
      x2 = q * inv;
    }
    const double v1 = shfl(x1, k);
    const double v2 = kTwo ? shfl(x2, k) : 0.0;
    if (i < k) {
      p -= a[k] * v1;
      q -= a[k] * v2;
    }
  }
}

// Shared arrays of one block (carved from exact::Work).
struct Smem {
  double *e1, *e2;        // [E] per-edge values written by the experts
  double *g_a, *inv_dal;  // [M]
  double* schur;          // [R x (R + 1)], padded rows
  double* gain;           // [R]
  int *cpos, *owner;      // [R]: a rank's row of the Newton system (-1: inactive), a row's rank
};

// Registers of one lane: its rank (lane < R) and its experts j (m = lane + 32 j < M).
template <int J>
struct Lane {
  static constexpr int kJ = J;
  // rank
  bool has_rank;
  int deg;
  int edges[kMaxDegree];    // the rank's edges, rank_edges order
  int partner[kMaxDegree];  // the rank at each edge's other end
  int more_lo, more_hi;   // rank_edges range of edges beyond kMaxDegree (none if equal)
  double fixed, load, cap, beta, d_b, g_b;
  bool active, sticky, was_released;
  bool pinned;  // in the best prefix behind the bound (exact::prefix_bound's kstar)
  // experts
  bool has[J];
  int ra[J], rb[J];
  double ma[J], mb[J];  // slots on each rank (edge multiplicities)
  double pa[J], pb[J];  // the same in the projection: 0 on an edge into the pinned prefix
                        // from outside it (project)
  double c[J], x0[J], alpha[J], d_a[J], g_a[J], inv_dal[J], wa[J], wb[J];
  double y0[J], y1[J], z0[J], z1[J], b0[J], b1[J];
};

// Per-rank sums over the rank's edges (rank_edges order, as exact::rank_loads) of one
// or two per-edge arrays written by the experts before the call.
template <typename Ln>
__device__ __forceinline__ double rank_sum(const View& v, const Ln& L, const double* val) {
  __syncwarp();
  double s = 0.0;
LPLB_PRAGMA(unroll)
  for (int q = 0; q < kMaxDegree; ++q)
    if (q < L.deg) s += val[L.edges[q]];
  for (int q = L.more_lo; q < L.more_hi; ++q) s += val[v.rank_edges[q]];
  __syncwarp();  // val may be rewritten next
  return s;
}

template <typename Ln>
__device__ __forceinline__ void rank_sum2(const View& v, const Ln& L, const double* a, const double* b, double& sa,
                                          double& sb) {
  __syncwarp();
  sa = 0.0;
  sb = 0.0;
LPLB_PRAGMA(unroll)
  for (int q = 0; q < kMaxDegree; ++q)
    if (q < L.deg) {
      sa += a[L.edges[q]];
      sb += b[L.edges[q]];
    }
  for (int q = L.more_lo; q < L.more_hi; ++q) {
    sa += a[v.rank_edges[q]];
    sb += b[v.rank_edges[q]];
  }
  __syncwarp();
}

// Each expert's two edge values into arr (edges 2m and 2m + 1).  f runs on every lane
// for every j (it may shuffle); only present experts store.
template <typename Ln, typename F>
__device__ __forceinline__ void put_edges(const Ln& L, double* arr, F&& f) {
LPLB_PRAGMA(unroll)
  for (int j = 0; j < Ln::kJ; ++j) {
    const int m = threadIdx.x + 32 * j;
    double e0, e1;
    f(j, e0, e1);
    if (L.has[j]) {
      arr[2 * m] = e0;
      arr[2 * m + 1] = e1;
    }
  }
}

// A rank lane's register at each expert's two ranks.
template <typename Ln>
__device__ __forceinline__ void at_ranks(const Ln& L, double rank_val, int j, double& va, double& vb) {
  va = shfl(rank_val, L.ra[j]);
  vb = shfl(rank_val, L.rb[j]);
}

// A lane's rank (lane < R): its edges (rank_edges order, up to kMaxDegree in
// registers, the rest as a range of rank_edges) and its fixed load; 0 beyond R.
template <typename Ln, typename T>
__device__ __forceinline__ void setup_rank(const View& v, const T* loads, Ln& L) {
  const int lane = threadIdx.x;
  L.has_rank = lane < v.R;
  const int lo = L.has_rank ? v.rank_ptr[lane] : 0, hi = L.has_rank ? v.rank_ptr[lane + 1] : 0;
  L.deg = hi - lo < kMaxDegree ? hi - lo : kMaxDegree;
LPLB_PRAGMA(unroll)
  for (int q = 0; q < kMaxDegree; ++q) L.edges[q] = q < L.deg ? v.rank_edges[lo + q] : 0;
  L.more_lo = lo + L.deg;
  L.more_hi = hi;
  // Fixed loads: G = 32 / Rp lanes per rank (Rp: R rounded up to a power of two), each
  // summing every G-th entry of the rank's list, then a butterfly over those lanes.
  // A rank may own dozens of fixed experts (EP8: 32), and one lane walking the list
  // waits on two dependent global loads per entry (measured: ~15k cycles at EP8).
  int Rp = 1;
  while (Rp < v.R) Rp <<= 1;
  const int rr = lane & (Rp - 1), G = 32 / Rp;
  double fs = rr < v.R ? fixed_load(v, loads, rr, lane / Rp, G) : 0.0;
  for (int off = Rp; off < 32; off <<= 1) fs += shfl_xor(fs, off);
  L.fixed = L.has_rank ? fs : 0.0;
}

// setup_rank, the rank at each of its edges' other end, and the lane's experts
// (lane + 32 j < M: their two ranks and slots), with each expert's demand in dem[j];
// 0 where absent.
template <typename Ln, typename T>
__device__ __forceinline__ void setup_lane(const View& v, const T* loads, Ln& L, double (&dem)[Ln::kJ]) {
  const int lane = threadIdx.x;
  setup_rank(v, loads, L);
LPLB_PRAGMA(unroll)
  for (int q = 0; q < kMaxDegree; ++q) L.partner[q] = q < L.deg ? v.edge_rank[L.edges[q] ^ 1] : 0;
LPLB_PRAGMA(unroll)
  for (int j = 0; j < Ln::kJ; ++j) {
    const int m = lane + 32 * j;
    L.has[j] = m < v.M;
    L.ra[j] = L.has[j] ? v.edge_rank[2 * m] : 0;
    L.rb[j] = L.has[j] ? v.edge_rank[2 * m + 1] : 0;
    L.ma[j] = L.has[j] ? static_cast<double>(v.edge_mult[2 * m]) : 0.0;
    L.mb[j] = L.has[j] ? static_cast<double>(v.edge_mult[2 * m + 1]) : 0.0;
    dem[j] = L.has[j] ? static_cast<double>(loads[v.exp_log[m]]) : 0.0;
  }
}

// Loads of a flow (f(j, e0, e1) gives expert j's edge flows) into L.load; returns
// their max.
template <int J, typename F>
__device__ __forceinline__ double loads_of(const View& v, Lane<J>& L, double* arr, F&& flow) {
  put_edges(L, arr, flow);
  L.load = L.fixed + rank_sum(v, L, arr);
  return wmax(L.has_rank ? L.load : -HUGE_VAL);
}

// exact::prefix_bound on the loads in L.load; pin: whether this lane's rank is in the
// shortest best prefix.
template <int J>
__device__ double prefix_bound(const View& v, Lane<J>& L, const Smem& sm, bool& pin) {
  const int R = v.R;
  int pos = 0;
  for (int q = 0; q < R; ++q) {
    const double lq = shfl(L.load, q);
    pos += (lq > L.load || (lq == L.load && q < static_cast<int>(threadIdx.x))) ? 1 : 0;
  }
  // each expert's demand counts at its later rank in the order
  const double posd = static_cast<double>(pos);
  put_edges(L, sm.e1, [&](int j, double& e0, double& e1) {
    double pa, pb;
    at_ranks(L, posd, j, pa, pb);
    e0 = pa > pb ? L.c[j] : 0.0;
    e1 = pb > pa ? L.c[j] : 0.0;
  });
  const double s = rank_sum(v, L, sm.e1);
  if (L.has_rank) sm.gain[pos] = L.fixed + s;
  __syncwarp();
  if (threadIdx.x == 0) {  // left to right, as the reference
    double acc = 0.0;
    for (int p = 0; p < R; ++p) {
      acc += sm.gain[p];
      sm.gain[p] = acc;
    }
  }
  __syncwarp();
  const int p = threadIdx.x;
  const double ratio = p < R ? sm.gain[p] / (p + 1) : -HUGE_VAL;
  const double best = wmax(ratio);
  const unsigned at = __ballot_sync(kFull, p < R && ratio == best);
  pin = L.has_rank && pos < __ffs(at);  // (__ffs: 1 + the first position; 0 if none)
  return best;
}

// The bound of every rank set U of a component of at most kSubsetRanks ranks,
// g(U) / |U| (exact::prefix_bound's g: the fixed loads of U's ranks and the demand of
// the experts with every copy in U), eight sets per lane.  Max-flow/min-cut makes the
// best of them the component's optimum, so no FISTA order is needed and the first
// projection certifies.  Lane r passes its rank's fixed load (0 from R on); item
// k = lane + 32 j passes a demand c[j] and the set of ranks holding its copies,
// mask[j] (0: no item; an item with c = 0 adds nothing).  pin: whether lane r's rank
// lies in a set reaching the bound; those sets are closed under union, so the pinned
// ranks form the largest, and every split under the bound loads each of them exactly
// to it (what the projections' cut edges and sticky ranks rely on).
//
// g is the subset sum (zeta transform) of h, h({r}) = fixed load of r plus h(U) =
// demand of the experts whose copies span exactly U: the experts go into a table in
// shared memory by their rank sets (experts with the same set summed in lane order by
// the first of them), then the eight sums of lane l (sets l + 32 i) take bits 5-7
// within the lane and bits 0-4 by five shuffle passes.  Sums in a fixed order:
// deterministic, and exact for integer loads.  (The first version added every item
// to each of the eight sets it fits, one item per step: ~5.4k cycles on a cube EP32
// component, by clock64 on H200; docs/benchmarks.md has what this one takes.)
template <int J>
__device__ double subset_bound(int R, double fixed, const double (&c)[J], const unsigned (&mask)[J], bool& pin) {
  LPLB_WARP_SHARED double table[1 << kSubsetRanks];
  const int lane = threadIdx.x;
  const double inv_lane = 1.0 / (lane > 0 ? lane : 1);  // (lanes 1..8 serve the divisors)
LPLB_PRAGMA(unroll)
  for (int i = 0; i < 8; ++i) table[lane + 32 * i] = 0.0;
  __syncwarp();
  if (lane < R) table[1u << lane] = fixed;
  __syncwarp();
LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) {
    const unsigned peers = __match_any_sync(kFull, mask[j]);
    const unsigned live = __ballot_sync(kFull, mask[j] != 0u && c[j] != 0.0);
    double s = 0.0;
    unsigned rest = peers & live;  // (the steps: the most live items of one set)
    while (__ballot_sync(kFull, rest != 0u) != 0u) {  // (uniform: every lane shuffles)
      const double x = shfl(c[j], rest != 0u ? __ffs(rest) - 1 : lane);
      s += rest != 0u ? x : 0.0;
      rest &= rest - 1u;
    }
    if ((peers & live) != 0u && lane == __ffs(peers) - 1) table[mask[j]] += s;
    __syncwarp();
  }
  double g[8];
LPLB_PRAGMA(unroll)
  for (int i = 0; i < 8; ++i) g[i] = table[lane + 32 * i];
LPLB_PRAGMA(unroll)
  for (int b = 0; b < 3; ++b)
LPLB_PRAGMA(unroll)
    for (int i = 0; i < 8; ++i)
      if ((i >> b) & 1) g[i] += g[i ^ (1 << b)];
LPLB_PRAGMA(unroll)
  for (int b = 0; b < 5; ++b) {
    const bool up = (lane >> b) & 1;
LPLB_PRAGMA(unroll)
    for (int i = 0; i < 8; ++i) {
      const double below = shfl_xor(g[i], 1 << b);
      g[i] += up ? below : 0.0;
    }
  }
  // A branch ends ptxas's scheduling region here, so that the eight divisions below
  // wait for the last pass instead of being run into the passes: without it the
  // passes went one set at a time (five dependent shuffles each) and the enumeration
  // took ~0.9k cycles more on H200.  (Never taken: lane 0's g[0], the empty set's,
  // is 0.)
  if (__ballot_sync(kFull, g[0] != g[0]) == kFull) __syncwarp();
  // g / |U|, eight independent chains: each divisor's reciprocal from the lane of
  // that number (div_small: the division's bits without its branches)
  const unsigned all = (1u << R) - 1u;
  double best = -HUGE_VAL;
LPLB_PRAGMA(unroll)
  for (int i = 0; i < 8; ++i) {
    const unsigned set = static_cast<unsigned>(lane + 32 * i);
    const int n = __popc(set);
    const double q = blk::div_small(g[i], n, shfl(inv_lane, n));
    g[i] = n > 0 && (set & ~all) == 0u ? q : -HUGE_VAL;
    best = blk::nanmax(best, g[i]);
  }
  best = wmax(best);
  unsigned uni = 0u;
LPLB_PRAGMA(unroll)
  for (int i = 0; i < 8; ++i)
    if (g[i] == best) uni |= static_cast<unsigned>(lane + 32 * i);
  uni = __reduce_or_sync(kFull, uni);
  pin = lane < R && ((uni >> lane) & 1u);
  return best;
}

// subset_bound of this lane's experts (two copies each).
template <int J>
__device__ __forceinline__ double subset_bound(const View& v, const Lane<J>& L, bool& pin) {
  unsigned mask[J];
LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) mask[j] = L.has[j] ? (1u << L.ra[j]) | (1u << L.rb[j]) : 0u;
  return subset_bound<J>(v.R, L.fixed, L.c, mask, pin);
}

// The flows mult * max(s, 0) at the current dual point, expert j.
template <int J>
__device__ __forceinline__ void flows_at(const Lane<J>& L, int j, double& f0, double& f1) {
  double bA, bB;
  at_ranks(L, L.beta, j, bA, bB);
  const double sa = L.x0[j] + L.alpha[j] + bA, sb = L.x0[j] + L.alpha[j] + bB;
  f0 = L.pa[j] * (sa > 0.0 ? sa : 0.0);
  f1 = L.pb[j] * (sb > 0.0 ? sb : 0.0);
}

// exact::project: the even split projected onto {valid split, load <= bound}; the
// flows end in (f0, f1).  Returns whether it exists and meets the certificate.
template <int J>
__device__ bool project(const View& v, Lane<J>& L, const Smem& sm, double bound, double scale, int& its,
                        double (&f0)[J], double (&f1)[J], Prof& P) {
  const double tol = exact::kCertRtol * scale;
  const int R = v.R, r = threadIdx.x, lda = R + 1;
  L.cap = bound - L.fixed;
  L.beta = 0.0;
  L.sticky = L.pinned;
  L.was_released = false;
  double ct = 0.0, cc = 0.0;
LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) {
    L.alpha[j] = 0.0;
    L.d_a[j] = 0.0;
    if (L.has[j]) {
      ct += L.ma[j] * L.x0[j] * L.x0[j] + L.mb[j] * L.x0[j] * L.x0[j];
      cc += (L.ma[j] + L.mb[j]) * L.c[j] * L.c[j];
    }
  }
  // the cap on the dual (weak duality), as exact::project has it
  const double dual_cap = wsum(cc);
  put_edges(L, sm.e1, [&](int j, double& e0, double& e1) {
    e0 = L.ma[j] * L.x0[j];
    e1 = L.mb[j] * L.x0[j];
  });
  const double even = L.fixed + rank_sum(v, L, sm.e1);  // (every lane: it syncs)
  // An expert with one copy in the pinned prefix and one outside it sends nothing into
  // the prefix: the prefix's own load fills it exactly to the bound, so in any split
  // under the bound that edge carries 0.  The projection is the same with the edge cut
  // (same unique point); Newton then need not discover it (fewer iterations).
  {
    const double pin = L.pinned ? 1.0 : 0.0;
LPLB_PRAGMA(unroll)
    for (int j = 0; j < J; ++j) {
      double pA, pB;
      at_ranks(L, pin, j, pA, pB);
      L.pa[j] = pA > pB ? 0.0 : L.ma[j];
      L.pb[j] = pB > pA ? 0.0 : L.mb[j];
    }
  }
  L.active = L.has_rank && (even > bound || L.pinned);
  double n_bad = L.has_rank && L.cap < -tol ? 1.0 : 0.0;
  wmax_sum(n_bad, ct);
  if (n_bad > 0.0) return false;
  const double const_term = 0.5 * ct;
  const double delta = 1e-12;
  // 1 / (Hessian diagonal) of each expert for its three possible supports, formed once
  // (same bits as dividing in every pass, without a division on each pass's chain)
  double iw_a[J], iw_b[J], iw_ab[J];
LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) {
    iw_a[j] = 1.0 / ((L.ma[j] + 0.0) + delta);
    iw_b[j] = 1.0 / ((0.0 + L.mb[j]) + delta);
    iw_ab[j] = 1.0 / ((L.ma[j] + L.mb[j]) + delta);
  }
  bool settled = false;
  for (int outer = 0; outer < exact::kOuterIters && !settled; ++outer) {
    if (!L.active) L.beta = 0.0;
    // The Newton system's unknowns are the active ranks, in rank order: an inactive
    // rank's row is the identity, and eliminating it changes nothing (bit for bit).
    // Lane k solves for row k, the rank owner; rank lane r reads row cpos.
    const unsigned act = __ballot_sync(kFull, L.active);
    const int n_act = __popc(act);
    const int cpos = L.active ? __popc(act & ((1u << r) - 1u)) : -1;
    if (L.has_rank) sm.cpos[r] = cpos;
    if (L.active) sm.owner[cpos] = r;
    __syncwarp();
    bool converged = false, pending = false;
    double base = 0.0, slope = 0.0, step = 1.0;
    int newton = 0, halvings = 0;
    for (;;) {
      // gradients, Hessian diagonals and the dual (exact::project's first pass)
      double acc0 = -HUGE_VAL, acc1 = 0.0;
      put_edges(L, sm.e1, [&](int j, double& e0, double& e1) {
        double bA, bB;
        at_ranks(L, L.beta, j, bA, bB);
        const double sa = L.x0[j] + L.alpha[j] + bA, sb = L.x0[j] + L.alpha[j] + bB;
        const double wa = sa > 0.0 ? L.pa[j] : 0.0, wb = sb > 0.0 ? L.pb[j] : 0.0;
        L.wa[j] = wa;
        L.wb[j] = wb;
        e0 = wa * sa;
        e1 = wb * sb;
        const double g = L.c[j] - (e0 + e1);
        L.g_a[j] = g;
        L.inv_dal[j] = wa > 0.0 ? (wb > 0.0 ? iw_ab[j] : iw_a[j]) : (wb > 0.0 ? iw_b[j] : 1.0 / delta);
        if (L.has[j]) {
          acc0 = blk::nanmax(acc0, g < 0.0 ? -g : g);
          acc1 += L.c[j] * L.alpha[j] - 0.5 * (wa * sa * sa + wb * sb * sb);
          const int m = threadIdx.x + 32 * j;
          sm.e2[2 * m] = wa;
          sm.e2[2 * m + 1] = wb;
          sm.g_a[m] = g;
          sm.inv_dal[m] = L.inv_dal[j];
        }
      });
      double sf, sw;
      rank_sum2(v, L, sm.e1, sm.e2, sf, sw);
      double d_beta = delta;
      L.g_b = 0.0;
      if (L.active) {
        L.g_b = L.cap - sf;
        d_beta = sw + delta;
        acc0 = blk::nanmax(acc0, L.g_b < 0.0 ? -L.g_b : L.g_b);
        acc1 += L.cap * L.beta;
      }
      wmax_sum(acc0, acc1);
      LPLB_TICK(P, 4);
      if (acc0 <= 1e-11 * scale) {
        converged = true;
        break;
      }
      if (acc1 + const_term > dual_cap) return false;  // infeasible: the bound is too low
      if (pending && halvings < 40 && !(acc1 + const_term >= base + 1e-4 * step * slope)) {
        // Armijo failed: from base + step d back to base + next d (exact::backtrack,
        // which wants the direction's largest entry)
        double big = L.active ? fabs(L.d_b) : 0.0;
LPLB_PRAGMA(unroll)
        for (int j = 0; j < J; ++j) big = blk::nanmax(big, fabs(L.d_a[j]));
        big = wmax(big);
        const double next = exact::backtrack(step, slope, base, acc1 + const_term, big, R, scale);
        ++halvings;
LPLB_PRAGMA(unroll)
        for (int j = 0; j < J; ++j) L.alpha[j] -= (step - next) * L.d_a[j];
        if (L.active) L.beta -= (step - next) * L.d_b;
        step = next;
        continue;
      }
      pending = false;
      if (newton == exact::kNewtonIters) break;
      ++newton;
      ++its;
      base = acc1 + const_term;
      // Schur complement over the active ranks: rank lane r builds row cpos
      // (contributions in expert order)
      double rhs = 0.0;
      if (L.active) {
        double* row = sm.schur + static_cast<size_t>(cpos) * lda;
        for (int b = 0; b < n_act; ++b) row[b] = 0.0;
        double diag = d_beta, sacc = 0.0;
        auto add = [&](int e, int b) {
          const double ce = sm.e2[e];
          if (ce == 0.0) return;
          const int m = e >> 1;  // the expert; e ^ 1 is its other edge, on rank b
          const double id = sm.inv_dal[m];
          diag -= (ce * ce) * id;
          const int k = sm.cpos[b];
          if (k >= 0) row[k] -= (ce * sm.e2[e ^ 1]) * id;
          sacc += ce * (sm.g_a[m] * id);
        };
LPLB_PRAGMA(unroll)
        for (int q = 0; q < kMaxDegree; ++q)
          if (q < L.deg) add(L.edges[q], L.partner[q]);
        for (int q = L.more_lo; q < L.more_hi; ++q) add(v.rank_edges[q], v.edge_rank[v.rank_edges[q] ^ 1]);
        row[cpos] = diag;
        rhs = L.g_b - sacc;
      }
      LPLB_TICK(P, 5);
      // lane k solves for row k (its rank's right-hand side comes by shuffle)
      double x = shfl(rhs, r < n_act ? sm.owner[r] : 0);
      x = n_act <= 8 ? solve_gj8(sm.schur, n_act, lda, x) : solve_spd(sm.schur, n_act, lda, x);
      const double xr = shfl(x, L.active ? cpos : 0);
      L.d_b = L.active ? xr : 0.0;  // (so the experts need not look up activity)
      LPLB_TICK(P, 6);
      // expert direction, the slope g . d, and the full step
      double acc = 0.0;
LPLB_PRAGMA(unroll)
      for (int j = 0; j < J; ++j) {
        double dA, dB;
        at_ranks(L, L.d_b, j, dA, dB);
        const double d = (L.g_a[j] - (L.wa[j] * dA + L.wb[j] * dB)) * L.inv_dal[j];
        L.d_a[j] = L.has[j] ? d : 0.0;
        if (L.has[j]) {
          L.alpha[j] += d;
          acc += L.g_a[j] * d;
        }
      }
      if (L.active) {
        acc += L.g_b * L.d_b;
        L.beta += L.d_b;
      }
      slope = wsum(acc);
      step = 1.0;
      halvings = 0;
      pending = true;
      LPLB_TICK(P, 7);
    }
    if (!converged) return false;
    // loads of the flows; a bound that pulls load in is not binding, unless releasing
    // it overshot
    loads_of(v, L, sm.e1, [&](int j, double& e0, double& e1) { flows_at(L, j, e0, e1); });
    const bool over = L.has_rank && !L.active && L.load > bound + tol;
    const bool released = L.has_rank && L.active && L.beta > tol * 1e-3 && !L.sticky;
    double n_over = over ? 1.0 : 0.0, n_rel = released ? 1.0 : 0.0;
    wmax_sum(n_over, n_rel);
    L.sticky = L.sticky || (over && L.was_released);
    L.was_released = L.was_released || released;
    L.active = (L.active || over) && !released;
    if (n_over == 0.0 && n_rel == 0.0) settled = true;
    LPLB_TICK(P, 8);
  }
  if (!settled) return false;
  // exact expert sums: each expert's flow rescaled onto its demand; one whose flow
  // vanished within the tolerance (its demand is below it) takes the even split, as
  // exact::project has it
  double dead = 0.0;
LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) {
    double a, b;
    flows_at(L, j, a, b);
    const double tot = a + b;
    const bool live = L.c[j] > 0.0, vanished = live && !(tot > 0.0);
    if (L.has[j] && vanished && !(L.c[j] <= tol)) dead = 1.0;
    const double fac = live && !vanished ? blk::div_nz(L.c[j], tot) : 0.0;
    f0[j] = !live ? 0.0 : (vanished ? L.ma[j] * L.x0[j] : a * fac);
    f1[j] = !live ? 0.0 : (vanished ? L.mb[j] * L.x0[j] : b * fac);
  }
  if (wmax(dead) > 0.0) return false;
  loads_of(v, L, sm.e1, [&](int j, double& e0, double& e1) {
    e0 = f0[j];
    e1 = f1[j];
  });
  return wmax(L.has_rank ? L.load - (bound + tol) : -HUGE_VAL) <= 0.0;
}

// Solves the component (one warp; J experts per lane); the split ends in w.flow, its
// loads in w.load, as exact::solve leaves them.  kSubsets: the first round's bound is
// subset_bound's (the caller's choice when no component has more than kSubsetRanks
// ranks: a template argument, so that the kernels for larger components keep their
// code as it was).
template <int J, bool kSubsets, typename T>
__device__ exact::Result solve(const View& v, const T* loads, const exact::Work& w, double lipschitz,
                               int max_rounds) {
  exact::Result res{1, 0, 0, 0.0};
  Prof P;
  LPLB_TICK(P, 0);
  const Smem sm{w.flow, w.wt, w.g_a, w.d_alpha, w.schur, w.gain, w.cpos, w.cown};
  const int lane = threadIdx.x;
  Lane<J> L;
  setup_lane(v, loads, L, L.c);
  L.load = L.fixed;
  L.beta = L.d_b = L.g_b = L.cap = 0.0;
  L.active = L.sticky = L.was_released = L.pinned = false;
  double cmax = -HUGE_VAL;
LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) {
    const double slots = L.ma[j] + L.mb[j];
    L.x0[j] = blk::div_nz(L.c[j], slots > 1.0 ? slots : 1.0);  // (0 on lanes past M)
    L.y0[j] = L.z0[j] = L.b0[j] = L.ma[j] * L.x0[j];
    L.y1[j] = L.z1[j] = L.b1[j] = L.mb[j] * L.x0[j];
    L.alpha[j] = L.d_a[j] = L.g_a[j] = L.wa[j] = L.wb[j] = 0.0;
    L.inv_dal[j] = 1.0;
    if (L.has[j]) cmax = blk::nanmax(cmax, L.c[j]);
  }
  auto at_y = [&](int j, double& e0, double& e1) {
    e0 = L.y0[j];
    e1 = L.y1[j];
  };
  // the even split's loads; its max load, the largest demand and fixed load in one
  // reduction (loads_of's own max would be a second chain of shuffles)
  put_edges(L, sm.e1, at_y);
  L.load = L.fixed + rank_sum(v, L, sm.e1);
  double mx[3] = {L.has_rank ? L.load : -HUGE_VAL, cmax, L.has_rank ? L.fixed : -HUGE_VAL};
  wreduce<3, 7u>(mx);
  const double even_max = mx[0], dmax = mx[1], fmax = mx[2];
  LPLB_TICK(P, 0);
  double f0[J], f1[J];
  auto finish = [&](int certified) {
    // the split in (f0, f1) and its loads (in L.load) to w.flow / w.load
LPLB_PRAGMA(unroll)
    for (int j = 0; j < J; ++j) {
      const int m = lane + 32 * j;
      if (L.has[j]) {
        w.flow[2 * m] = f0[j];
        w.flow[2 * m + 1] = f1[j];
      }
    }
    if (L.has_rank) w.load[lane] = L.load;
    __syncwarp();
    res.certified = certified;
  };
  if (v.E == 0 || !(dmax > 0.0)) {
LPLB_PRAGMA(unroll)
    for (int j = 0; j < J; ++j) {
      f0[j] = L.y0[j];
      f1[j] = L.y1[j];
    }
    res.bound = even_max;
    finish(1);
    return res;
  }
  const double scale = dmax > fmax ? dmax : fmax;
  double best_max = even_max, bound = -HUGE_VAL, t_k = 1.0;
  const double step = 1.0 / lipschitz;
  int done = 0;
  const int rounds = max_rounds < 0 ? 0 : (max_rounds > 5 ? 5 : max_rounds);
  // With kSubsets the first bound is the optimum itself (subset_bound), with no FISTA
  // sweeps; should that attempt not certify (rounding), the later rounds run as
  // without, FISTA from the even split.  (One call of project for both: two inlined
  // copies made the kernel's code 1.7x as long, and the solves of components that
  // never took the new path 1-2 us slower on H200.)
  for (int rnd = 0; rnd < rounds; ++rnd) {
    const bool subsets = kSubsets && rnd == 0 && v.R <= kSubsetRanks;
    bool pin;
    double pb;
    if (subsets) {
      pb = subset_bound(v, L, pin);
    } else {
      // FISTA sweeps (exact::fista, two-copy closed form)
      for (int it = exact::rounds_done(rnd) - done; it > 0; --it) {
        put_edges(L, sm.e1, [&](int j, double& e0, double& e1) {
          e0 = L.z0[j];
          e1 = L.z1[j];
        });
        L.load = L.fixed + rank_sum(v, L, sm.e1);
        const double t_new = 0.5 * (1.0 + sqrt(1.0 + 4.0 * t_k * t_k));
        const double mom = (t_k - 1.0) / t_new;
LPLB_PRAGMA(unroll)
        for (int j = 0; j < J; ++j) {
          double la, lb;
          at_ranks(L, L.load, j, la, lb);
          const double d = L.c[j];
          double first = 0.5 * ((L.z0[j] - step * la) - (L.z1[j] - step * lb) + d);
          first = first < 0.0 ? 0.0 : (first > d ? d : first);
          const double yn0 = first, yn1 = d - first;
          L.z0[j] = yn0 + mom * (yn0 - L.y0[j]);
          L.z1[j] = yn1 + mom * (yn1 - L.y1[j]);
          L.y0[j] = yn0;
          L.y1[j] = yn1;
        }
        t_k = t_new;
      }
      LPLB_TICK(P, 1);
      done = exact::rounds_done(rnd);
      const double amax = loads_of(v, L, sm.e1, at_y);
      if (amax < best_max) {
        best_max = amax;
LPLB_PRAGMA(unroll)
        for (int j = 0; j < J; ++j) {
          L.b0[j] = L.y0[j];
          L.b1[j] = L.y1[j];
        }
      }
      pb = prefix_bound(v, L, sm, pin);
    }
    if (pb >= bound) {
      bound = pb;
      L.pinned = pin;
    }
    res.rounds = rnd + 1;
    LPLB_TICK(P, 2);
    if (project(v, L, sm, bound, scale, res.newton_iters, f0, f1, P)) {
      res.bound = bound;
      finish(1);
      LPLB_TICK(P, 9);
#ifdef LPLB_PROF
      if (lane == 0)
        printf("prof blk %d R %d M %d newton %d: setup %lld fista %lld prefix %lld grad %lld schur %lld "
               "solve %lld dir %lld outer %lld final %lld\n",
               blockIdx.x, v.R, v.M, res.newton_iters, P.acc[0], P.acc[1], P.acc[2], P.acc[4], P.acc[5], P.acc[6],
               P.acc[7], P.acc[8], P.acc[9]);
#endif
      return res;
    }
    if (subsets) {  // the later rounds' bounds and pins stand on their own
      bound = -HUGE_VAL;
      L.pinned = false;
    }
  }
  // not certified: the best valid split found
LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) {
    f0[j] = L.b0[j];
    f1[j] = L.b1[j];
  }
  loads_of(v, L, sm.e1, [&](int j, double& e0, double& e1) {
    e0 = f0[j];
    e1 = f1[j];
  });
  res.bound = bound;
  finish(0);
  return res;
}

#endif  // __CUDA_ARCH__ || LPLB_WARP_EMULATION

}  // namespace pair
}  // namespace lplb
