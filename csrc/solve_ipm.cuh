// Interior-point split of one connected component in one thread block (float64), the
// kernel form of lplb_plugin/solvers/ipm.py (that module's docstring has the
// algorithm): Mehrotra predictor-corrector on the scaled LP
//
//     min T  s.t.  sum_r y_mr = c_m,  T - sum_m y_mr - s_r = f_r,  y, s >= 0,
//
// same scaling (mean rank load), same starting point and centring shift, same normal
// equations reduced to the rank-side Schur complement (assembled cancellation-free,
// solved with the nu 1 1^T border trick, factored once per iteration with the same
// regularisation on failure), same step to the boundary over all variables, same stop
// test, stall rule and iteration cap, and the same finalisation to a valid split.
//
// Storage is sparse (View's CSR): y / z_y per edge, s / z_s / w per rank, lambda per
// expert; only the R x R Schur matrix is dense.  Edge variables are per (expert, rank)
// pair as in the reference: edge_mult only enters the finalisation's even split.
// Written with block_ops.cuh only, so it also builds as CPU code for the tests.
//
// Differences from the reference, all at the level of rounding: sums run in another
// order (CSR order, tree reductions on the device); 1/x and 1/z are formed once per
// iteration and multiplied; S~ is factored as L D L^T (blk::ldlt_factor: no square
// roots, the same pivot <= 0 failure test and the same regularisation); and
// mu_aff = sum (x + ap dx)(z + ad dz) is taken from the expanded sums
// (sum x z + ap sum dx z + ad sum x dz + ap ad sum dx dz), saving a pass.  The host
// build follows the torch IPM's iterates (iteration counts and converged flags equal,
// flows within 1e-8 of the max load on the test instances).
//
// One iteration, as block barriers (device, R <= 8): update 2, experts 1, ranks 2,
// assemble 1, factor 1 (+ one __syncwarp per column; columns whose trailing triangle
// has more than 32 entries take a block barrier each), predictor: subst 1 + direction
// 2, corrector: right-hand side 2 + subst 1 + direction 2: 15 in all; plus 3 (split,
// sums) for the stop test's bound on the iterations near convergence that form it
// (stop_test's gating; in the torch IPM on the test instances, instances(200, 17) at
// tol 1e-5, 0-3 such iterations per solve, 0 or 1 in 171 of the 200).
#pragma once

#include "block_ops.cuh"
#include "solve_view.cuh"

namespace lplb {
namespace ipm {

constexpr double kEta = 0.995;     // fraction to the boundary (lower bound)
constexpr double kSafety = 0.1;    // the stop test runs at kSafety * tol
constexpr double kBoundGate = 10.0;  // ... and the bound test up to kBoundGate * tol (stop_test)
constexpr int kStall = 5;          // iterations without a better iterate before stopping
constexpr double kEpsF64 = 2.220446049250313e-16;

// float64 scratch of one block.  Sizes: R ranks, M experts, E edges of the component.
struct Work {
  // [E]: primal y, dual slack z, 1/y, 1/z, d = y/z, d/a, d/a * (a - d), dual residual,
  // predictor's gx, direction, dx_aff dz_aff, best iterate, answer
  double *y, *z, *iy, *iz, *d, *da, *t, *rd, *gx, *dx, *dz, *aff, *best, *flow;
  // [R]: fixed loads (original, scaled), slack s / z_s and the same per-entry values,
  // dual w, dw, Schur diagonal, rank residual, the two solutions, loads
  double *fixed, *f, *s, *zs, *is, *izs, *ds, *rds, *gxs, *w, *dw, *dxs, *dzs, *affs, *diag, *rp_r, *u1, *u2, *load;
  // [M]: demand (original, scaled), lambda, 1/a (a = sum of d), h, expert residual, dlambda
  double *demand, *c, *lam, *ia, *hm, *rp_m, *dlam;
  // [R * R], leading dimension R
  double* schur;
  // [R (R + 1) / 2]: blk::tri_index of each lower-triangle entry, (i << 16) | j; with
  // the Schur matrix in shared memory only (nullptr otherwise: computed each time)
  int* tri;

