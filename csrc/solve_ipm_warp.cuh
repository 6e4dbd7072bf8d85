// The IPM (solve_ipm.cuh) for a small component of any placement in one warp: the
// same Mehrotra iteration as ipm::solve and ipm_pair::solve, for components whose
// experts may have any number of copies (EPLB placements: a hot expert on three or
// more ranks), as long as the component has at most 32 ranks, 32 movable experts and
// 32 edges.
//
// Layout: lane l holds edge l, rank l and expert l (each where it exists).  An edge
// reads its rank's and its expert's values by shuffles; a rank sums its edges' values
// and an expert its edges' values from per-edge shared arrays, each in the order
// ipm::solve sums them (rank_edges order; an expert's edges in edge order, with the
// exclusive prefix / suffix sums of ipm::experts).  The Schur matrix is built row by
// row (lane r: for each edge of r, the expert's other edges; the entry (r, p) summed
// in expert order, the edge on the larger rank taking d, as ipm::assemble) and
// solved as ipm_pair::solve solves it (ipm_pair::NewtonFactor: factor_reg, or the
// helper warps' inverse beyond 16 ranks).  Differences from
// ipm::solve are rounding only: tests compare the two on every instance that fits.
#pragma once

#include "block_ops.cuh"
#include "solve_ipm.cuh"
#include "solve_ipm_pair.cuh"
#include "solve_pair.cuh"
#include "solve_view.cuh"

namespace lplb {
namespace ipm_warp {

constexpr int kMaxRanks = 32;
constexpr int kMaxExperts = 32;
constexpr int kMaxEdges = 32;

// Shared arrays of one block.  Sizes: E edges, R ranks.
struct Smem {
  double *y, *d, *gx, *t, *da, *h, *dw;  // [E] per-edge values (h, dw: of the edge's expert, rank)
  double* schur;                      // [R x (R + 1)], padded rows
  double *flow, *load;                // [E] (the best iterate until the finalisation), [R]
  team_inverse::Smem team;            // (the instances with ipm_pair::kUsesTeam)

