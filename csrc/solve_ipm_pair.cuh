// The IPM (solve_ipm.cuh) for a small two-copy component in one warp: the same
// Mehrotra iteration, the same formulas in the same order, with the component kept
// in registers the way solve_pair.cuh keeps it for the exact method.
//
// Why: ipm::solve spends its time in block barriers and reductions, not arithmetic.
// Its ~15 passes per iteration each cost 1-3k cycles on an 8-rank component (clock64
// profile on H200, cube EP32: 30k cycles per iteration, 5 iterations).  Here a lane
// holds one rank and up to two experts with their two edges, every pass is register
// arithmetic plus shuffles, and the only shared memory is the per-edge values a rank
// sums over its edges and the R x R Schur matrix.
//
// Layout (as solve_pair.cuh): lane r < R is rank r; lane l holds experts m = l + 32 j
// (j < J) and their edges 2m (on rank ra) and 2m + 1 (on rb); a rank reads its
// edges' values from a shared array, an expert its ranks' values by shuffles.  The
// experts pass of ipm::solve (sums over an expert's edges) is lane-local here and
// runs inside the update pass.
//
// The Schur matrix S~ is built row by row (lane r writes row r, its entries summed
// in expert order as ipm::assemble sums them) and both triangles get the value
// ipm::assemble gives the lower one.  Up to 16 ranks it is factored by Gaussian
// elimination without pivoting, row i in lane i's registers (factor_reg), keeping the
// multipliers, so that the predictor's two right-hand sides and the corrector's one
// are substituted with the same factor; beyond, helper warps invert it and apply the
// inverse (team_inverse.cuh, NewtonFactor below).  Pivots <= 0 are counted and
// regularised exactly as blk::ldlt_factor and ipm::factor do.  Differences from
// ipm::solve are rounding only (sums in another order, the elimination's upper
// triangle instead of L D L^T): the tests compare the two builds on every two-copy
// placement.
#pragma once

#include <type_traits>

#include "block_ops.cuh"
#include "solve_ipm.cuh"
#include "solve_pair.cuh"
#include "solve_view.cuh"
#include "team_inverse.cuh"

namespace lplb {
namespace ipm_pair {

using pair::kMaxDegree;
using pair::kMaxExperts;
using pair::kMaxRanks;

// The one-warp IPMs solve their Newton system with a factor in the lane's registers
// up to kTeamRanks ranks (the instances NR = 8 and 16), and with S~^-1 held by helper
// warps beyond (NR = 32: team_inverse.cuh; the kernel is then launched with
// team_inverse::kThreads threads, warp 0 solving, the helpers serving).
constexpr int kTeamRanks = 16;
template <int NR>
constexpr bool kUsesTeam = NR > kTeamRanks;

// Shared arrays of one block.  Sizes: E edges, R ranks; team: the helpers' arrays
// (the instances with kUsesTeam).
struct Smem {
  double *a0, *a1, *a2, *a3, *a4;  // [E] per-edge values a rank sums (written by the experts)
  double* schur;              // [R x (R + 1)], padded rows
  double *flow, *load;        // [E], [R]: the answer
  team_inverse::Smem team;