  // Carve the arrays out of one buffer; returns bytes used.  Call with base == nullptr
  // to size it.
  LPLB_HD static size_t layout(Work* w, char* base, int R, int M, int E, bool schur_inside) {
    Work sizing;
    Work& o = w ? *w : sizing;
    blk::Carve buf{w ? base : nullptr};
    for (double** p : {&o.y, &o.z, &o.iy, &o.iz, &o.d, &o.da, &o.t, &o.rd, &o.gx, &o.dx, &o.dz, &o.aff, &o.best,
                       &o.flow})
      buf.dbl(*p, E);
    for (double** p : {&o.fixed, &o.f, &o.s, &o.zs, &o.is, &o.izs, &o.ds, &o.rds, &o.gxs, &o.w, &o.dw, &o.dxs,
                       &o.dzs, &o.affs, &o.diag, &o.rp_r, &o.u1, &o.u2, &o.load})
      buf.dbl(*p, R);
    for (double** p : {&o.demand, &o.c, &o.lam, &o.ia, &o.hm, &o.rp_m, &o.dlam}) buf.dbl(*p, M);
    o.schur = nullptr;
    o.tri = nullptr;
    if (schur_inside) {
      buf.dbl(o.schur, static_cast<size_t>(R) * R);
      buf.itg(o.tri, static_cast<size_t>(R) * (R + 1) / 2);
    }
    return buf.off;
  }
};

struct Result {
  int converged;
  int iterations;
  double objective;  // max rank load of the returned split (original units)
};

LPLB_HD double clamp(double x, double lo, double hi) {  // torch.clamp: NaN stays NaN
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

LPLB_HD bool finite(double x) { return x - x == 0.0; }

// Passes over several kinds of index (edges, ranks, experts) give each kind a range
// starting at a multiple of 32, so that on the device no warp runs two kinds' code one
// after the other.
LPLB_HD int warp_round(int n) { return (n + 31) & ~31; }

// min(1, eta * max{a : x + a dx >= 0}) from the largest relative decrease r
LPLB_HD double step_to_boundary(double r, double eta) { return eta / blk::nanmax(r, eta); }

// One expert's part of the finalisation (ipm.finalize_flow): x = y * scale with
// non-finite and negative entries 0, rescaled to sum to `demand`; zero demand: 0; a
// vanished flow: the even split over the expert's slots.  y(k), mult(k): its k-th
// edge's value and slots (k < n); put(k, x) takes the result (it may overwrite y(k):
// y(k) is read before put(k)).  Shared by the finalisation of the returned split and
// the stop test's bound (scaled units, scale 1), so that the bound is about exactly
// the split that would be returned.
template <typename Y, typename Mult, typename Put>
LPLB_HD void split_expert(int n, double scale, double demand, Y&& y, Mult&& mult, Put&& put) {
  auto x = [&](int k) {
    double xv = y(k) * scale;
    xv = finite(xv) ? xv : 0.0;
    return xv > 0.0 ? xv : 0.0;
  };
  double tot = 0.0, copies = 0.0;
  for (int k = 0; k < n; ++k) {
    tot += x(k);
    copies += mult(k);
  }
  const bool ok = tot > 0.0;
  const double kk = ok ? demand / tot : 0.0;
  for (int k = 0; k < n; ++k) {
    const double out = ok ? x(k) * kk : demand * mult(k) / copies;
    put(k, demand > 0.0 ? out : 0.0);
  }
}

// Sum of a per-edge array over rank r's edges (rank_edges order).
LPLB_HD double rank_sum(const View& v, const double* x, int r) {
  double s = 0.0;
  for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) s += x[v.rank_edges[q]];
  return s;
}

// The bound test's verdict from its sums, acc = {U, f.w+, sum w+, sum_m c_m min w+}:
// U is the max rank load of the split the finalisation makes of the current y, and
// LB = (f.w+ + sum_m c_m min_{r ~ m} w+_r) / sum w+ (w+ = max(w, 0)) bounds the
// optimum from below for any such w (weak duality: max_r load_r >= the w+-weighted
// mean load, and each expert's demand is weighted at least by its cheapest rank's
// w+).  U - LB <= tol LB puts U within tol of the optimum.  (ipm._split_bound and
// its test in ipm._ipm_core)
LPLB_HD bool bound_verdict(const double (&acc)[4], double tol) {
  const double sw = acc[2];
  const double lb = (acc[1] + acc[3]) / (sw > 0.0 ? sw : 1.0);
  return sw > 0.0 && acc[0] - lb <= tol * lb;
}

// ---------------------------------------------------------------- scalar steps
// The iteration's scalar logic, the same for this block solver and the one-warp
// solvers (every thread holds the same values, so control flow stays uniform).
// Sums of a round, as the passes return them: mu5 = {c.lambda, f.w, sum w, sum x z,
// max |dual residual|}, mr = {sum of the Schur diagonal, max |primal residual|};
// of a direction: dir = {max -dx/x, max -dz/z, sum dx z, sum x dz, sum dx dz}.
struct Progress {
  double best_merit = HUGE_VAL;
  int stall = 0;
  bool converged = false;
};

// The stop test of a round (merit = max of the relative gap and the primal and dual
// infeasibilities); better: the iterate improves on the best so far (the starting
// point, move false, is the first best).  Converged: merit <= kSafety tol, or, for a
// best iterate with kSafety tol < merit <= kBoundGate tol, bound_met(): the split
// returned from this iterate is provably within tol of the optimum (bound_verdict).
// bound_met runs passes over the component, so it is called only under that gating
// (uniform: every thread holds the same merit).  Returns whether to stop.
template <typename Bound>
LPLB_HD bool stop_test(Progress& pg, bool move, double Tv, const double (&mu5)[5], const double (&mr)[2], double rT,
                       double cnorm, double tol, int iterations, int max_iters, bool& better, Bound&& bound_met) {
  better = true;
  if (!move) return max_iters <= 0;
  const double g = fabs(Tv - mu5[0] - mu5[1]) / (1.0 + fabs(Tv));
  const double pinf = mr[1] / cnorm;
  const double dinf = blk::nanmax(mu5[4], fabs(rT)) / 2.0;
  const double merit = blk::nanmax(blk::nanmax(g, pinf), dinf);
  better = merit < pg.best_merit;
  if (better) {
    pg.best_merit = merit;
    pg.stall = 0;
  } else {
    ++pg.stall;
  }
  const double stop_tol = kSafety * tol;
  const bool close = better && merit > stop_tol && merit <= kBoundGate * tol;
  const bool met = better && (merit <= stop_tol || (close && bound_met()));
  pg.converged = pg.converged || met;
  return met || pg.stall >= kStall || iterations == max_iters;
}

// The corrector's centring target sigma mu from the predictor's direction
// (Mehrotra: sigma = (mu_aff / mu)^3, mu_aff from the expanded
// sum (x + ap dx)(z + ad dz)); xz: sum x z.
LPLB_HD double centring(const double (&dir)[5], double xz, double mu, double n_var) {
  const double pa = step_to_boundary(dir[0], 1.0), pd = step_to_boundary(dir[1], 1.0);
  const double mu_aff = (xz + pa * dir[2] + pd * dir[3] + pa * pd * dir[4]) / n_var;
  double sigma = clamp(mu_aff / mu, 0.0, 1.0);
  sigma = sigma * sigma * sigma;
  return sigma * mu;
}

// The primal and dual step lengths of the corrector's direction; false when a NaN
// reached it (the iteration then stops, frozen).
LPLB_HD bool step_lengths(const double (&dir)[5], double mu, double& ap, double& ad) {
  const double eta_max = 1.0 - 100.0 * kEpsF64;
  const double eta = clamp(1.0 - mu, kEta, eta_max);
  ap = step_to_boundary(dir[0], eta);
  ad = step_to_boundary(dir[1], eta);
  return ap + ad < 3.0;
}

// ---------------------------------------------------------------- passes
// The iterate: y, z (edges), s, zs, w (ranks), lam (experts) in Work, T with the caller.
// After a step (move), the three passes below apply it: `update` moves y, z, s, zs
// (and reads the moved w, lambda inline), `experts` stores the moved lambda, `ranks`
// the moved w, so that no pass reads what another index of it writes.
//
// Pass 1, edges and slacks: the step, 1/x, 1/z, d = x/z, the dual residual
// rd = w - lambda - z and the predictor's gx = (-x z - x rd) / z.  Sums
// {c.lambda, f.w, sum w, sum x z} and max |rd|.
LPLB_HD void update(const blk::Team& t, const View& v, const Work& w, bool move, double ap, double ad,
                    double (&out)[5]) {
  const int E = v.E, R = v.R, E0 = warp_round(E), R0 = E0 + warp_round(R);
  blk::reduce_n<5, 0x10u>(t, R0 + v.M, [&](int i, double* acc) {
    if (i < E0) {
      if (i >= E) return;
      const int r = v.edge_rank[i], m = v.edge_exp[i];
      double y = w.y[i], z = w.z[i], wr = w.w[r], lm = w.lam[m];
      if (move) {
        y = y + ap * w.dx[i];
        z = z + ad * w.dz[i];
        wr = wr + ad * w.dw[r];
        lm = lm + ad * w.dlam[m];
        w.y[i] = y;
        w.z[i] = z;
      }
      const double iz = 1.0 / z, rd = (wr - lm) - z, xz = y * z;
      w.iy[i] = 1.0 / y;
      w.iz[i] = iz;
      w.d[i] = y * iz;
      w.rd[i] = rd;
      w.gx[i] = (-xz - y * rd) * iz;
      acc[3] += xz;
      acc[4] = blk::nanmax(acc[4], fabs(rd));
    } else if (i < R0) {
      const int r = i - E0;
      if (r >= R) return;
      double s = w.s[r], zs = w.zs[r], wr = w.w[r];
      if (move) {
        s = s + ap * w.dxs[r];
        zs = zs + ad * w.dzs[r];
        wr = wr + ad * w.dw[r];
        w.s[r] = s;
        w.zs[r] = zs;
      }
      const double izs = 1.0 / zs, rd = wr - zs, xz = s * zs;
      w.is[r] = 1.0 / s;
      w.izs[r] = izs;
      w.ds[r] = s * izs;
      w.rds[r] = rd;
      w.gxs[r] = (-xz - s * rd) * izs;
      acc[1] += w.f[r] * wr;
      acc[2] += wr;
      acc[3] += xz;
      acc[4] = blk::nanmax(acc[4], fabs(rd));
    } else {
      const int m = i - R0;
      const double lm = move ? w.lam[m] + ad * w.dlam[m] : w.lam[m];
      acc[0] += w.c[m] * lm;
    }
  }, out);
}

// Pass 2, experts: the moved lambda; a = sum of d, the expert residual, and for each
// edge da = d / a and t = da * (the expert's other d, exclusive prefix + suffix sums:
// no cancellation), and the predictor's h = rp_m - sum gx.
LPLB_HD void experts(const blk::Team& t, const View& v, const Work& w, bool move, double ad) {
  blk::pfor(t, v.M, [&](int m) {
    if (move) w.lam[m] = w.lam[m] + ad * w.dlam[m];
    const int lo = v.exp_ptr[m], hi = v.exp_ptr[m + 1];
    double sy = 0.0, a = 0.0, sg = 0.0;
    for (int e = lo; e < hi; ++e) {
      sy += w.y[e];
      w.t[e] = a;  // exclusive prefix, for now
      a += w.d[e];
      sg += w.gx[e];
    }
    const double ia = 1.0 / a, rp = w.c[m] - sy;
    w.ia[m] = ia;
    w.rp_m[m] = rp;
    w.hm[m] = rp - sg;
    double suf = 0.0;
    for (int e = hi - 1; e >= lo; --e) {
      const double da = w.d[e] * ia;
      w.da[e] = da;
      w.t[e] = da * (w.t[e] + suf);
      suf += w.d[e];
    }
  });
}

// Pass 3, ranks: the moved w; rank residual, Schur diagonal d_s + sum t and the
// predictor's right-hand side g = rp_r + sum gx + gx_s + sum da h into u1 (1 into u2).
// Returns {sum diag, max |primal residual|}.
LPLB_HD void ranks(const blk::Team& t, const View& v, const Work& w, bool move, double ad, double T,
                   double (&out)[2]) {
  const int M = v.M, M0 = warp_round(M);
  blk::reduce_n<2, 0x2u>(t, M0 + v.R, [&](int i, double* acc) {
    if (i < M0) {
      if (i < M) acc[1] = blk::nanmax(acc[1], fabs(w.rp_m[i]));
      return;
    }
    const int r = i - M0;
    if (move) w.w[r] = w.w[r] + ad * w.dw[r];
    double sy = 0.0, st = 0.0, sg = 0.0, sh = 0.0;
    for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) {
      const int e = v.rank_edges[q];
      sy += w.y[e];
      st += w.t[e];
      sg += w.gx[e];
      sh += w.da[e] * w.hm[v.edge_exp[e]];
    }
    const double rp = (w.f[r] - T) + (sy + w.s[r]);
    const double dg = w.ds[r] + st;
    w.rp_r[r] = rp;
    w.diag[r] = dg;
    w.u1[r] = (rp + (sg + w.gxs[r])) + sh;
    w.u2[r] = 1.0;
    acc[0] += dg;
    acc[1] = blk::nanmax(acc[1], fabs(rp));
  }, out);
}

// S~ = diag(diag) - offdiag(K^T diag(1/a) K) + nu 1 1^T (lower triangle) into
// w.schur, with the regularisation of `n_reg` failed attempts on the diagonal
// (cumulative, as the reference's _regularise); copies y into best when `copy_best`.
// One index per entry: (a, b) sums d_ma d_mb / a_m over the experts m of both ranks,
// in expert order (a merge of the two ranks' edge lists, both sorted by expert).
LPLB_HD void assemble(const blk::Team& t, const View& v, const Work& w, double nu, int n_reg, double reg_scale,
                      bool copy_best) {
  const int R = v.R, n_tri = R * (R + 1) / 2, T0 = warp_round(n_tri);
  blk::pfor(t, T0 + (copy_best ? v.E : 0), [&](int i) {
    if (i >= T0) {
      w.best[i - T0] = w.y[i - T0];
      return;
    }
    if (i >= n_tri) return;
    int ra, rb;
    blk::tri_entry(w.tri, i, ra, rb);
    double* entry = w.schur + static_cast<size_t>(ra) * R + rb;
    if (ra == rb) {
      double dg = w.diag[ra] + nu, reg = 1e-12;
      for (int k = 0; k < n_reg; ++k) {
        dg = dg + reg_scale * reg;
        reg *= 100.0;
      }
      *entry = dg;
      return;
    }
    double s = 0.0;
    int qa = v.rank_ptr[ra], qb = v.rank_ptr[rb];
    const int qa_end = v.rank_ptr[ra + 1], qb_end = v.rank_ptr[rb + 1];
    while (qa < qa_end && qb < qb_end) {
      const int ea = v.rank_edges[qa], eb = v.rank_edges[qb];
      const int ma = v.edge_exp[ea], mb = v.edge_exp[eb];
      if (ma == mb) s += w.d[ea] * w.da[eb];
      qa += ma <= mb ? 1 : 0;
      qb += mb <= ma ? 1 : 0;
    }
    *entry = -s + nu;
  });
}

// Factor S~ (assembled) with the reference's regularisation: on failure add
// 1e-12 * max diag (then x100, at most 4 times).  Returns whether a factor exists.
LPLB_HD bool factor(const blk::Team& t, const View& v, const Work& w, double nu) {
  int bad = blk::ldlt_factor(t, w.schur, v.R, v.R, w.tri);
  if (bad == 0) return true;
  const double scale = blk::reduce(t, v.R, blk::NanMax{}, [&](int r) { return w.diag[r] + nu; });
  for (int k = 1; k <= 4 && bad > 0; ++k) {
    assemble(t, v, w, nu, k, scale, false);
    bad = blk::ldlt_factor(t, w.schur, v.R, v.R, w.tri);
  }
  return bad == 0;
}

// The corrector's right-hand side, rc = sigma mu - x z - dx_aff dz_aff: h (experts,
// pass 1), then g into u1 (ranks, pass 2).
LPLB_HD void corrector_rhs(const blk::Team& t, const View& v, const Work& w, double smu) {
  auto gx = [&](int e) { return (((smu - w.y[e] * w.z[e]) - w.aff[e]) - w.y[e] * w.rd[e]) * w.iz[e]; };
  blk::pfor(t, v.M, [&](int m) {
    double sg = 0.0;
    for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e) sg += gx(e);
    w.hm[m] = w.rp_m[m] - sg;
  });
  blk::pfor(t, v.R, [&](int r) {
    double sg = 0.0, sh = 0.0;
    for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) {
      const int e = v.rank_edges[q];
      sg += gx(e);
      sh += w.da[e] * w.hm[v.edge_exp[e]];
    }
    const double gxs = (((smu - w.s[r] * w.zs[r]) - w.affs[r]) - w.s[r] * w.rds[r]) * w.izs[r];
    w.u1[r] = (w.rp_r[r] + (sg + gxs)) + sh;
  });
}

