// Block-level primitives that compile twice: as CUDA, where one thread block runs
// them, and as plain C++, where one host thread runs them in order.
//
// Why: the solve kernels are long, branchy numerical code.  Written only with these
// primitives, the same source is also a CPU program, so CI (which has no GPU) tests the
// kernels' algorithm against the numpy/torch reference on thousands of instances, and
// the GPU run only has to confirm that the CUDA build computes the same thing.
//
// Rules that make the two builds agree:
//   * the body of pfor(n, f) must not depend on the order of its indices (no index
//     reads what another index of the same pfor writes);
//   * control flow outside the primitives must be uniform: it may only depend on
//     values every thread holds (reduce() results, kernel arguments, loop counters);
//   * every primitive ends with a barrier on the device, so anything written inside it
//     is visible afterwards.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LPLB_HD __host__ __device__ __forceinline__
#define LPLB_PRAGMA(x) _Pragma(#x)
#else
#define LPLB_HD inline
#define LPLB_PRAGMA(x)
#endif

namespace lplb {

// Warp shuffles of one value over the full warp (shfl: from lane src; shfl_xor:
// butterfly; shfl_down: from lane + delta), for every warp step of the solvers.  A
// double moves as its two 32-bit words through plain bit moves: CUDA's own double
// overloads split it inside asm volatile, and ptxas then often lands the two words in
// each other's registers and swaps them back with three LOP3 per shuffle (the
// one-warp torus 8x4 IPM kernel executed ~9k such LOP3 of its ~40k instructions,
// Nsight Compute; the bits are the same either way).
#if defined(__CUDA_ARCH__)
template <typename T>
__device__ __forceinline__ T shfl(T v, int src) {
  return __shfl_sync(0xffffffffu, v, src);
}
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}
template <typename T>
__device__ __forceinline__ T shfl_down(T v, unsigned delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
__device__ __forceinline__ double shfl(double v, int src) {
  const int lo = __shfl_sync(0xffffffffu, __double2loint(v), src);
  const int hi = __shfl_sync(0xffffffffu, __double2hiint(v), src);
  return __hiloint2double(hi, lo);
}
__device__ __forceinline__ double shfl_xor(double v, int mask) {
  const int lo = __shfl_xor_sync(0xffffffffu, __double2loint(v), mask);
  const int hi = __shfl_xor_sync(0xffffffffu, __double2hiint(v), mask);
  return __hiloint2double(hi, lo);
}
__device__ __forceinline__ double shfl_down(double v, unsigned delta) {
  const int lo = __shfl_down_sync(0xffffffffu, __double2loint(v), delta);
  const int hi = __shfl_down_sync(0xffffffffu, __double2hiint(v), delta);
  return __hiloint2double(hi, lo);
}
#endif  // __CUDA_ARCH__ (the one-warp solvers' CPU build takes them from warp_emulation.h)

namespace blk {

// Carves a block's arrays out of one buffer, in call order; with base == nullptr it
// only sizes them (the pointers are left null).  Int arrays are rounded up to 8 bytes,
// so that the doubles after them stay aligned.  Every solver's Work / Smem::layout
// takes its arrays this way.
struct Carve {
  char* base;
  size_t off = 0;
  LPLB_HD void dbl(double*& p, size_t n) {
    p = base ? reinterpret_cast<double*>(base + off) : nullptr;
    off += n * sizeof(double);
  }
  LPLB_HD void itg(int*& p, size_t n) {
    p = base ? reinterpret_cast<int*>(base + off) : nullptr;
    off += ((n * sizeof(int) + 7) / 8) * 8;
  }
};

// Scratch for reductions: one double per warp (device); unused on the host.
struct Team {
  double* red;
};

struct Max {
  LPLB_HD double operator()(double a, double b) const { return a > b ? a : b; }
  LPLB_HD static double identity() { return -HUGE_VAL; }
};

// f(i) for i in [0, n), all threads of the block, then a barrier.
template <typename F>
LPLB_HD void pfor(const Team&, int n, F&& f) {
#if defined(__CUDA_ARCH__)
  for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
  __syncthreads();
#else
  for (int i = 0; i < n; ++i) f(i);
#endif
}

// Like pfor, but only warp 0 works (cheap __syncwarp barriers for the long chains of
// small dependent steps in a factorisation).  The other warps skip; call
// team_sync() before anything outside warp 0 reads the results.
template <typename F>
LPLB_HD void wfor(const Team&, int n, F&& f) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x < 32) {
    for (int i = threadIdx.x; i < n; i += 32) f(i);
    __syncwarp();
  }
#else
  for (int i = 0; i < n; ++i) f(i);
#endif
}