  // Carve the arrays out of base; returns bytes used (base == nullptr: size only).
  LPLB_HD static size_t layout(Smem* s, char* base, int R, int E, bool team) {
    Smem sizing;
    Smem& o = s ? *s : sizing;
    blk::Carve buf{s ? base : nullptr};
    for (double** p : {&o.a0, &o.a1, &o.a2, &o.a3, &o.a4}) buf.dbl(*p, E);
    buf.dbl(o.schur, static_cast<size_t>(R) * (R + 1));
    buf.dbl(o.flow, E);
    buf.dbl(o.load, R);
    if (team) team_inverse::Smem::carve(buf, o.team);
    return buf.off;
  }
};

#if defined(__CUDA_ARCH__) || defined(LPLB_WARP_EMULATION)

using pair::factor_reg;
using pair::kFull;
using pair::wreduce;
using pair::wmax;

// Registers of one lane: its rank (lane < R) and its experts j (m = lane + 32 j < M)
// with their edges k (0: on ra, 1: on rb).  Names as ipm::Work's arrays.
template <int J>
struct Lane {
  static constexpr int kJ = J;
  // rank
  bool has_rank;
  int deg;
  int edges[kMaxDegree];
  int partner[kMaxDegree];
  int more_lo, more_hi;
  double fixed, f, s, zs, is, izs, ds, rds, gxs, w, dw, dxs, dzs, affs, rp_r, diag, u1, u2;
  // experts
  bool has[J];
  int ra[J], rb[J];
  double ma[J], mb[J];
  double demand[J], c[J], lam[J], ia[J], hm[J], rp_m[J], dlam[J];
  // edges
  double y[J][2], z[J][2], iy[J][2], iz[J][2], d[J][2], da[J][2], rd[J][2], dx[J][2], dz[J][2], aff[J][2],
      best[J][2];
};

// Sums over a rank's edges (rank_edges order) as ipm::ranks and ipm::corrector_rhs
// form them: out[k] adds arr[k][e] (k < N) and out[N] adds da[e] * h[e] (a product
// per edge, so that the device contracts it into the sum as ipm::solve does).
template <int N, typename Ln>
__device__ __forceinline__ void rank_sums(const View& v, const Ln& L, const double* const (&arr)[N],
                                          const double* da, const double* h, double (&out)[N + 1]) {
  __syncwarp();
  double s[N + 1];
LPLB_PRAGMA(unroll)
  for (int k = 0; k <= N; ++k) s[k] = 0.0;
  auto add = [&](int e) {
LPLB_PRAGMA(unroll)
    for (int k = 0; k < N; ++k) s[k] += arr[k][e];
    s[N] += da[e] * h[e];
  };
LPLB_PRAGMA(unroll)
  for (int q = 0; q < kMaxDegree; ++q)
    if (q < L.deg) add(L.edges[q]);
  for (int q = L.more_lo; q < L.more_hi; ++q) add(v.rank_edges[q]);
  __syncwarp();
LPLB_PRAGMA(unroll)
  for (int k = 0; k <= N; ++k) out[k] = s[k];
}

// Lane r's row of S~ as ipm::assemble forms it, in both one-warp IPMs: add_edges(row)
// sums d * da over the experts joining r and each rank p into row[p] (in expert
// order, the edge on the larger rank taking d; each term its own statement, so that
// it contracts as ipm::assemble's sum), then -sum + nu off the diagonal, and the
// diagonal with n_reg rounds of regularisation.  kSums (the helpers' path,
// kUsesTeam): only the sums and the diagonal, into a row the helpers left zero; they
// form -sum + nu as they load it (team_inverse::invert), so that this warp does not
// write every entry of its row twice.
template <bool kSums, typename AddEdges>
__device__ __forceinline__ void assemble_row(double* row, int R, int r, double diag, double nu, int n_reg,
                                             double reg_scale, AddEdges&& add_edges) {
  if (!kSums)
    for (int b = 0; b < R; ++b) row[b] = 0.0;
  add_edges(row);
  if (!kSums)
    for (int b = 0; b < R; ++b) row[b] = -row[b] + nu;
  double dg = diag + nu, reg = 1e-12;
  for (int k = 0; k < n_reg; ++k) {
    dg = dg + reg_scale * reg;
    reg *= 100.0;
  }
  row[r] = dg;
}

// S~ into sm.schur (assemble_row); d and da of every edge must be in sm.a0 / sm.a1.
template <bool kSums, int J>
__device__ __forceinline__ void assemble(const View& v, const Lane<J>& L, const Smem& sm, double nu, int n_reg,
                                         double reg_scale) {
  const int R = v.R, r = threadIdx.x, lda = R + 1;
  __syncwarp();
  if (L.has_rank)
    assemble_row<kSums>(sm.schur + static_cast<size_t>(r) * lda, R, r, L.diag, nu, n_reg, reg_scale, [&](double* row) {
      auto add = [&](int e, int p) {
        const int o = e ^ 1;
        if (r > p)
          row[p] += sm.a0[e] * sm.a1[o];
        else
          row[p] += sm.a0[o] * sm.a1[e];
      };
LPLB_PRAGMA(unroll)
      for (int q = 0; q < kMaxDegree; ++q)
        if (q < L.deg) add(L.edges[q], L.partner[q]);
      for (int q = L.more_lo; q < L.more_hi; ++q) add(v.rank_edges[q], v.edge_rank[v.rank_edges[q] ^ 1]);
    });
  __syncwarp();
}

// The Newton system's solver for NR ranks: the factor of pair::factor_reg in the
// lane's registers (row i in lane i), its solves pair::subst_reg's substitutions.
template <int NR>
struct RegFactor {
  double a[NR];
  double inv = 0.0;
  // (nothing to stage: the substitutions take the right-hand sides as they come)
  __device__ __forceinline__ void stage_predictor(int, double, double) {}
  // Factors S~ (n x n, padded rows, in schur); returns the number of pivots <= 0.
  __device__ __forceinline__ int factor(const double* schur, int n, double) {
    return __popc(__ballot_sync(kFull, factor_reg<NR>(schur, n, n + 1, a, inv)));
  }
  template <bool kTwo>
  __device__ __forceinline__ void solve(int n, double b1, double b2, double& x1, double& x2) const {
    pair::subst_reg<NR, kTwo>(a, n, inv, b1, b2, x1, x2);
  }
};

// ... beyond kTeamRanks: -S~^-1 held by the block's helper warps (team_inverse.cuh),
// which know S~'s place and size (serve()'s arguments); factor and solve are run
// there.  The predictor's right-hand sides are staged before factor(), which applies
// the inverse to them in the same command, and solve<true> (the predictor's, right
// after) reads those products instead of posting its own (one round trip per
// iteration fewer: torus 8x4 53.6 -> 53.0 us, same H200 call).
struct TeamFactor {
  team_inverse::Smem s;
  __device__ __forceinline__ void stage_predictor(int n, double b1, double b2) {
    team_inverse::stage<true>(n, s, b1, b2);
  }
  // (schur holds assemble<true>'s sums; the helpers add nu as they load it)
  __device__ __forceinline__ int factor(const double*, int, double nu) {
    return team_inverse::invert_on_helpers(s, nu);
  }
  template <bool kTwo>
  __device__ __forceinline__ void solve(int n, double b1, double b2, double& x1, double& x2) const {
    team_inverse::solve_on_helpers<kTwo>(n, s, b1, b2, x1, x2);
  }
};

template <int NR>
using NewtonFactor = std::conditional_t<kUsesTeam<NR>, TeamFactor, RegFactor<NR>>;

// The factor's solve in place (lanes from n on keep b1, b2), and the sums of the
// solutions' entries in sums[0], sums[1].
template <bool kTwo, typename F>
__device__ __forceinline__ void subst(const F& fac, int n, double& b1, double& b2, double (&sums)[2]) {
  const int i = threadIdx.x;
  double x1, x2;
  fac.template solve<kTwo>(n, b1, b2, x1, x2);
  if (i < n) {
    b1 = x1;
    if (kTwo) b2 = x2;
  }
  double s[2] = {i < n ? x1 : 0.0, (kTwo && i < n) ? x2 : 0.0};
  wreduce<2, 0u>(s);
  sums[0] = s[0];
  sums[1] = s[1];
}

// The predictor's solves (u1 and u2 = 1) or the corrector's (u1 only), the second
// right-hand side a compile-time choice (NewtonFactor's solve<kTwo>).
template <typename F>
__device__ __forceinline__ void subst_phase(bool corr, const F& fac, int n, double& u1, double& u2,
                                            double (&sums)[2]) {
  if (corr)
    subst<false>(fac, n, u1, u2, sums);
  else
    subst<true>(fac, n, u1, u2, sums);
}

// ---- the rank lane's part of each pass, the same in both one-warp solvers
// (solve_ipm_warp.cuh too); Ln: a lane with the rank fields of Lane<J>.

// The starting point's rank part: s = T - load; adds x z (x = s, z = 1 / R), x and z
// into sums.
template <typename Ln>
__device__ __forceinline__ void rank_start(Ln& L, double Tv, double load, double wi, double (&sums)[3]) {
  L.s = Tv - load;
  if (L.has_rank) {
    sums[0] += L.s * wi;
    sums[1] += L.s;
    sums[2] += wi;
  }
}

// ... after Mehrotra's shift dx0, dz0: s, z_s, w and zero directions.
template <typename Ln>
__device__ __forceinline__ void rank_shift(Ln& L, double wi, double dx0, double dz0) {
  L.s = L.s + dx0;
  L.zs = wi + dz0;
  L.w = wi;
  L.dw = L.dxs = L.dzs = 0.0;
}

// ipm::update's rank part: the step (when move), 1 / s, 1 / z_s, d_s, the dual
// residual and gx_s; folds f.w, sum w, x z and |rd| into mu5.
template <typename Ln>
__device__ __forceinline__ void rank_update(Ln& L, bool move, double ap, double ad, double (&mu5)[5]) {
  if (move) {
    L.s = L.s + ap * L.dxs;
    L.zs = L.zs + ad * L.dzs;
    L.w = L.w + ad * L.dw;
  }
  L.izs = 1.0 / L.zs;
  L.rds = L.w - L.zs;
  const double xz = L.s * L.zs;
  L.is = 1.0 / L.s;
  L.ds = L.s * L.izs;
  L.gxs = (-xz - L.s * L.rds) * L.izs;
  if (L.has_rank) {
    mu5[1] += L.f * L.w;
    mu5[2] += L.w;
    mu5[3] += xz;
    mu5[4] = blk::nanmax(mu5[4], fabs(L.rds));
  }
}

// ipm::ranks' rank part from the rank's sums rs = {y, t, gx, da h}: the primal
// residual, the Schur diagonal and the predictor's right-hand sides (u1, u2 = 1);
// folds the diagonal and |residual| into mr.
template <typename Ln>
__device__ __forceinline__ void rank_newton_data(Ln& L, double Tv, const double (&rs)[4], double (&mr)[2]) {
  const double rp = (L.f - Tv) + (rs[0] + L.s);
  const double dg = L.ds + rs[1];
  L.rp_r = rp;
  L.diag = dg;
  L.u1 = (rp + (rs[2] + L.gxs)) + rs[3];
  L.u2 = 1.0;
  if (L.has_rank) {
    mr[0] += dg;
    mr[1] = blk::nanmax(mr[1], fabs(rp));
  }
}

// ipm::corrector_rhs's rank part from the rank's sums gh = {gx, da h}.
template <typename Ln>
__device__ __forceinline__ void rank_corrector_rhs(Ln& L, double smu, const double (&gh)[2]) {
  const double gxs = (((smu - L.s * L.zs) - L.affs) - L.s * L.rds) * L.izs;
  L.u1 = (L.rp_r + (gh[0] + gxs)) + gh[1];
}

// ipm::direction's sums over variables: max -dx / x, max -dz / z, sum dx z, sum x dz,
// sum dx dz.
struct DirSums {
  double acc[5] = {-HUGE_VAL, -HUGE_VAL, 0.0, 0.0, 0.0};
  __device__ __forceinline__ void fold(double x, double z, double ix, double iz, double dx, double dz) {
    acc[0] = blk::nanmax(acc[0], -(dx * ix));
    acc[1] = blk::nanmax(acc[1], -(dz * iz));
    acc[2] += dx * z;
    acc[3] += x * dz;
    acc[4] += dx * dz;
  }
};

// ipm::direction's rank part: dw = u1 - dT' u2, then dx_s, dz_s (the predictor keeps
// their product).
template <typename Ln>
__device__ __forceinline__ void rank_direction(Ln& L, bool corr, double smu, double dTp, DirSums& ds) {
  L.dw = L.u1 - dTp * L.u2;
  const double x = L.s, z = L.zs, xz = x * z;
  const double rc = corr ? (smu - xz) - L.affs : -xz;
  const double dx = L.ds * (0.0 - L.dw) + (rc - x * L.rds) * L.izs;
  const double dz = (rc - z * dx) * L.is;
  L.dxs = dx;
  L.dzs = dz;
  if (!corr) L.affs = dx * dz;
  if (L.has_rank) ds.fold(x, z, L.is, L.izs, dx, dz);
}

// The factor (NewtonFactor) with ipm::factor's regularisation: on a pivot <= 0, S~ is
// rebuilt with 1e-12 * max diag more on its diagonal (then x100, at most 4 times) by
// assemble(n_reg, reg_scale).  Returns the number of bad pivots left (0: a factor).
template <typename F, typename Ln, typename Assemble>
__device__ __forceinline__ int factor_regularised(F& fac, const double* schur, int n, const Ln& L, double nu,
                                                  Assemble&& assemble) {
  assemble(0, 0.0);
  int bad = fac.factor(schur, n, nu);
  if (bad > 0) {
    const double reg_scale = wmax(L.has_rank ? L.diag + nu : -HUGE_VAL);
    for (int k = 1; k <= 4 && bad > 0; ++k) {
      assemble(k, reg_scale);
      bad = fac.factor(schur, n, nu);
    }
  }
  return bad;
}

// ipm::split_expert for expert j's two edges (values y, in registers) into e0, e1.
template <typename Ln>
__device__ __forceinline__ void split_pair(const Ln& L, int j, const double (&y)[2], double scale, double demand,
                                           double& e0, double& e1) {
  ipm::split_expert(
      2, scale, demand, [&](int k) { return k == 0 ? y[0] : y[1]; }, [&](int k) { return k == 0 ? L.ma[j] : L.mb[j]; },
      [&](int k, double x) { (k == 0 ? e0 : e1) = x; });
}

// ipm::bound_met for the one-warp solvers, as a call, from shared memory and the
// component's arrays only: y [E] the current iterate (scaled units), wp [R] each
// rank's w+ = max(w, 0) (written by the rank lanes before the call), x [E] scratch
// (the split), f: this lane's rank's scaled fixed load.  Same sums in the same order
// as ipm::bound_met and as the inlined form in solve below.  Why a call: the bound
// runs on at most a few iterations, and inlined into the kernels that already spill
// (two experts per lane, or 32 ranks; ptxas -v) it made them spill more around every
// pass: ipm_pair_kernel<2, 32>'s stack 312 -> 376 bytes, the torus 8x4 IPM 109 -> 119
// us at the same 4 iterations; called, 113 us (H200).  In the kernels without spills
// the call's register saving costs more than it saves (ring 38.0 -> 41.7 us, cube
// EP32 45.0 -> 48.6), so those inline it on the lane's registers.  The one-warp
// any-placement kernel calls it (EPLB EP32 43.1 -> 42.7 us).
template <typename T>
__device__ __noinline__ bool bound_met(const View& v, const T* loads, double scale, const double* y, const double* wp,
                                       double* x, double f, double tol) {
  const int lane = threadIdx.x;
  double acc[4] = {-HUGE_VAL, 0.0, 0.0, 0.0};  // U, f.w+, sum w+, sum_m c_m min w+
  __syncwarp();
  for (int m = lane; m < v.M; m += 32) {
    const int lo = v.exp_ptr[m], n = v.exp_ptr[m + 1] - lo;
    const double c = static_cast<double>(loads[v.exp_log[m]]) / scale;
    ipm::split_expert(
        n, 1.0, c, [&](int k) { return y[lo + k]; }, [&](int k) { return static_cast<double>(v.edge_mult[lo + k]); },
        [&](int k, double xv) { x[lo + k] = xv; });
    double mn = HUGE_VAL;
    for (int k = 0; k < n; ++k) {
      const double w = wp[v.edge_rank[lo + k]];
      mn = (k == 0 || w < mn) ? w : mn;
    }
    acc[3] += c * mn;
  }
  __syncwarp();
  if (lane < v.R) {
    const double w = wp[lane];
    acc[0] = f + ipm::rank_sum(v, x, lane);
    acc[1] = f * w;
    acc[2] = w;
  }
  wreduce<4, 1u>(acc);
  __syncwarp();  // y, wp and x may be rewritten next
  return ipm::bound_verdict(acc, tol);
}

// The loads of the final split (in flow) into load; returns their max.
template <typename Ln>
__device__ __forceinline__ double final_loads(const View& v, const Ln& L, const double* flow, double* load) {
  const double ld = L.fixed + pair::rank_sum(v, L, flow);
  if (L.has_rank) load[threadIdx.x] = ld;
  const double mx = wmax(L.has_rank ? ld : -HUGE_VAL);
  __syncwarp();
  return mx;
}

// Solves the component (one warp; J experts per lane; at most NR ranks); the split
// ends in sm.flow, its loads in sm.load, as ipm::solve leaves them in w.flow / w.load.
template <int J, int NR, typename T>
__device__ ipm::Result solve(const View& v, const T* loads, const Smem& sm, int max_iters, double tol) {
  const int R = v.R, E = v.E, lane = threadIdx.x;
  ipm::Result res{1, 0, 0.0};
  [[maybe_unused]] pair::Prof P;
  LPLB_TICK(P, 0);
  Lane<J> L;
  pair::setup_lane(v, loads, L, L.demand);
  double sum_f, sum_c;
  {
    double acc[2] = {L.has_rank ? L.fixed : 0.0, 0.0};
LPLB_PRAGMA(unroll)
    for (int j = 0; j < J; ++j) acc[1] += L.demand[j];
    wreduce<2, 0u>(acc);
    sum_f = acc[0];
    sum_c = acc[1];
  }
  const double scale = (sum_f + sum_c) / R;
  const bool trivial = scale <= 0.0;

LPLB_PRAGMA(unroll)
  for (int j = 0; j < J; ++j) L.best[j][0] = L.best[j][1] = 0.0;
  if (E > 0 && !trivial) {
    // ---- starting point: even split, T = its max load, uniform duals, Mehrotra shift
    double mx[2] = {-HUGE_VAL, -HUGE_VAL};
LPLB_PRAGMA(unroll)
    for (int j = 0; j < J; ++j) {
      const double c = L.demand[j] / scale;
      L.c[j] = c;
      L.y[j][0] = L.y[j][1] = c / 2.0;
      if (L.has[j]) mx[0] = blk::nanmax(mx[0], c);
    }
    L.f = L.fixed / scale;
    if (L.has_rank) mx[1] = blk::nanmax(mx[1], L.f);
    wreduce<2, 3u>(mx);
    const double cnorm = 1.0 + blk::nanmax(blk::nanmax(mx[0], 0.0), mx[1]);
    pair::put_edges(L, sm.a0, [&](int j, double& e0, double& e1) {
      e0 = L.y[j][0];
      e1 = L.y[j][1];
    });
    const double load = L.f + pair::rank_sum(v, L, sm.a0);
    double Tv = wmax(L.has_rank ? load : -HUGE_VAL);
    const double wi = 1.0 / R;
    double sums[3] = {0.0, 0.0, 0.0};  // x.z, sum x, sum z
    rank_start(L, Tv, load, wi, sums);
LPLB_PRAGMA(unroll)
    for (int j = 0; j < J; ++j)
      if (L.has[j])
LPLB_PRAGMA(unroll)
        for (int k = 0; k < 2; ++k) {
          sums[0] += L.y[j][k] * wi;
          sums[1] += L.y[j][k];
          sums[2] += wi;
        }
    wreduce<3, 0u>(sums);
    const double dx0 = blk::nanmax(0.5 * sums[0] / sums[2], 0.1);
    const double dz0 = blk::nanmax(0.5 * sums[0] / (sums[1] > 1e-300 ? sums[1] : 1e-300), 0.1 / R);
LPLB_PRAGMA(unroll)
    for (int j = 0; j < J; ++j) {
      L.lam[j] = L.dlam[j] = 0.0;
LPLB_PRAGMA(unroll)
      for (int k = 0; k < 2; ++k) {
        L.y[j][k] = L.y[j][k] + dx0;
        L.z[j][k] = wi + dz0;
        L.dx[j][k] = L.dz[j][k] = 0.0;
      }
    }
    rank_shift(L, wi, dx0, dz0);

    const double n_var = static_cast<double>(E + R);
    double ap = 0.0, ad = 0.0;
    NewtonFactor<NR> fac;
    if constexpr (kUsesTeam<NR>) fac.s = sm.team;
    ipm::Progress pg;
    bool move = false;
    for (;;) {
      // ---- apply the step (none in the first round), residuals and the Newton data
      // (ipm::update, ipm::experts, ipm::ranks)
      double mu5[5] = {0.0, 0.0, 0.0, 0.0, -HUGE_VAL};  // c.lambda, f.w, sum w, sum x z, max |rd|
      double mr[2] = {0.0, -HUGE_VAL};                  // sum diag, max |primal residual|
      LPLB_TICK(P, 0);
      rank_update(L, move, ap, ad, mu5);
LPLB_PRAGMA(unroll)
      for (int j = 0; j < J; ++j) {
        const int m = lane + 32 * j;
        double wk[2], gx[2];
        pair::at_ranks(L, L.w, j, wk[0], wk[1]);
        if (move) L.lam[j] = L.lam[j] + ad * L.dlam[j];
LPLB_PRAGMA(unroll)
        for (int k = 0; k < 2; ++k) {
          double y = L.y[j][k], z = L.z[j][k];
          if (move) {
            y = y + ap * L.dx[j][k];
            z = z + ad * L.dz[j][k];
            L.y[j][k] = y;
            L.z[j][k] = z;
          }
          const double iz = 1.0 / z, rd = (wk[k] - L.lam[j]) - z, xz = y * z;
          L.iy[j][k] = 1.0 / y;
          L.iz[j][k] = iz;
          L.d[j][k] = y * iz;
          L.rd[j][k] = rd;
          gx[k] = (-xz - y * rd) * iz;
          if (L.has[j]) {
            mu5[3] += xz;
            mu5[4] = blk::nanmax(mu5[4], fabs(rd));
          }
        }
        // the expert's sums (ipm::experts: a = d0 + d1; t = da * the other edge's d)
        const double sy = (0.0 + L.y[j][0]) + L.y[j][1], a = (0.0 + L.d[j][0]) + L.d[j][1];
        const double sg = (0.0 + gx[0]) + gx[1];
        const double ia = 1.0 / a, rp = L.c[j] - sy;
        L.ia[j] = ia;
        L.rp_m[j] = rp;
        L.hm[j] = rp - sg;
        L.da[j][0] = L.d[j][0] * ia;
        L.da[j][1] = L.d[j][1] * ia;
        if (L.has[j]) {
          mu5[0] += L.c[j] * L.lam[j];
          mr[1] = blk::nanmax(mr[1], fabs(rp));
          sm.a0[2 * m] = L.y[j][0];
          sm.a0[2 * m + 1] = L.y[j][1];
          sm.a1[2 * m] = L.da[j][0] * (0.0 + L.d[j][1]);
          sm.a1[2 * m + 1] = L.da[j][1] * (L.d[j][0] + 0.0);
          sm.a2[2 * m] = gx[0];
          sm.a2[2 * m + 1] = gx[1];
          sm.a3[2 * m] = L.da[j][0];
          sm.a3[2 * m + 1] = L.da[j][1];
          sm.a4[2 * m] = sm.a4[2 * m + 1] = L.hm[j];
        }
      }
      wreduce<5, 0x10u>(mu5);
      LPLB_TICK(P, 1);
      {
        double rs[4];  // sum y, sum t, sum gx, sum da h
        const double* const plain[3] = {sm.a0, sm.a1, sm.a2};
        rank_sums(v, L, plain, sm.a3, sm.a4, rs);
        rank_newton_data(L, Tv, rs, mr);
      }
      wreduce<2, 2u>(mr);
      LPLB_TICK(P, 2);
      const double rT = 1.0 - mu5[2];
      const double nu = mr[0] / (static_cast<double>(R) * R);
      // ---- stop test; keep the best iterate.  The bound (ipm::bound_met): kernels
      // without spills take it on the lane's registers (the split of the current y,
      // scaled units, into sm.flow, free until the finalisation), the others call
      // bound_met (see there; the current y is in sm.a0, and sm.load is free too)
      auto bound = [&] {
        if constexpr (J == 1 && NR <= 16) {
          pair::put_edges(L, sm.flow,
                          [&](int j, double& e0, double& e1) { split_pair(L, j, L.y[j], 1.0, L.c[j], e0, e1); });
          double acc[4] = {-HUGE_VAL, 0.0, 0.0, 0.0};  // U, f.w+, sum w+, sum_m c_m min w+
          const double wp = blk::nanmax(L.w, 0.0);
          const double ld = L.f + pair::rank_sum(v, L, sm.flow);
          if (L.has_rank) {
            acc[0] = ld;
            acc[1] = L.f * wp;
            acc[2] = wp;
          }
LPLB_PRAGMA(unroll)
          for (int j = 0; j < J; ++j) {
            double wa, wb;
            pair::at_ranks(L, wp, j, wa, wb);
            if (L.has[j]) acc[3] += L.c[j] * (wb < wa ? wb : wa);
          }
          wreduce<4, 1u>(acc);
          return ipm::bound_verdict(acc, tol);
        } else {
          if (L.has_rank) sm.load[lane] = blk::nanmax(L.w, 0.0);
          return bound_met(v, loads, scale, sm.a0, sm.load, sm.flow, L.f, tol);
        }
      };
      bool better;
      const bool stop =
          ipm::stop_test(pg, move, Tv, mu5, mr, rT, cnorm, tol, res.iterations, max_iters, better, bound);
      if (better)
LPLB_PRAGMA(unroll)
        for (int j = 0; j < J; ++j) {
          L.best[j][0] = L.y[j][0];
          L.best[j][1] = L.y[j][1];
        }
      if (stop) break;
      // ---- S~ and its factor (ipm::assemble, ipm::factor)
      pair::put_edges(L, sm.a0, [&](int j, double& e0, double& e1) {
        e0 = L.d[j][0];
        e1 = L.d[j][1];
      });
      pair::put_edges(L, sm.a1, [&](int j, double& e0, double& e1) {
        e0 = L.da[j][0];
        e1 = L.da[j][1];
      });
      LPLB_TICK(P, 10);
      fac.stage_predictor(R, L.u1, L.u2);
      const int bad = factor_regularised(fac, sm.schur, R, L, nu, [&](int n_reg, double reg_scale) {
        assemble<kUsesTeam<NR>>(v, L, sm, nu, n_reg, reg_scale);
      });
      LPLB_TICK(P, 4);
      ++res.iterations;
      if (bad > 0) break;  // no usable factor: the reference's step is not finite
      const double mu = mu5[3] / n_var;
      // ---- predictor (affine scaling direction, and S~^-1 1 for the T border), then
      // the corrector (centring + second-order term) with the same factorisation
      double us[2], dir[5], u2sum = 1.0, dTp = 0.0, smu = 0.0;
      LPLB_PRAGMA(unroll 1)
      for (int phase = 0; phase < 2; ++phase) {
        const bool corr = phase == 1;
        LPLB_TICK(P, 10);
        if (corr) {
          // ipm::corrector_rhs: h (experts), then g into u1 (ranks)
LPLB_PRAGMA(unroll)
          for (int j = 0; j < J; ++j) {
            const int m = lane + 32 * j;
            double gx[2];
LPLB_PRAGMA(unroll)
            for (int k = 0; k < 2; ++k) {
              const double y = L.y[j][k];
              gx[k] = (((smu - y * L.z[j][k]) - L.aff[j][k]) - y * L.rd[j][k]) * L.iz[j][k];
            }
            L.hm[j] = L.rp_m[j] - ((0.0 + gx[0]) + gx[1]);
            if (L.has[j]) {
              sm.a0[2 * m] = gx[0];
              sm.a0[2 * m + 1] = gx[1];
              sm.a1[2 * m] = L.da[j][0];
              sm.a1[2 * m + 1] = L.da[j][1];
              sm.a2[2 * m] = sm.a2[2 * m + 1] = L.hm[j];
            }
          }
          const double* const plain[1] = {sm.a0};
          double gh[2];  // sum gx, sum da h
          rank_sums(v, L, plain, sm.a1, sm.a2, gh);
          rank_corrector_rhs(L, smu, gh);
        }
        LPLB_TICK(P, 5);
        subst_phase(corr, fac, R, L.u1, L.u2, us);
        if (!corr) u2sum = us[1];
        dTp = (us[0] - rT) / u2sum;
        // ipm::direction: dw = u1 - dT' u2, dlambda, dx, dz; the predictor keeps dx dz
        DirSums ds;
        rank_direction(L, corr, smu, dTp, ds);
LPLB_PRAGMA(unroll)
        for (int j = 0; j < J; ++j) {
          double dwk[2];
          pair::at_ranks(L, L.dw, j, dwk[0], dwk[1]);
          const double sd = (0.0 + L.d[j][0] * dwk[0]) + L.d[j][1] * dwk[1];
          const double dl = (L.hm[j] + sd) * L.ia[j];
          L.dlam[j] = dl;
LPLB_PRAGMA(unroll)
          for (int k = 0; k < 2; ++k) {
            const double x = L.y[j][k], z = L.z[j][k], xz = x * z;
            const double rc = corr ? (smu - xz) - L.aff[j][k] : -xz;
            const double dx = L.d[j][k] * (dl - dwk[k]) + (rc - x * L.rd[j][k]) * L.iz[j][k];
            const double dz = (rc - z * dx) * L.iy[j][k];
            L.dx[j][k] = dx;
            L.dz[j][k] = dz;
            if (!corr) L.aff[j][k] = dx * dz;
            if (L.has[j]) ds.fold(x, z, L.iy[j][k], L.iz[j][k], dx, dz);
          }
        }
        wreduce<5, 0x3u>(ds.acc);
        LPLB_TICK(P, 7);
LPLB_PRAGMA(unroll)
        for (int k = 0; k < 5; ++k) dir[k] = ds.acc[k];
        if (!corr) smu = ipm::centring(dir, mu5[3], mu, n_var);
      }
      const double dT = dTp + nu * rT;
      if (!ipm::step_lengths(dir, mu, ap, ad)) break;  // a NaN reached dx or dz: frozen
      Tv = Tv + ap * dT;
      move = true;
    }
    res.converged = pg.converged ? 1 : 0;
  }

  // ---- finalisation (ipm::solve's): original units, non-negative, each expert's
  // edges sum to its demand (zero demand: 0; vanished flow: the even split)
  pair::put_edges(L, sm.flow, [&](int j, double& e0, double& e1) {
    split_pair(L, j, L.best[j], scale, L.demand[j], e0, e1);
  });
  res.objective = final_loads(v, L, sm.flow, sm.load);
  LPLB_TICK(P, 8);
#ifdef LPLB_PROF
  if (lane == 0)
    printf("ipprof blk %d R %d M %d its %d: start %lld update %lld ranks %lld assemble+factor %lld crhs %lld "
           "subst %lld dir %lld final %lld other %lld\n",
           blockIdx.x, v.R, v.M, res.iterations, P.acc[0], P.acc[1], P.acc[2], P.acc[4], P.acc[5], P.acc[6],
           P.acc[7], P.acc[8], P.acc[10]);
#endif
  return res;
}

#endif  // __CUDA_ARCH__ || LPLB_WARP_EMULATION

}  // namespace ipm_pair
}  // namespace lplb