// The direction from the solved system (dw = u1 - dT' u2, dlambda, dx, dz; the
// predictor also keeps dx dz), stored.  Returns the largest relative decreases
// max(-dx / x), max(-dz / z) over all variables and sum dx z, sum x dz, sum dx dz.
LPLB_HD void direction(const blk::Team& t, const View& v, const Work& w, bool corr, double smu, double dTp,
                       double (&out)[5]) {
  const int R = v.R, M = v.M;
  auto dw_of = [&](int r) { return w.u1[r] - dTp * w.u2[r]; };
  auto dlam_of = [&](int m) {
    double s = 0.0;
    for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e) s += w.d[e] * dw_of(v.edge_rank[e]);
    return (w.hm[m] + s) * w.ia[m];
  };
  const int M0 = warp_round(M), R0 = M0 + warp_round(R);
  blk::reduce_n<5, 0x3u>(t, R0 + v.E, [&](int i, double* acc) {
    if (i < M0) {
      if (i < M) w.dlam[i] = dlam_of(i);
      return;
    }
    double x, z, ix, iz, dx, dz;
    if (i < R0) {
      const int r = i - M0;
      if (r >= R) return;
      const double dw = dw_of(r);
      w.dw[r] = dw;
      x = w.s[r];
      z = w.zs[r];
      ix = w.is[r];
      iz = w.izs[r];
      const double xz = x * z;
      const double rc = corr ? (smu - xz) - w.affs[r] : -xz;
      dx = w.ds[r] * (0.0 - dw) + (rc - x * w.rds[r]) * iz;
      dz = (rc - z * dx) * ix;
      w.dxs[r] = dx;
      w.dzs[r] = dz;
      if (!corr) w.affs[r] = dx * dz;
    } else {
      const int e = i - R0;
      x = w.y[e];
      z = w.z[e];
      ix = w.iy[e];
      iz = w.iz[e];
      const double xz = x * z;
      const double rc = corr ? (smu - xz) - w.aff[e] : -xz;
      dx = w.d[e] * (dlam_of(v.edge_exp[e]) - dw_of(v.edge_rank[e])) + (rc - x * w.rd[e]) * iz;
      dz = (rc - z * dx) * ix;
      w.dx[e] = dx;
      w.dz[e] = dz;
      if (!corr) w.aff[e] = dx * dz;
    }
    acc[0] = blk::nanmax(acc[0], -(dx * ix));
    acc[1] = blk::nanmax(acc[1], -(dz * iz));
    acc[2] += dx * z;
    acc[3] += x * dz;
    acc[4] += dx * dz;
  }, out);
}

