// Exact split of one connected component in one thread block (float64), the kernel
// form of lplb_plugin/solvers/exact.py (that module's docstring and docs/solvers.md
// have the argument).  Same steps, same answer: FISTA sweeps order the ranks, the
// best prefix of that order gives the exact lower bound T, and a semismooth-Newton
// projection of the even split onto {valid split, load <= T} certifies it and breaks
// ties the one unique way.  Written with block_ops.cuh only, so it also builds as CPU
// code for the tests.
#pragma once

#include "block_ops.cuh"
#include "solve_view.cuh"

namespace lplb {
namespace exact {

// cumulative FISTA sweeps before certification attempt r: 4, 16, 64, 256, 1024
LPLB_HD int rounds_done(int r) { return 4 << (2 * r); }
constexpr int kNewtonIters = 30;
constexpr int kOuterIters = 8;
constexpr double kCertRtol = 1e-10;

// The next trial step of the projection's line search after Armijo failed at `step`
// (dual value val there; base and slope at step 0; big: the direction's largest
// entry; R ranks; scale: the largest load).  Both exact kernels; the host reference
// halves instead (the answer is the same unique point, only the path differs).
//
// The maximiser of the quadratic through those three facts, kept within [lo, 0.5 step]
// (safeguarded interpolation; NaN or -inf: lo).  lo = 0.1 step, unless a tenth of the
// step is still longer than L = R * scale: then lo is 1e-3 of length L.  At the
// answer, dual values across R ranks differ by at most about R times the largest load,
// so such a step comes from a near-singular system (an active rank whose carrying edges
// all belong to experts that carry nothing elsewhere makes a null direction, which the
// 1e-12 regularisation turns into a step ~1e12 times the gradient): there the quadratic
// is trusted far below the usual tenth (halving such a step back took ~40 dual
// evaluations).  The full step is still tried first: when the bound is too low, it is
// what proves it (the dual cap in project).
LPLB_HD double backtrack(double step, double slope, double base, double val, double big, int R, double scale) {
  double lo = 0.1 * step;
  const double lim = static_cast<double>(R) * scale;
  if (big > 0.0 && lim / big < lo) lo = 1e-3 * lim / big;
  const double q = slope * step * step / (2.0 * ((base + slope * step) - val));
  return q > 0.5 * step ? 0.5 * step : (q > lo ? q : lo);
}

// float64 scratch of one block.  Sizes: R ranks, M experts, E edges of the component.
struct Work {
  // [R]
  double *fixed, *load, *cap, *beta, *g_b, *d_b, *d_beta, *gain;
  int *pos, *active, *sticky, *was_released;
  // the Newton system's unknowns, the active ranks in rank order: cpos[r] is rank r's
  // row (-1 when inactive), cown[k] the rank of row k, cb[k] its right-hand side
  double* cb;
  int *cpos, *cown;
  // ranks of the best prefix behind the bound (see prefix_bound)
  int* pinned;
  // [M]
  double *demand, *alpha, *g_a, *d_a, *d_alpha;
  int* inside_at;
  // [E]; wt: slot weight of the edges carrying flow at the current Newton point; pm:
  // an edge's slots in the projection (0 on an edge cut by project)
  double *x0, *y, *z, *best, *flow, *wt, *pm;
  // [R * (R + 1)] (this kernel uses leading dimension R; solve_pair.cuh pads its rows
  // to R + 1), and the (i, j) table of its lower triangle (R(R+1)/2)
  double* schur;
  int* tri;