LPLB_HD void team_sync(const Team&) {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#endif
}

// op over f(i), i in [0, n); every thread gets the same value (the device combines the
// per-warp partials in warp order, so the result is the same on every run).
template <typename Op, typename F>
LPLB_HD double reduce(const Team& t, int n, Op op, F&& f) {
#if defined(__CUDA_ARCH__)
  double v = Op::identity();
  for (int i = threadIdx.x; i < n; i += blockDim.x) v = op(v, f(i));
  for (int off = 16; off > 0; off >>= 1) v = op(v, shfl_down(v, off));
  const int warps = (blockDim.x + 31) >> 5;
  if ((threadIdx.x & 31) == 0) t.red[threadIdx.x >> 5] = v;
  __syncthreads();
  double r = Op::identity();
  for (int w = 0; w < warps; ++w) r = op(r, t.red[w]);
  __syncthreads();  // red[] is reused by the next reduction
  return r;
#else
  (void)t;
  double r = Op::identity();
  for (int i = 0; i < n; ++i) r = op(r, f(i));
  return r;
#endif
}

// Two sums at once (one pass, one set of barriers): f(i, a, b) adds into a and b.
template <typename F>
LPLB_HD void reduce2(const Team& t, int n, F&& f, double& out_a, double& out_b) {
#if defined(__CUDA_ARCH__)
  double a = 0.0, b = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) f(i, a, b);
  for (int off = 16; off > 0; off >>= 1) {
    a += shfl_down(a, off);
    b += shfl_down(b, off);
  }
  const int warps = (blockDim.x + 31) >> 5;
  if ((threadIdx.x & 31) == 0) {
    t.red[threadIdx.x >> 5] = a;
    t.red[32 + (threadIdx.x >> 5)] = b;
  }
  __syncthreads();
  out_a = 0.0;
  out_b = 0.0;
  for (int w = 0; w < warps; ++w) {
    out_a += t.red[w];
    out_b += t.red[32 + w];
  }
  __syncthreads();
#else
  (void)t;
  out_a = 0.0;
  out_b = 0.0;
  for (int i = 0; i < n; ++i) f(i, out_a, out_b);
#endif
}

// Phase timers of profiling builds (-DLPLB_PROF, device only; one printf per block
// where a solver reports them): tick(k) adds the cycles since the previous tick to
// acc[k], after a barrier (kWarp: __syncwarp, for the one-warp solvers; else
// __syncthreads).  Without LPLB_PROF an empty struct and no code.
#if defined(LPLB_PROF) && defined(__CUDA_ARCH__)
template <bool kWarp>
struct Prof {
  long long acc[12] = {0};
  long long last = 0;
  __device__ void tick(int k) {
    if (kWarp)
      __syncwarp();
    else
      __syncthreads();
    const long long now = clock64();
    if (last) acc[k] += now - last;
    last = now;
  }
};
#define LPLB_TICK(P, k) (P).tick(k)
#else
template <bool kWarp>
struct Prof {};
#define LPLB_TICK(P, k) ((void)0)
#endif

// NaN-propagating max (as torch.maximum / amax): NaN when either argument is NaN.
LPLB_HD double nanmax(double a, double b) { return (a != a || a > b) ? a : b; }

// a / b, the same bits as the division for every a when 1 / b is finite, without the
// division's slow path on a zero numerator: nvcc's double division calls a subroutine
// when the numerator's exponent is tiny (0 included), a divergent call of some hundred
// cycles (measured on H200: pair::subset_bound on a 2-rank component, whose eight
// divisions per lane are mostly of 0, went from 5.5k to 2.9k cycles).  A zero
// numerator divides 1 instead, and a * (1 / b) is then IEEE's signed zero (NaN when b
// is 0, as 0 / 0).
LPLB_HD double div_nz(double a, double b) {
  const double q = (a != 0.0 ? a : 1.0) / b;
  return a != 0.0 ? q : a * q;
}