// The stop test's bound for this block: the split of the current y (scaled units)
// into w.flow (scratch until the finalisation), then bound_verdict's sums.
LPLB_HD bool bound_met(const blk::Team& t, const View& v, const Work& w, double tol) {
  blk::pfor(t, v.M, [&](int m) {
    const int lo = v.exp_ptr[m];
    split_expert(
        v.exp_ptr[m + 1] - lo, 1.0, w.c[m], [&](int k) { return w.y[lo + k]; },
        [&](int k) { return static_cast<double>(v.edge_mult[lo + k]); }, [&](int k, double x) { w.flow[lo + k] = x; });
  });
  const int M = v.M, M0 = warp_round(M);
  double acc[4];
  blk::reduce_n<4, 0x1u>(t, M0 + v.R, [&](int i, double* a) {
    if (i < M0) {
      if (i >= M) return;
      double mn = HUGE_VAL;
      for (int e = v.exp_ptr[i]; e < v.exp_ptr[i + 1]; ++e) {
        const double wp = blk::nanmax(w.w[v.edge_rank[e]], 0.0);
        mn = wp < mn ? wp : mn;
      }
      a[3] += w.c[i] * mn;
      return;
    }
    const int r = i - M0;
    const double wp = blk::nanmax(w.w[r], 0.0);
    a[0] = blk::nanmax(a[0], w.f[r] + rank_sum(v, w.flow, r));
    a[1] += w.f[r] * wp;
    a[2] += wp;
  }, acc);
  return bound_verdict(acc, tol);
}