  // Carve the arrays out of one buffer (doubles first, then ints); returns bytes used.
  // Call with w == nullptr (and base == nullptr) to size it.
  LPLB_HD static size_t layout(Work* w, char* base, int R, int M, int E, bool schur_inside) {
    Work sizing;
    Work& o = w ? *w : sizing;
    blk::Carve buf{base};
    for (double** p : {&o.fixed, &o.load, &o.cap, &o.beta, &o.g_b, &o.d_b, &o.d_beta, &o.gain, &o.cb}) buf.dbl(*p, R);
    for (double** p : {&o.demand, &o.alpha, &o.g_a, &o.d_a, &o.d_alpha}) buf.dbl(*p, M);
    for (double** p : {&o.x0, &o.y, &o.z, &o.best, &o.flow, &o.wt, &o.pm}) buf.dbl(*p, E);
    o.schur = nullptr;
    o.tri = nullptr;
    if (schur_inside) {
      buf.dbl(o.schur, static_cast<size_t>(R) * (R + 1));
      buf.itg(o.tri, static_cast<size_t>(R) * (R + 1) / 2);
    }
    for (int** p : {&o.pos, &o.active, &o.sticky, &o.was_released, &o.cpos, &o.cown, &o.pinned}) buf.itg(*p, R);
    buf.itg(o.inside_at, M);
    return buf.off;
  }
};

struct Result {
  int certified;
  int rounds;
  int newton_iters;
  double bound;
};

// ---------------------------------------------------------------- helpers
// Per-rank load of an edge flow: fixed + sum of the rank's edges (expert order).
LPLB_HD void rank_loads(const blk::Team& t, const View& v, const Work& w, const double* flow, double* out) {
  blk::pfor(t, v.R, [&](int r) {
    double s = 0.0;
    for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) s += flow[v.rank_edges[q]];
    out[r] = w.fixed[r] + s;
  });
}

// `iters` accelerated projected-gradient sweeps on 1/2 sum_r load_r^2 (y, z, t_k).
//
// An expert with more than two copies takes the Euclidean projection onto its simplex
// {y >= 0, sum y = d}: y = max(v - th, 0) for the gradient-step values v of its
// edges.  The threshold, without sorting: for each edge i, its rank k in the
// descending order of v (ties by position) and the sum css of the k largest values
// give th_i = (css - d) / k; th is th_i of the largest k with v_i - th_i > 0.  A
// thread per edge computes its own k, css and th_i (w.wt; NaN when v_i - th_i <= 0)
// from the values formed once per edge (w.flow), and the expert's thread takes the
// valid edge of largest k, i.e. of smallest value, ties to the later edge.  Same
// threshold, same bits (the CPU build: identical results on 300 test instances) as
// one thread per expert doing all K^2 steps, which on H200 made EPLB EP32's 4 sweeps
// cost 22k cycles on its slowest component (15.8k now; the kernel 35.9 -> 32.7 us).
LPLB_HD void fista(const blk::Team& t, const View& v, const Work& w, double step, int iters, double& t_k) {
  const bool simplex = v.E != 2 * v.M;  // (every movable expert has at least two edges)
  for (int it = 0; it < iters; ++it) {
    rank_loads(t, v, w, w.z, w.load);
    const double t_new = 0.5 * (1.0 + sqrt(1.0 + 4.0 * t_k * t_k));
    const double mom = (t_k - 1.0) / t_new;
    if (simplex) {
      blk::pfor(t, v.E, [&](int e) { w.flow[e] = w.z[e] - step * w.load[v.edge_rank[e]]; });
      blk::pfor(t, v.E, [&](int e) {
        const int m = v.edge_exp[e], lo = v.exp_ptr[m], hi = v.exp_ptr[m + 1];
        if (hi - lo == 2) return;
        const double vi = w.flow[e];
        int k = 1;
        double css = vi;
        for (int j = lo; j < hi; ++j) {
          if (j == e) continue;
          const double vj = w.flow[j];
          if (vj > vi || (vj == vi && j < e)) {
            ++k;
            css += vj;
          }
        }
        const double th = (css - w.demand[m]) / k;
        w.wt[e] = vi - th > 0.0 ? th : NAN;
      });
    }
    blk::pfor(t, v.M, [&](int m) {
      const int lo = v.exp_ptr[m], hi = v.exp_ptr[m + 1];
      auto val = [&](int e) { return simplex ? w.flow[e] : w.z[e] - step * w.load[v.edge_rank[e]]; };
      if (hi - lo == 2) {  // closed form, as the reference's two-copy path
        const double d = w.demand[m];
        double first = 0.5 * (val(lo) - val(lo + 1) + d);
        first = first < 0.0 ? 0.0 : (first > d ? d : first);
        const double ynew0 = first, ynew1 = d - first;
        w.z[lo] = ynew0 + mom * (ynew0 - w.y[lo]);
        w.z[lo + 1] = ynew1 + mom * (ynew1 - w.y[lo + 1]);
        w.y[lo] = ynew0;
        w.y[lo + 1] = ynew1;
        return;
      }
      // (here simplex holds: w.flow has every edge's value, w.wt its threshold)
      int best = -1;
      for (int e = lo; e < hi; ++e) {
        const double te = w.wt[e];
        if (te == te && (best < 0 || w.flow[e] < w.flow[best] || (w.flow[e] == w.flow[best] && e > best))) best = e;
      }
      double th;
      if (best >= 0) {
        th = w.wt[best];
      } else {  // only when all values are -inf-like: the largest one keeps d
        double mx = w.flow[lo];
        for (int e = lo + 1; e < hi; ++e) mx = w.flow[e] > mx ? w.flow[e] : mx;
        th = mx - w.demand[m];
      }
      for (int e = lo; e < hi; ++e) {
        const double u = w.flow[e] - th;
        const double ynew = u > 0.0 ? u : 0.0;
        w.z[e] = ynew + mom * (ynew - w.y[e]);
        w.y[e] = ynew;
      }
    });
    t_k = t_new;
  }
}

// Best prefix bound max_k g(S_k)/k over the ranks ordered by load (desc, ties by rank),
// g(S) = fixed(S) + demand of experts with every copy in S.  Exact on integer loads.
// kstar: the position (0-based) that ends the shortest best prefix S.  The load g(S)
// cannot leave S, so a split whose max load is the bound loads every rank of S to
// exactly the bound: project() starts with their bounds active and never releases
// them, which leaves its unique answer unchanged and saves Newton iterations
// (cube EP64 on the bench's batches: 8 -> 5.5 on the slowest component).
LPLB_HD double prefix_bound(const blk::Team& t, const View& v, const Work& w, int& kstar) {
  const double* approx = w.load;
  blk::pfor(t, v.R, [&](int r) {
    int p = 0;
    for (int q = 0; q < v.R; ++q) p += (approx[q] > approx[r] || (approx[q] == approx[r] && q < r)) ? 1 : 0;
    w.pos[r] = p;
  });
  blk::pfor(t, v.M, [&](int m) {
    int last = 0;
    for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e) last = w.pos[v.edge_rank[e]] > last ? w.pos[v.edge_rank[e]] : last;
    w.inside_at[m] = last;
  });
  blk::pfor(t, v.R, [&](int r) {
    double s = 0.0;
    for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) {
      const int m = v.edge_exp[v.rank_edges[q]];
      if (w.inside_at[m] == w.pos[r]) s += w.demand[m];
    }
    w.gain[w.pos[r]] = w.fixed[r] + s;
  });
  // prefix sums of gain: the reference adds left to right; one lane does the same, so
  // non-integer loads give the same bits too (R is small next to everything else)
  blk::wfor(t, 1, [&](int) {
    double c = 0.0;
    for (int p = 0; p < v.R; ++p) {
      c += w.gain[p];
      w.gain[p] = c;
    }
  });
  blk::team_sync(t);
  const double best = blk::reduce(t, v.R, blk::Max{}, [&](int p) { return w.gain[p] / (p + 1); });
  // the shortest best prefix: -(its length) as a max
  kstar = -static_cast<int>(blk::reduce(t, v.R, blk::Max{}, [&](int p) {
    return w.gain[p] / (p + 1) == best ? -static_cast<double>(p) : -HUGE_VAL;
  }));
  return best;
}