// a / n for a divisor n given with inv = 1 / n (rounded): the same bits as the
// division for every finite a whose quotient is a normal number, without the
// division's branch to its slow path, so that several of them overlap (nvcc emits each
// division in its own convergence region: pair::subset_bound's eight ran one after the
// other).  One Newton step makes the quotient faithful, a second (Markstein's: the
// remainder a - n q is exact) rounds it correctly; checked bit for bit against a / n
// on 8e8 cases (n = 1..8; integers to 1e8, random doubles) and in
// tests/test_kernel_emulation_pair.py.  A zero, infinite or NaN a takes a * inv, which
// is a / n there (signed zero and infinity kept; the corrections would give +0 and NaN).
LPLB_HD double div_small(double a, double n, double inv) {
  const double q0 = a * inv;
  const double q1 = fma(fma(-q0, n, a), inv, q0);
  const double q = fma(fma(-q1, n, a), inv, q1);
  return a != 0.0 && fabs(a) < HUGE_VAL ? q : q0;
}

struct NanMax {
  LPLB_HD double operator()(double a, double b) const { return nanmax(a, b); }
  LPLB_HD static double identity() { return -HUGE_VAL; }
};

// N results in one pass (one set of barriers): slot k is a sum, or a NaN-propagating
// max when bit k of kMaxMask is set.  f(i, acc) folds element i into acc[0..N) itself
// (acc[k] += v for a sum, acc[k] = nanmax(acc[k], v) for a max).  Uses t.red[N * warps]
// (N * warps <= 64: N <= 8 at 256 threads).
template <int N, unsigned kMaxMask, typename F>
LPLB_HD void reduce_n(const Team& t, int n, F&& f, double (&out)[N]) {
  double acc[N];
LPLB_PRAGMA(unroll)
  for (int k = 0; k < N; ++k) acc[k] = ((kMaxMask >> k) & 1u) ? -HUGE_VAL : 0.0;
#if defined(__CUDA_ARCH__)
  for (int i = threadIdx.x; i < n; i += blockDim.x) f(i, acc);
LPLB_PRAGMA(unroll)
  for (int off = 16; off > 0; off >>= 1) {
LPLB_PRAGMA(unroll)
    for (int k = 0; k < N; ++k) {
      const double o = shfl_down(acc[k], off);
      acc[k] = ((kMaxMask >> k) & 1u) ? nanmax(acc[k], o) : acc[k] + o;
    }
  }
  const int warps = (blockDim.x + 31) >> 5;
  if ((threadIdx.x & 31) == 0) {
LPLB_PRAGMA(unroll)
    for (int k = 0; k < N; ++k) t.red[k * warps + (threadIdx.x >> 5)] = acc[k];
  }
  __syncthreads();
LPLB_PRAGMA(unroll)
  for (int k = 0; k < N; ++k) {
    double r = ((kMaxMask >> k) & 1u) ? -HUGE_VAL : 0.0;
LPLB_PRAGMA(unroll 1)
    for (int w = 0; w < warps; ++w) r = ((kMaxMask >> k) & 1u) ? nanmax(r, t.red[k * warps + w]) : r + t.red[k * warps + w];
    out[k] = r;
  }
  __syncthreads();
#else
  (void)t;
  for (int i = 0; i < n; ++i) f(i, acc);
  for (int k = 0; k < N; ++k) out[k] = acc[k];
#endif
}

// Stream compaction of the set flags (flag[i] != 0, i < n): pos[i] = the number of set
// flags before i (-1 where unset), own[k] = the index of the k-th set flag.  Returns the
// count on every thread.  Warp 0 ballots 32 flags per step (n / 32 dependent steps).
// Uses t.red[67].
LPLB_HD int compact(const Team& t, const int* flag, int n, int* pos, int* own) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x < 32) {
    const unsigned lane = threadIdx.x;
    int base = 0;
    for (int i0 = 0; i0 < n; i0 += 32) {
      const int i = i0 + static_cast<int>(lane);
      const bool set = i < n && flag[i] != 0;
      const unsigned m = __ballot_sync(0xffffffffu, set);
      const int k = base + __popc(m & ((1u << lane) - 1u));
      if (i < n) pos[i] = set ? k : -1;
      if (set) own[k] = i;
      base += __popc(m);
    }
    if (lane == 0) t.red[67] = base;
  }
  __syncthreads();
  return static_cast<int>(t.red[67]);