// ---------------------------------------------------------------- driver
using Prof = blk::Prof<false>;  // phase timers of -DLPLB_PROF builds

// Solves the component; the split ends in w.flow, its loads in w.load.
template <typename T>
LPLB_HD Result solve(const blk::Team& t, const View& v, const T* loads, const Work& w, int max_iters, double tol) {
  const int R = v.R, M = v.M, E = v.E;
  Result res{1, 0, 0.0};
  [[maybe_unused]] Prof P;
  LPLB_TICK(P, 0);
  // original fixed loads and demands; the scale is the mean rank load
  double sum_f, sum_c;
  blk::reduce2(t, R + M, [&](int i, double& a, double& b) {
    if (i < R) {
      const double s = fixed_load(v, loads, i);
      w.fixed[i] = s;
      a += s;
    } else {
      const double d = static_cast<double>(loads[v.exp_log[i - R]]);
      w.demand[i - R] = d;
      b += d;
    }
  }, sum_f, sum_c);
  const double scale = (sum_f + sum_c) / R;
  const bool trivial = scale <= 0.0;

  if (E > 0 && !trivial) {
    // ---- starting point: even split, T = its max load, uniform duals, Mehrotra shift
    double mx[2];
    const int M0 = warp_round(M), E0 = warp_round(E), ER0 = E0 + warp_round(R);
    blk::reduce_n<2, 0x3u>(t, M0 + R, [&](int i, double* acc) {
      if (i < M0) {
        if (i >= M) return;
        const int lo = v.exp_ptr[i], hi = v.exp_ptr[i + 1];
        const double c = w.demand[i] / scale;
        w.c[i] = c;
        const double y0 = c / (hi - lo > 1 ? static_cast<double>(hi - lo) : 1.0);
        for (int e = lo; e < hi; ++e) w.y[e] = y0;
        acc[0] = blk::nanmax(acc[0], c);
      } else {
        const double f = w.fixed[i - M0] / scale;
        w.f[i - M0] = f;
        acc[1] = blk::nanmax(acc[1], f);
      }
    }, mx);
    const double cnorm = 1.0 + blk::nanmax(blk::nanmax(mx[0], 0.0), mx[1]);
    double Tv = blk::reduce(t, R, blk::NanMax{}, [&](int r) {
      double s = 0.0;
      for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) s += w.y[v.rank_edges[q]];
      const double load = w.f[r] + s;
      w.s[r] = load;
      return load;
    });
    const double wi = 1.0 / R;
    double sums[3];  // x.z, sum x, sum z
    blk::reduce_n<3, 0u>(t, E0 + R, [&](int i, double* acc) {
      double x;
      if (i < E0) {
        if (i >= E) return;
        x = w.y[i];
      } else {
        x = Tv - w.s[i - E0];
        w.s[i - E0] = x;
      }
      acc[0] += x * wi;
      acc[1] += x;
      acc[2] += wi;
    }, sums);
    const double dx0 = blk::nanmax(0.5 * sums[0] / sums[2], 0.1);
    const double dz0 = blk::nanmax(0.5 * sums[0] / (sums[1] > 1e-300 ? sums[1] : 1e-300), 0.1 / R);
    blk::pfor(t, ER0 + M, [&](int i) {
      if (i < E0) {
        if (i >= E) return;
        w.y[i] = w.y[i] + dx0;
        w.z[i] = wi + dz0;
      } else if (i < ER0) {
        const int r = i - E0;
        if (r >= R) return;
        w.s[r] = w.s[r] + dx0;
        w.zs[r] = wi + dz0;
        w.w[r] = wi;
      } else {
        w.lam[i - ER0] = 0.0;
      }
    });

    if (w.tri) {
      blk::pfor(t, R * (R + 1) / 2, [&](int q) {
        int i, j;
        blk::tri_index(q, i, j);
        w.tri[q] = (i << 16) | j;
      });
    }

    // Each pass appears once in the loop below (the first round measures the starting
    // point, the predictor and the corrector share one phase loop), so the device
    // fetches each pass's code once per iteration.
    const double n_var = static_cast<double>(E + R);
    double mu5[5], mr[2], ap = 0.0, ad = 0.0;
    Progress pg;
    bool move = false;
    for (;;) {
      // ---- apply the step (none in the first round), residuals and the Newton data
      LPLB_TICK(P, 0);
      update(t, v, w, move, ap, ad, mu5);
      LPLB_TICK(P, 1);
      experts(t, v, w, move, ad);
      LPLB_TICK(P, 2);
      ranks(t, v, w, move, ad, Tv, mr);
      LPLB_TICK(P, 3);
      const double rT = 1.0 - mu5[2];
      const double nu = mr[0] / (static_cast<double>(R) * R);
      // ---- stop test; keep the best iterate
      bool better;
      const bool stop = stop_test(pg, move, Tv, mu5, mr, rT, cnorm, tol, res.iterations, max_iters, better,
                                  [&] { return bound_met(t, v, w, tol); });
      if (stop) {
        if (better) blk::pfor(t, E, [&](int e) { w.best[e] = w.y[e]; });
        break;
      }
      LPLB_TICK(P, 10);
      assemble(t, v, w, nu, 0, 0.0, better);
      LPLB_TICK(P, 4);
      const bool factored = factor(t, v, w, nu);
      LPLB_TICK(P, 5);
      ++res.iterations;
      if (!factored) break;  // no usable factor: the reference's step is not finite
      const double mu = mu5[3] / n_var;
      // ---- predictor (affine scaling direction, and S~^-1 1 for the T border), then
      // the corrector (centring + second-order term) with the same factorisation
      double us[2], dir[5], u2sum = 1.0, dTp = 0.0, smu = 0.0;
      LPLB_PRAGMA(unroll 1)  // one copy of the code for both phases
      for (int phase = 0; phase < 2; ++phase) {
        const bool corr = phase == 1;
        LPLB_TICK(P, 10);
        if (corr) corrector_rhs(t, v, w, smu);
        LPLB_TICK(P, 6);
        blk::ldlt_subst(t, w.schur, R, R, w.u1, corr ? nullptr : w.u2, us);
        LPLB_TICK(P, 7);
        if (!corr) u2sum = us[1];
        dTp = (us[0] - rT) / u2sum;
        direction(t, v, w, corr, smu, dTp, dir);
        LPLB_TICK(P, 8);
        if (!corr) smu = centring(dir, mu5[3], mu, n_var);
      }
      const double dT = dTp + nu * rT;
      if (!step_lengths(dir, mu, ap, ad)) break;  // a NaN anywhere reaches dx or dz: frozen
      Tv = Tv + ap * dT;
      move = true;
    }
    res.converged = pg.converged ? 1 : 0;
  } else {
    blk::pfor(t, E, [&](int e) { w.best[e] = 0.0; });
  }

  // ---- finalisation: original units, non-negative, each expert's edges sum to its
  // demand (zero demand: 0; vanished flow: the even split over its slots)
  blk::pfor(t, M, [&](int m) {
    const int lo = v.exp_ptr[m];
    split_expert(
        v.exp_ptr[m + 1] - lo, scale, w.demand[m], [&](int k) { return w.best[lo + k]; },
        [&](int k) { return static_cast<double>(v.edge_mult[lo + k]); }, [&](int k, double x) { w.flow[lo + k] = x; });
  });
  res.objective = blk::reduce(t, R, blk::NanMax{}, [&](int r) {
    const double load = w.fixed[r] + rank_sum(v, w.flow, r);
    w.load[r] = load;
    return load;
  });
  LPLB_TICK(P, 9);
#if defined(LPLB_PROF) && defined(__CUDA_ARCH__)
  if (threadIdx.x == 0)
    printf("iprof blk %d R %d M %d E %d its %d: start %lld update %lld experts %lld ranks %lld assemble %lld "
           "factor %lld crhs %lld subst %lld dir %lld final %lld other %lld\n",
           blockIdx.x, R, M, E, res.iterations, P.acc[0], P.acc[1], P.acc[2], P.acc[3], P.acc[4], P.acc[5],
           P.acc[6], P.acc[7], P.acc[8], P.acc[9], P.acc[10]);
#endif
  return res;
}

}  // namespace ipm
}  // namespace lplb