// Project the even split onto {valid split, load <= bound}; flow in w.flow.  Returns
// whether it exists and meets the certificate tolerance.
//
// The reference's steps, with its loops fused so that a Newton iteration costs few
// barriers: one reduction gives the gradients, the Hessian diagonals and the dual at
// the current point (flows are recomputed from alpha and beta, never stored); one
// pass builds the R x R Schur complement; an LDL^T factorisation solves it; one
// reduction gives the expert direction and the slope; each line-search trial is one
// reduction of the dual along the direction.
LPLB_HD bool project(const blk::Team& t, const View& v, const Work& w, double bound, double scale, int& its,
                     blk::Prof<false>& P) {
  const double tol = kCertRtol * scale;
  const int R = v.R, M = v.M, E = v.E;
  auto s_of = [&](int e, double a, double b) { return w.x0[e] + a + b; };
  blk::pfor(t, R + M, [&](int i) {
    if (i < R) {
      w.cap[i] = bound - w.fixed[i];
      w.beta[i] = 0.0;
      w.sticky[i] = w.pinned[i];
      w.was_released[i] = 0;
    } else {
      // An expert with copies both in the pinned prefix and outside it sends nothing
      // into the prefix: the prefix's own load fills it exactly to the bound, so in any
      // split under the bound those edges carry 0.  The projection is the same with
      // them cut (the same unique point), and Newton need not find that out.
      const int m = i - R;
      w.alpha[m] = 0.0;
      bool in = false, out = false;
      for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e) {
        const bool p = w.pinned[v.edge_rank[e]] != 0;
        in = in || p;
        out = out || !p;
      }
      for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e)
        w.pm[e] = in && out && w.pinned[v.edge_rank[e]] ? 0.0 : static_cast<double>(v.edge_mult[e]);
    }
  });
  // smallest room, the dual's constant, the ranks the even split overloads, and the
  // cap on the dual: any valid split y has 1/2 sum (y - x0)^2 <= 1/2 sum_e mult c^2
  // (per slot, y and x0 both lie in [0, c]), so by weak duality a dual value above
  // twice that (rounding margin) proves that no split meets the bound.  Such an
  // attempt stops there instead of running Newton to its iteration cap.
  double setup[3];
  blk::reduce_n<3, 0x0u>(t, R + E, [&](int i, double* acc) {
    if (i < R) {
      double s = 0.0;
      for (int q = v.rank_ptr[i]; q < v.rank_ptr[i + 1]; ++q) s += v.edge_mult[v.rank_edges[q]] * w.x0[v.rank_edges[q]];
      w.active[i] = w.fixed[i] + s > bound || w.pinned[i];
      acc[0] += w.cap[i] < -tol ? 1.0 : 0.0;
    } else {
      const int e = i - R;
      const double c = w.demand[v.edge_exp[e]];
      acc[1] += v.edge_mult[e] * w.x0[e] * w.x0[e];
      acc[2] += v.edge_mult[e] * c * c;
    }
  }, setup);
  const double dual_cap = setup[2];
  LPLB_TICK(P, 3);
  if (setup[0] > 0.0) return false;
  const double const_term = 0.5 * setup[1];
  const double delta = 1e-12;
  bool settled = false;
  for (int outer = 0; outer < kOuterIters && !settled; ++outer) {
    blk::pfor(t, R, [&](int r) { if (!w.active[r]) w.beta[r] = 0.0; });
    // The Newton system's unknowns are the active ranks: an inactive rank's row is the
    // identity, and eliminating it changes nothing (bit for bit), so the system is
    // built and factorised over the active ranks alone, in rank order.
    const int n_act = blk::compact(t, w.active, R, w.cpos, w.cown);
    bool converged = false;
    // The step is taken optimistically (full), and the next gradient pass, which
    // evaluates the dual anyway, checks Armijo's condition: the same iterates as
    // a line search that tries the full step first, one pass fewer per iteration.
    bool pending = false;
    double base = 0.0, slope = 0.0, step = 1.0;
    int newton = 0, halvings = 0;
    for (;;) {
      // gradients, Hessian diagonals, dual value; acc = (max |g|, dual); the weights
      // of the edges carrying flow are kept for the Newton system
      double ga[2];
      blk::reduce_n<2, 0x1u>(t, M + R, [&](int i, double* acc) {
        if (i < M) {
          const double al = w.alpha[i];
          double f = 0.0, wsum = 0.0, sq = 0.0;
          for (int e = v.exp_ptr[i]; e < v.exp_ptr[i + 1]; ++e) {
            const double s = s_of(e, al, w.beta[v.edge_rank[e]]);
            const double m = s > 0.0 ? w.pm[e] : 0.0;
            w.wt[e] = m;
            f += m * s;
            wsum += m;
            sq += m * s * s;
          }
          const double g = w.demand[i] - f;
          w.g_a[i] = g;
          w.d_alpha[i] = wsum + delta;
          acc[0] = blk::nanmax(acc[0], g < 0.0 ? -g : g);
          acc[1] += w.demand[i] * al - 0.5 * sq;
        } else {
          const int r = i - M;
          double f = 0.0, wsum = 0.0;
          if (w.active[r]) {
            const double be = w.beta[r];
            for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) {
              const int e = v.rank_edges[q];
              const double s = s_of(e, w.alpha[v.edge_exp[e]], be);
              if (s > 0.0) {
                f += w.pm[e] * s;
                wsum += w.pm[e];
              }
            }
          }
          const double g = w.active[r] ? w.cap[r] - f : 0.0;
          w.g_b[r] = g;
          w.d_beta[r] = wsum + delta;
          acc[0] = blk::nanmax(acc[0], g < 0.0 ? -g : g);
          acc[1] += w.active[r] ? w.cap[r] * w.beta[r] : 0.0;
        }
      }, ga);
      LPLB_TICK(P, 4);
      if (ga[0] <= 1e-11 * scale) {
        converged = true;
        break;
      }
      if (ga[1] + const_term > dual_cap) return false;  // infeasible: the bound is too low
      if (pending && halvings < 40 && !(ga[1] + const_term >= base + 1e-4 * step * slope)) {
        // Armijo failed: from base + step d back to base + next d (backtrack, which
        // wants the direction's largest entry)
        double big[1];
        blk::reduce_n<1, 0x1u>(t, M + R, [&](int i, double* acc) {
          const double d = i < M ? w.d_a[i] : (w.active[i - M] ? w.d_b[i - M] : 0.0);
          acc[0] = blk::nanmax(acc[0], fabs(d));
        }, big);
        const double next = backtrack(step, slope, base, ga[1] + const_term, big[0], R, scale);
        const double back = step - next;
        step = next;
        ++halvings;
        blk::pfor(t, M + R, [&](int i) {
          if (i < M) w.alpha[i] -= back * w.d_a[i];
          else if (w.active[i - M]) w.beta[i - M] -= back * w.d_b[i - M];
        });
        continue;
      }
      pending = false;
      if (newton == kNewtonIters) break;
      ++newton;
      ++its;
      base = ga[1] + const_term;
      // Schur complement over the active ranks, one row per index (contributions in
      // expert order, as the reference's add.at), and its right-hand side in cb
      blk::pfor(t, n_act, [&](int k) {
        const int a = w.cown[k];
        double* row = w.schur + static_cast<size_t>(k) * R;
        for (int b = 0; b < n_act; ++b) row[b] = 0.0;
        row[k] = w.d_beta[a];
        double s = 0.0;
        for (int q = v.rank_ptr[a]; q < v.rank_ptr[a + 1]; ++q) {
          const int e = v.rank_edges[q];
          const double ce = w.wt[e];
          if (ce == 0.0) continue;
          const int m = v.edge_exp[e];
          const double da = w.d_alpha[m];
          for (int f = v.exp_ptr[m]; f < v.exp_ptr[m + 1]; ++f) {
            const int b = w.cpos[v.edge_rank[f]];
            if (b >= 0) row[b] -= (ce * w.wt[f]) / da;
          }
          s += ce * (w.g_a[m] / da);
        }
        w.cb[k] = w.g_b[a] - s;
      });
      LPLB_TICK(P, 5);
      blk::ldlt_factor(t, w.schur, n_act, R, w.tri);
      LPLB_TICK(P, 6);
      double unused[2];
      blk::ldlt_subst(t, w.schur, n_act, R, w.cb, nullptr, unused);
      LPLB_TICK(P, 7);
      // expert direction and the slope g . d, and the full step taken
      double sl[1];
      blk::reduce_n<1, 0x0u>(t, M + R, [&](int i, double* acc) {
        if (i < M) {
          double s = 0.0;
          for (int e = v.exp_ptr[i]; e < v.exp_ptr[i + 1]; ++e) {
            const int k = w.cpos[v.edge_rank[e]];
            if (k >= 0) s += w.wt[e] * w.cb[k];
          }
          const double d = (w.g_a[i] - s) / w.d_alpha[i];
          w.d_a[i] = d;
          w.alpha[i] += d;
          acc[0] += w.g_a[i] * d;
        } else {
          const int r = i - M;
          if (w.active[r]) {
            w.d_b[r] = w.cb[w.cpos[r]];
            acc[0] += w.g_b[r] * w.d_b[r];
            w.beta[r] += w.d_b[r];
          }
        }
      }, sl);
      LPLB_TICK(P, 8);
      slope = sl[0];
      step = 1.0;
      halvings = 0;
      pending = true;
    }
    if (!converged) return false;
    // flows, and loads; a bound that pulls load in is not binding, unless releasing it
    // overshot
    double cnt[2];
    blk::reduce_n<2, 0x0u>(t, R + E, [&](int i, double* acc) {
      if (i >= R) {
        const int e = i - R;
        const double s = s_of(e, w.alpha[v.edge_exp[e]], w.beta[v.edge_rank[e]]);
        w.flow[e] = w.pm[e] * (s > 0.0 ? s : 0.0);
        return;
      }
      const int r = i;
      double sum = 0.0;
      for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) {
        const int e = v.rank_edges[q];
        const double s = s_of(e, w.alpha[v.edge_exp[e]], w.beta[r]);
        sum += w.pm[e] * (s > 0.0 ? s : 0.0);
      }
      const double load = w.fixed[r] + sum;
      w.load[r] = load;
      const bool over = !w.active[r] && load > bound + tol;
      const bool released = w.active[r] && w.beta[r] > tol * 1e-3 && !w.sticky[r];
      acc[0] += over ? 1.0 : 0.0;
      acc[1] += released ? 1.0 : 0.0;
      // the next active set (rank r's own state only; unchanged when nothing moves)
      w.sticky[r] = w.sticky[r] || (over && w.was_released[r]);
      w.was_released[r] = w.was_released[r] || released;
      w.active[r] = (w.active[r] || over) && !released;
    }, cnt);
    if (cnt[0] == 0.0 && cnt[1] == 0.0) settled = true;
    LPLB_TICK(P, 9);
  }
  if (!settled) return false;
  // exact expert sums: each expert's flow rescaled onto its demand; one whose flow
  // vanished within the tolerance (its demand is below it) takes the even split, as
  // exact::project has it
  double dead[1];
  blk::reduce_n<1, 0x0u>(t, M, [&](int m, double* acc) {
    double tot = 0.0;
    for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e) tot += w.flow[e];
    const bool live = w.demand[m] > 0.0, vanished = live && !(tot > 0.0);
    if (vanished && !(w.demand[m] <= tol)) {
      acc[0] += 1.0;
      return;
    }
    const double f = live && !vanished ? w.demand[m] / tot : 0.0;
    for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e)
      w.flow[e] = !live ? 0.0 : (vanished ? v.edge_mult[e] * w.x0[e] : w.flow[e] * f);
  }, dead);
  if (dead[0] > 0.0) return false;
  double worst[1];
  blk::reduce_n<1, 0x1u>(t, R, [&](int r, double* acc) {
    double s = 0.0;
    for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) s += w.flow[v.rank_edges[q]];
    w.load[r] = w.fixed[r] + s;
    acc[0] = blk::nanmax(acc[0], w.load[r] - (bound + tol));
  }, worst);
  return worst[0] <= 0.0;
}