#else
  (void)t;
  int k = 0;
  for (int i = 0; i < n; ++i) {
    pos[i] = flag[i] ? k : -1;
    if (flag[i]) own[k++] = i;
  }
  return k;
#endif
}

// (i, j), 0 <= j <= i, of the q-th entry of a lower triangle stored row by row.
LPLB_HD void tri_index(int q, int& i, int& j) {
  i = static_cast<int>((sqrtf(8.0f * static_cast<float>(q) + 1.0f) - 1.0f) * 0.5f);
  while ((i + 1) * (i + 2) / 2 <= q) ++i;
  while (i * (i + 1) / 2 > q) --i;
  j = q - i * (i + 1) / 2;
}

// (i, j) of the q-th entry of a lower triangle: from the table tri_ij (entries
// (i << 16) | j) when given, else computed.
LPLB_HD void tri_entry(const int* tri_ij, int q, int& i, int& j) {
  if (tri_ij) {
    i = tri_ij[q] >> 16;
    j = tri_ij[q] & 0xffff;
  } else {
    tri_index(q, i, j);
  }
}

// 1 / d for an LDL^T pivot d; a pivot <= 0 (not numerically SPD) is taken as 1e-300
// and counted in bad.
LPLB_HD double pivot_inverse(double d, int& bad) {
  if (!(d > 0.0)) {
    ++bad;
    d = 1e-300;
  }
  return 1.0 / d;
}

// LDL^T factorisation in place of the SPD matrix A (n x n, row-major, leading dimension
// lda; only the lower triangle is read): A = L D L^T with L unit lower triangular.
// Afterwards the diagonal holds D, the strict upper triangle L^T (A[k][i] = L[i][k]),
// and the strict lower triangle the unscaled columns L[i][k] D[k].  Right-looking: in
// panels of 8 columns while more than 16 remain (see below), then one column per step
// and one barrier per step: step k reads only column k and updates
// the trailing lower triangle, one entry per index, the index of a row's diagonal
// entry also storing the row's L[i][k].  Steps with more than 32 entries use the whole
// block (__syncthreads), the smaller last ones warp 0 alone (__syncwarp).  A pivot <= 0
// (A not numerically SPD) is used as 1e-300 (ldlt_subst does the same) and counted in
// the return value, the same on every thread.  The arithmetic of a Cholesky factor
// L D^1/2 up to rounding, without the square roots.  tri_ij (optional): the entries
// of tri_index for q < n (n + 1) / 2 as (i << 16) | j, read instead of computed.
// Uses t.red[64].
LPLB_HD int ldlt_factor(const Team& t, double* A, int n, int lda, const int* tri_ij = nullptr) {
  int bad = 0;
  // step k as a pfor / wfor body (the pivot read and checked by every thread)
  auto step = [&](int k) {
    const double ik = pivot_inverse(A[k * lda + k], bad);
    return [=](int q) {
      int i, j;
      tri_entry(tri_ij, q, i, j);
      i += k + 1;
      j += k + 1;
      const double l = A[i * lda + k] * ik;
      if (i == j) A[k * lda + i] = l;
      A[i * lda + j] -= l * A[j * lda + k];
    };
  };
  int k = 0;
  // Columns in panels of kPanel while more than kPanel + 8 remain (the whole block).
  // Step k of the loop below is, per entry, A[i][j] -= (A[i][k] / d_k) A[j][k]; a panel
  // runs its kPanel steps on its own columns only (a row per thread, a barrier per
  // step), then applies them to the trailing triangle at once: each entry loads its
  // kPanel multipliers (row k of the upper triangle) and column entries together and
  // subtracts them in step order.  The same operations on the same values as step by
  // step (the same bits on the GPU and in the plain CPU build), but a trailing entry
  // is read and written once per panel instead of once per step: with the matrix in
  // global memory (components beyond shared memory) each of those was a dependent
  // round trip.
  constexpr int kPanel = 8;
  for (; n - k > kPanel + 8; k += kPanel) {
    const int pe = k + kPanel;  // the panel is columns k .. pe - 1
    for (int c = k; c < pe; ++c) {
      const double ic = pivot_inverse(A[c * lda + c], bad);
      pfor(t, n - c - 1, [&](int q) {
        const int i = c + 1 + q;
        const double l = A[i * lda + c] * ic;
        A[c * lda + i] = l;
        const int last = i < pe - 1 ? i : pe - 1;
        for (int j = c + 1; j <= last; ++j) A[i * lda + j] -= l * A[j * lda + c];
      });
    }
    const int m = n - pe;
    pfor(t, m * (m + 1) / 2, [&](int q) {
      int i, j;
      tri_entry(tri_ij, q, i, j);
      i += pe;
      j += pe;
      // (one subtraction per step as in the step-by-step form, so that nvcc fuses each
      // into the same multiply-add; the loads are off the chain and issue together.
      // GCC -O2 -ffp-contract=fast fuses this loop differently: the CPU FMA build's
      // bits differ from step by step, its answers not)
      double a = A[i * lda + j];
LPLB_PRAGMA(unroll)
      for (int u = 0; u < kPanel; ++u) a -= A[(k + u) * lda + i] * A[j * lda + k + u];
      A[i * lda + j] = a;
    });
  }
  // large steps: the whole block
  for (; k < n; ++k) {
    const int m = n - k - 1;
    if (m * (m + 1) / 2 <= 32) break;
    pfor(t, m * (m + 1) / 2, step(k));
  }
#if defined(__CUDA_ARCH__)
  if (threadIdx.x < 32) {
#endif
    for (; k < n; ++k) {
      const int m = n - k - 1;
      wfor(t, m * (m + 1) / 2, step(k));
    }
#if defined(__CUDA_ARCH__)
    if (threadIdx.x == 0) t.red[64] = bad;
  }
  __syncthreads();
  return static_cast<int>(t.red[64]);
#else
  return bad;
#endif
}