  // Carve the arrays out of base; returns bytes used (base == nullptr: size only).
  LPLB_HD static size_t layout(Smem* s, char* base, int R, int E, bool team) {
    Smem sizing;
    Smem& o = s ? *s : sizing;
    blk::Carve buf{s ? base : nullptr};
    for (double** p : {&o.y, &o.d, &o.gx, &o.t, &o.da, &o.h, &o.dw}) buf.dbl(*p, E);
    buf.dbl(o.schur, static_cast<size_t>(R) * (R + 1));
    buf.dbl(o.flow, E);
    buf.dbl(o.load, R);
    if (team) team_inverse::Smem::carve(buf, o.team);
    return buf.off;
  }
};

#if defined(__CUDA_ARCH__) || defined(LPLB_WARP_EMULATION)

using pair::kFull;
using pair::kMaxDegree;
using pair::wmax;
// the rank lane's parts of the passes, the factor and the reductions
using ipm_pair::DirSums;
using ipm_pair::factor_regularised;
using ipm_pair::final_loads;
using ipm_pair::rank_corrector_rhs;
using ipm_pair::rank_direction;
using ipm_pair::rank_newton_data;
using ipm_pair::rank_shift;
using ipm_pair::rank_start;
using ipm_pair::rank_sums;
using ipm_pair::rank_update;
using ipm_pair::subst_phase;
using pair::wreduce;

// Registers of lane l: rank l, expert l, edge l.  Names as ipm::Work's arrays.
struct Lane {
  // rank
  bool has_rank;
  int deg;
  int edges[kMaxDegree];
  int more_lo, more_hi;
  double fixed, f, s, zs, is, izs, ds, rds, gxs, w, dw, dxs, dzs, affs, rp_r, diag, u1, u2;
  // expert
  bool has_exp;
  int lo, hi;  // its edges
  double demand, c, lam, ia, hm, rp_m, dlam;
  // edge
  bool has_edge;
  int er, em;  // its rank and expert
  double y, z, iy, iz, d, da, rd, dx, dz, aff;
};

// S~ into sm.schur (ipm_pair::assemble_row); d and da of every edge must be in sm.d /
// sm.da; an edge's terms pair it with each other edge of its expert.
template <bool kSums>
__device__ __forceinline__ void assemble(const View& v, const Lane& L, const Smem& sm, double nu, int n_reg,
                                         double reg_scale) {
  const int R = v.R, r = threadIdx.x, lda = R + 1;
  __syncwarp();
  if (L.has_rank)
    ipm_pair::assemble_row<kSums>(
        sm.schur + static_cast<size_t>(r) * lda, R, r, L.diag, nu, n_reg, reg_scale, [&](double* row) {
          auto add = [&](int e) {
            const int m = v.edge_exp[e];
            for (int o = v.exp_ptr[m]; o < v.exp_ptr[m + 1]; ++o) {
              if (o == e) continue;
              const int p = v.edge_rank[o];
              if (r > p)
                row[p] += sm.d[e] * sm.da[o];
              else
                row[p] += sm.d[o] * sm.da[e];
            }
          };
LPLB_PRAGMA(unroll)
          for (int q = 0; q < kMaxDegree; ++q)
            if (q < L.deg) add(L.edges[q]);
          for (int q = L.more_lo; q < L.more_hi; ++q) add(v.rank_edges[q]);
        });
  __syncwarp();
}

// Solves the component (one warp, at most NR ranks); the split ends in sm.flow, its
// loads in sm.load, as ipm::solve leaves them in w.flow / w.load.  v: the staged view
// (index arrays in shared memory).
template <int NR, typename T>
__device__ ipm::Result solve(const View& v, const T* loads, const Smem& sm, int max_iters, double tol) {
  const int R = v.R, E = v.E, lane = threadIdx.x;
  ipm::Result res{1, 0, 0.0};
  Lane L;
  pair::setup_rank(v, loads, L);
  L.has_exp = lane < v.M;
  L.lo = L.has_exp ? v.exp_ptr[lane] : 0;
  L.hi = L.has_exp ? v.exp_ptr[lane + 1] : 0;
  L.demand = L.has_exp ? static_cast<double>(loads[v.exp_log[lane]]) : 0.0;
  L.has_edge = lane < E;
  L.er = L.has_edge ? v.edge_rank[lane] : 0;
  L.em = L.has_edge ? v.edge_exp[lane] : 0;
  double sum_f, sum_c;
  {
    double acc[2] = {L.has_rank ? L.fixed : 0.0, L.demand};
    wreduce<2, 0u>(acc);
    sum_f = acc[0];
    sum_c = acc[1];
  }
  const double scale = (sum_f + sum_c) / R;
  const bool trivial = scale <= 0.0;
  if (L.has_edge) sm.flow[lane] = 0.0;  // the best iterate lives in sm.flow

  if (E > 0 && !trivial) {
    // ---- starting point: even split, T = its max load, uniform duals, Mehrotra shift
    double mx[2] = {-HUGE_VAL, -HUGE_VAL};
    L.c = L.demand / scale;
    const int ne = L.hi - L.lo;
    const double y0 = L.c / (ne > 1 ? static_cast<double>(ne) : 1.0);
    if (L.has_exp) mx[0] = L.c;
    L.f = L.fixed / scale;
    if (L.has_rank) mx[1] = L.f;
    wreduce<2, 3u>(mx);
    const double cnorm = 1.0 + blk::nanmax(blk::nanmax(mx[0], 0.0), mx[1]);
    L.y = shfl(y0, L.em);
    if (L.has_edge) sm.y[lane] = L.y;
    const double load = L.f + pair::rank_sum(v, L, sm.y);
    double Tv = wmax(L.has_rank ? load : -HUGE_VAL);
    const double wi = 1.0 / R;
    double sums[3] = {0.0, 0.0, 0.0};  // x.z, sum x, sum z
    rank_start(L, Tv, load, wi, sums);
    if (L.has_edge) {
      sums[0] += L.y * wi;
      sums[1] += L.y;
      sums[2] += wi;
    }
    wreduce<3, 0u>(sums);
    const double dx0 = blk::nanmax(0.5 * sums[0] / sums[2], 0.1);
    const double dz0 = blk::nanmax(0.5 * sums[0] / (sums[1] > 1e-300 ? sums[1] : 1e-300), 0.1 / R);
    L.y = L.y + dx0;
    L.z = wi + dz0;
    L.dx = L.dz = 0.0;
    L.lam = L.dlam = 0.0;
    rank_shift(L, wi, dx0, dz0);

    const double n_var = static_cast<double>(E + R);
    double ap = 0.0, ad = 0.0;
    ipm_pair::NewtonFactor<NR> fac;
    if constexpr (ipm_pair::kUsesTeam<NR>) fac.s = sm.team;
    ipm::Progress pg;
    bool move = false;
    for (;;) {
      // ---- apply the step (none in the first round), residuals and the Newton data
      // (ipm::update, ipm::experts, ipm::ranks)
      double mu5[5] = {0.0, 0.0, 0.0, 0.0, -HUGE_VAL};  // c.lambda, f.w, sum w, sum x z, max |rd|
      double mr[2] = {0.0, -HUGE_VAL};                  // sum diag, max |primal residual|
      rank_update(L, move, ap, ad, mu5);
      if (move) {
        L.lam = L.lam + ad * L.dlam;
        L.y = L.y + ap * L.dx;
        L.z = L.z + ad * L.dz;
      }
      {
        const double wr = shfl(L.w, L.er), lm = shfl(L.lam, L.em);
        const double iz = 1.0 / L.z, rd = (wr - lm) - L.z, xz = L.y * L.z;
        L.iy = 1.0 / L.y;
        L.iz = iz;
        L.d = L.y * iz;
        L.rd = rd;
        const double gx = (-xz - L.y * rd) * iz;
        if (L.has_edge) {
          mu5[3] += xz;
          mu5[4] = blk::nanmax(mu5[4], fabs(rd));
          sm.y[lane] = L.y;
          sm.d[lane] = L.d;
          sm.gx[lane] = gx;
        }
      }
      __syncwarp();
      if (L.has_exp) {
        // ipm::experts: a = sum d, t = da * (the other edges' d: exclusive prefix +
        // suffix sums), h = rp - sum gx
        double sy = 0.0, a = 0.0, sg = 0.0;
        for (int e = L.lo; e < L.hi; ++e) {
          sy += sm.y[e];
          sm.t[e] = a;  // exclusive prefix, for now
          a += sm.d[e];
          sg += sm.gx[e];
        }
        const double ia = 1.0 / a, rp = L.c - sy;
        L.ia = ia;
        L.rp_m = rp;
        L.hm = rp - sg;
        double suf = 0.0;
        for (int e = L.hi - 1; e >= L.lo; --e) {
          const double da = sm.d[e] * ia;
          sm.da[e] = da;
          sm.t[e] = da * (sm.t[e] + suf);
          sm.h[e] = L.hm;
          suf += sm.d[e];
        }
        mu5[0] += L.c * L.lam;
        mr[1] = blk::nanmax(mr[1], fabs(rp));
      }
      wreduce<5, 0x10u>(mu5);
      {
        double rs[4];  // sum y, sum t, sum gx, sum da h
        const double* const plain[3] = {sm.y, sm.t, sm.gx};
        rank_sums(v, L, plain, sm.da, sm.h, rs);
        L.da = L.has_edge ? sm.da[lane] : 0.0;
        rank_newton_data(L, Tv, rs, mr);
      }
      wreduce<2, 2u>(mr);
      const double rT = 1.0 - mu5[2];
      const double nu = mr[0] / (static_cast<double>(R) * R);
      // ---- stop test; keep the best iterate.  The bound (ipm_pair::bound_met): the
      // current y is in sm.y; sm.t (summed by rank_sums above) and sm.load are free here
      auto bound = [&] {
        if (L.has_rank) sm.load[lane] = blk::nanmax(L.w, 0.0);
        return ipm_pair::bound_met(v, loads, scale, sm.y, sm.load, sm.t, L.f, tol);
      };
      bool better;
      const bool stop =
          ipm::stop_test(pg, move, Tv, mu5, mr, rT, cnorm, tol, res.iterations, max_iters, better, bound);
      if (better && L.has_edge) sm.flow[lane] = L.y;
      if (stop) break;
      // ---- S~ and its factor (ipm::assemble, ipm::factor); sm.d and sm.da hold d, da
      fac.stage_predictor(R, L.u1, L.u2);
      const int bad = factor_regularised(fac, sm.schur, R, L, nu, [&](int n_reg, double reg_scale) {
        assemble<ipm_pair::kUsesTeam<NR>>(v, L, sm, nu, n_reg, reg_scale);
      });
      ++res.iterations;
      if (bad > 0) break;  // no usable factor: the reference's step is not finite
      const double mu = mu5[3] / n_var;
      // ---- predictor (affine scaling direction, and S~^-1 1 for the T border), then
      // the corrector (centring + second-order term) with the same factorisation
      double us[2], dir[5], u2sum = 1.0, dTp = 0.0, smu = 0.0;
      LPLB_PRAGMA(unroll 1)
      for (int phase = 0; phase < 2; ++phase) {
        const bool corr = phase == 1;
        if (corr) {
          // ipm::corrector_rhs: h (experts), then g into u1 (ranks)
          const double gx = (((smu - L.y * L.z) - L.aff) - L.y * L.rd) * L.iz;
          if (L.has_edge) sm.gx[lane] = gx;
          __syncwarp();
          if (L.has_exp) {
            double sg = 0.0;
            for (int e = L.lo; e < L.hi; ++e) sg += sm.gx[e];
            L.hm = L.rp_m - sg;
            for (int e = L.lo; e < L.hi; ++e) sm.h[e] = L.hm;
          }
          const double* const plain[1] = {sm.gx};
          double gh[2];  // sum gx, sum da h
          rank_sums(v, L, plain, sm.da, sm.h, gh);
          rank_corrector_rhs(L, smu, gh);
        }
        subst_phase(corr, fac, R, L.u1, L.u2, us);
        if (!corr) u2sum = us[1];
        dTp = (us[0] - rT) / u2sum;
        // ipm::direction: dw = u1 - dT' u2, dlambda, dx, dz; the predictor keeps dx dz
        DirSums ds;
        rank_direction(L, corr, smu, dTp, ds);
        const double dwr = shfl(L.dw, L.er);
        if (L.has_edge) sm.dw[lane] = dwr;
        __syncwarp();
        if (L.has_exp) {
          double sd = 0.0;
          for (int e = L.lo; e < L.hi; ++e) sd += sm.d[e] * sm.dw[e];
          L.dlam = (L.hm + sd) * L.ia;
        }
        __syncwarp();  // (sm.dw may be rewritten next)
        {
          const double dl = shfl(L.dlam, L.em);
          const double x = L.y, z = L.z, xz = x * z;
          const double rc = corr ? (smu - xz) - L.aff : -xz;
          const double dx = L.d * (dl - dwr) + (rc - x * L.rd) * L.iz;
          const double dz = (rc - z * dx) * L.iy;
          L.dx = dx;
          L.dz = dz;
          if (!corr) L.aff = dx * dz;
          if (L.has_edge) ds.fold(x, z, L.iy, L.iz, dx, dz);
        }
        wreduce<5, 0x3u>(ds.acc);
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
  __syncwarp();
  if (L.has_exp) {
    const int lo = L.lo;
    ipm::split_expert(
        L.hi - lo, scale, L.demand, [&](int k) { return sm.flow[lo + k]; },
        [&](int k) { return static_cast<double>(v.edge_mult[lo + k]); }, [&](int k, double x) { sm.flow[lo + k] = x; });
  }
  res.objective = final_loads(v, L, sm.flow, sm.load);
  return res;
}

#endif  // __CUDA_ARCH__ || LPLB_WARP_EMULATION

}  // namespace ipm_warp
}  // namespace lplb