// ---------------------------------------------------------------- driver
// w.load = rank loads of an edge flow; returns their max (one reduction).
LPLB_HD double loads_max(const blk::Team& t, const View& v, const Work& w, const double* flow) {
  double mx[1];
  blk::reduce_n<1, 0x1u>(t, v.R, [&](int r, double* acc) {
    double s = 0.0;
    for (int q = v.rank_ptr[r]; q < v.rank_ptr[r + 1]; ++q) s += flow[v.rank_edges[q]];
    w.load[r] = w.fixed[r] + s;
    acc[0] = blk::nanmax(acc[0], w.load[r]);
  }, mx);
  return mx[0];
}

// Solves the component; the split ends in w.flow, its loads in w.load.
template <typename T>
LPLB_HD Result solve(const blk::Team& t, const View& v, const T* loads, const Work& w, double lipschitz, int max_rounds) {
  Result res{1, 0, 0, 0.0};
  blk::Prof<false> P;
  LPLB_TICK(P, 0);
  const int n_tri = w.tri != nullptr ? v.R * (v.R + 1) / 2 : 0;
  blk::pfor(t, v.R + v.M + n_tri, [&](int i) {
    if (i < v.R) {
      const double s = fixed_load(v, loads, i);
      w.fixed[i] = s;
    } else if (i < v.R + v.M) {
      const int m = i - v.R;
      const double d = static_cast<double>(loads[v.exp_log[m]]);
      double slots = 0.0;
      for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e) slots += v.edge_mult[e];
      w.demand[m] = d;
      const double x0 = d / (slots > 1.0 ? slots : 1.0);
      for (int e = v.exp_ptr[m]; e < v.exp_ptr[m + 1]; ++e) {
        w.x0[e] = x0;
        w.y[e] = v.edge_mult[e] * x0;
        w.z[e] = w.y[e];
        w.best[e] = w.y[e];
      }
    } else {
      const int q = i - v.R - v.M;
      int a, b;
      blk::tri_index(q, a, b);
      w.tri[q] = (a << 16) | b;
    }
  });
  // the even split's loads and max, and the largest demand and fixed load
  double mx[3];
  blk::reduce_n<3, 0x7u>(t, v.R + v.M, [&](int i, double* acc) {
    if (i < v.R) {
      double s = 0.0;
      for (int q = v.rank_ptr[i]; q < v.rank_ptr[i + 1]; ++q) s += w.y[v.rank_edges[q]];
      w.load[i] = w.fixed[i] + s;
      acc[0] = blk::nanmax(acc[0], w.load[i]);
      acc[2] = blk::nanmax(acc[2], w.fixed[i]);
    } else {
      acc[1] = blk::nanmax(acc[1], w.demand[i - v.R]);
    }
  }, mx);
  const double dmax = mx[1], fmax = mx[2];
  if (v.E == 0 || !(dmax > 0.0)) {
    blk::pfor(t, v.E, [&](int e) { w.flow[e] = w.y[e]; });
    res.bound = mx[0];
    return res;
  }
  LPLB_TICK(P, 0);
  const double scale = dmax > fmax ? dmax : fmax;
  double best_max = mx[0];
  double bound = -HUGE_VAL, t_k = 1.0;
  const double step = 1.0 / lipschitz;
  int done = 0;
  // 0 rounds (a test hook, like the reference's empty round list): the fallback path
  const int rounds = max_rounds < 0 ? 0 : (max_rounds > 5 ? 5 : max_rounds);
  for (int rnd = 0; rnd < rounds; ++rnd) {
    fista(t, v, w, step, rounds_done(rnd) - done, t_k);
    LPLB_TICK(P, 1);
    done = rounds_done(rnd);
    const double amax = loads_max(t, v, w, w.y);
    if (amax < best_max) {
      best_max = amax;
      blk::pfor(t, v.E, [&](int e) { w.best[e] = w.y[e]; });
    }
    int kstar = -1;
    const double pb = prefix_bound(t, v, w, kstar);
    if (pb >= bound) {
      bound = pb;
      blk::pfor(t, v.R, [&](int r) { w.pinned[r] = w.pos[r] <= kstar; });
    }
    res.rounds = rnd + 1;
    LPLB_TICK(P, 2);
    const bool ok = project(t, v, w, bound, scale, res.newton_iters, P);
    LPLB_TICK(P, 10);
#if defined(LPLB_PROF) && defined(__CUDA_ARCH__)
    if (threadIdx.x == 0)
      printf("xprof blk %d R %d M %d E %d threads %d newton %d: setup %lld fista %lld prefix %lld pre %lld "
             "grad %lld schur %lld factor %lld subst %lld dir %lld outer %lld final %lld\n",
             blockIdx.x, v.R, v.M, v.E, blockDim.x, res.newton_iters, P.acc[0], P.acc[1], P.acc[2], P.acc[3],
             P.acc[4], P.acc[5], P.acc[6], P.acc[7], P.acc[8], P.acc[9], P.acc[10]);
#endif
    if (ok) {
      res.bound = bound;
      return res;
    }
  }
  // not certified: the best valid split found
  blk::pfor(t, v.E, [&](int e) { w.flow[e] = w.best[e]; });
  loads_max(t, v, w, w.flow);
  res.certified = 0;
  res.bound = bound;
  return res;
}

}  // namespace exact
}  // namespace lplb