// Solves A x = b in place with the factor of ldlt_factor, for one right-hand side b1
// or two (b2 != nullptr, a uniform choice), and returns the sums of the solutions'
// entries in sums[0] (and sums[1]) on every thread.  Forward substitution with L,
// division by D, backward substitution with L^T.  For n <= 64 warp 0 alone keeps b in
// registers (row lane, and lane + 32 beyond 32 rows) and passes each finished entry by
// a shuffle: no barrier but the one at the end.  Beyond, the whole block, one barrier
// per step.
// Uses t.red[65..66].
LPLB_HD void ldlt_subst(const Team& t, const double* A, int n, int lda, double* b1, double* b2, double* sums) {
  const bool two = b2 != nullptr;
  auto pivot = [&](int i) {
    const double d = A[i * lda + i];
    return d > 0.0 ? d : 1e-300;
  };
#if defined(__CUDA_ARCH__)
  if (n <= 32) {
    // one row per lane: p for b1, r for b2; the next step's entry of L is loaded while
    // the current one is applied
    if (threadIdx.x < 32) {
      const int i = threadIdx.x;
      const bool has = i < n;
      double p = has ? b1[i] : 0.0, r = (two && has) ? b2[i] : 0.0;
      double l = (has && i > 0) ? A[i] : 0.0;  // L[i][0] = A[0][i]
      for (int k = 0; k < n; ++k) {
        const double x1 = shfl(p, k);
        const double x2 = two ? shfl(r, k) : 0.0;
        const double next = (has && i > k + 1) ? A[(k + 1) * lda + i] : 0.0;
        if (has && i > k) {
          p -= l * x1;
          r -= l * x2;
        }
        l = next;
      }
      if (has) {
        const double d = pivot(i);
        p = p / d;
        r = r / d;
      }
      l = (has && n - 1 > i) ? A[i * lda + n - 1] : 0.0;  // L[n-1][i]
      for (int k = n - 1; k > 0; --k) {
        const double x1 = shfl(p, k);
        const double x2 = two ? shfl(r, k) : 0.0;
        const double next = (has && i < k - 1) ? A[i * lda + k - 1] : 0.0;
        if (i < k) {
          p -= l * x1;
          r -= l * x2;
        }
        l = next;
      }
      if (has) {
        b1[i] = p;
        if (two) b2[i] = r;
      }
      double s1 = has ? p : 0.0, s2 = has ? r : 0.0;
      for (int off = 16; off > 0; off >>= 1) {
        s1 += shfl_down(s1, off);
        s2 += shfl_down(s2, off);
      }
      if (i == 0) {
        t.red[65] = s1;
        t.red[66] = two ? s2 : 0.0;
      }
    }
    __syncthreads();
    sums[0] = t.red[65];
    sums[1] = t.red[66];
    return;
  }
  if (n <= 64) {
    if (threadIdx.x < 32) {
      // rows lo = lane and hi = lane + 32: (p, q) for b1, (r, s) for b2
      const int lo = threadIdx.x, hi = lo + 32;
      const bool has_lo = lo < n, has_hi = hi < n;
      double p = has_lo ? b1[lo] : 0.0, q = has_hi ? b1[hi] : 0.0;
      double r = (two && has_lo) ? b2[lo] : 0.0, s = (two && has_hi) ? b2[hi] : 0.0;
      for (int k = 0; k < n; ++k) {
        const bool up = k >= 32;
        const double x1 = shfl(up ? q : p, k & 31);
        const double x2 = two ? shfl(up ? s : r, k & 31) : 0.0;
        if (has_lo && lo > k) {
          const double l = A[k * lda + lo];
          p -= l * x1;
          r -= l * x2;
        }
        if (has_hi && hi > k) {
          const double l = A[k * lda + hi];
          q -= l * x1;
          s -= l * x2;
        }
      }
      if (has_lo) {
        const double d = pivot(lo);
        p = p / d;
        r = r / d;
      }
      if (has_hi) {
        const double d = pivot(hi);
        q = q / d;
        s = s / d;
      }
      for (int k = n - 1; k > 0; --k) {
        const bool up = k >= 32;
        const double x1 = shfl(up ? q : p, k & 31);
        const double x2 = two ? shfl(up ? s : r, k & 31) : 0.0;
        if (has_lo && lo < k) {
          const double l = A[lo * lda + k];
          p -= l * x1;
          r -= l * x2;
        }
        if (has_hi && hi < k) {
          const double l = A[hi * lda + k];
          q -= l * x1;
          s -= l * x2;
        }
      }
      if (has_lo) {
        b1[lo] = p;
        if (two) b2[lo] = r;
      }
      if (has_hi) {
        b1[hi] = q;
        if (two) b2[hi] = s;
      }
      double s1 = p + q, s2 = r + s;
      for (int off = 16; off > 0; off >>= 1) {
        s1 += shfl_down(s1, off);
        s2 += shfl_down(s2, off);
      }
      if (lo == 0) {
        t.red[65] = s1;
        t.red[66] = two ? s2 : 0.0;
      }
    }
    __syncthreads();
    sums[0] = t.red[65];
    sums[1] = t.red[66];
    return;
  }
#endif
  for (int k = 0; k < n; ++k) {
    pfor(t, n - k - 1, [&](int q) {
      const int i = k + 1 + q;
      const double l = A[k * lda + i];
      b1[i] -= l * b1[k];
      if (two) b2[i] -= l * b2[k];
    });
  }
  pfor(t, n, [&](int i) {
    const double d = pivot(i);
    b1[i] = b1[i] / d;
    if (two) b2[i] = b2[i] / d;
  });
  for (int k = n - 1; k > 0; --k) {
    pfor(t, k, [&](int i) {
      const double l = A[i * lda + k];
      b1[i] -= l * b1[k];
      if (two) b2[i] -= l * b2[k];
    });
  }
  reduce2(t, n, [&](int i, double& a, double& b) {
    a += b1[i];
    if (two) b += b2[i];
  }, sums[0], sums[1]);
}

}  // namespace blk
}  // namespace lplb
