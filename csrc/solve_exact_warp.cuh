// The exact split (solve_exact.cuh) of a small component of any placement in one
// warp: the same steps and the same unique answer as exact::solve, for components
// whose experts may have any number of copies (EPLB placements: a hot expert on three
// or more ranks), as long as the component has at most 32 ranks, 32 movable experts
// and 32 edges.  Two-copy components keep solve_pair.cuh.  Device code; the CPU build
// for the tests emulates the warp (warp_emulation.h).
//
// Why: exact::solve spends its time in block barriers and reductions, not arithmetic
// (clock64 profile on H200, a 7-rank 14-edge EPLB component: ~60k cycles with one
// Newton iteration, every phase a few thousand).  Here every pass is register
// arithmetic, a few shuffles and one or two __syncwarp.
//
// Layout (as solve_ipm_warp.cuh): lane l holds edge l, rank l and expert l (each where
// it exists).
//   * registers: an edge's rank, expert, its expert's edge range and demand, its slots
//     (mult, and pm in the projection), the even split x0, the FISTA iterates y, z,
//     the best split and the projection's flow; a rank's edge ids (pair::setup_rank),
//     fixed load, load, cap, beta, its Newton row and the active-set flags; an
//     expert's edge range, demand, alpha, gradient, 1 / Hessian diagonal and direction;
//   * an edge reads its rank's and its expert's values by shuffles; a rank sums its
//     edges' values (rank_edges order) and an expert its edges' values (edge order)
//     from per-edge shared arrays, the orders in which exact::solve sums them, with
//     products formed in the summing loop as exact::solve forms them (so that the
//     device contracts them alike);
//   * an expert's FISTA simplex threshold is exact::fista's sort-free one: every edge
//     computes its own candidate, then every edge of the expert picks the expert's
//     (the same loop on each, instead of a shuffle back from the expert);
//   * shared memory: three per-edge arrays, the experts' gradients and reciprocal
//     Hessian diagonals (the Newton rows read them), prefix_bound's gains, the R x R
//     system (padded rows), the edges' Newton rows and the rows' ranks, and the answer.
//
// Differences from exact::solve, rounding only: the fixed loads are summed by several
// lanes per rank (pair::setup_rank); reductions are warp butterflies (the dual value
// and the projection's constants summed in another order); 1 / d_alpha is formed once
// per Newton iteration and multiplied where exact::solve divides; the Newton system is
// solved by Gauss-Jordan (pair::solve_gj8, up to 8 active ranks) or Gaussian
// elimination (pair::solve_spd) instead of LDL^T.  Tests compare the two builds on every instance that fits.
#pragma once

#include "block_ops.cuh"
#include "solve_exact.cuh"
#include "solve_pair.cuh"
#include "solve_view.cuh"

namespace lplb {
namespace exact_warp {

constexpr int kMaxRanks = 32;
constexpr int kMaxExperts = 32;
constexpr int kMaxEdges = 32;

// Shared arrays of one block.  Sizes: R ranks, M experts, E edges.
struct Smem {
  double *e0, *e1, *e2;   // [E] per-edge values a rank or an expert sums (written by the edges)
  double *g_a, *inv_dal;  // [M] the experts' gradients and 1 / Hessian diagonals
  double* gain;           // [R] prefix_bound's g(S_k), by position
  double* schur;          // [R x (R + 1)], padded rows
  double *flow, *load;    // [E], [R]: the answer
  int* ecpos;             // [E] the Newton row of the edge's rank (-1: inactive)
  int* owner;             // [R] the rank of each Newton row

  // Carve the arrays out of base (doubles first, then ints); returns bytes used
  // (s == nullptr and base == nullptr: size only).
  LPLB_HD static size_t layout(Smem* s, char* base, int R, int M, int E) {
    Smem sizing;
    Smem& o = s ? *s : sizing;
    blk::Carve buf{base};
    for (double** p : {&o.e0, &o.e1, &o.e2, &o.flow}) buf.dbl(*p, E);
    for (double** p : {&o.g_a, &o.inv_dal}) buf.dbl(*p, M);
    for (double** p : {&o.gain, &o.load}) buf.dbl(*p, R);
    buf.dbl(o.schur, static_cast<size_t>(R) * (R + 1));
    buf.itg(o.ecpos, E);
    buf.itg(o.owner, R);
    return buf.off;
  }
};

#if defined(__CUDA_ARCH__) || defined(LPLB_WARP_EMULATION)

using pair::kFull;
using pair::kMaxDegree;
using pair::Prof;
using pair::wmax;

constexpr double kDelta = 1e-12;  // exact::project's regularisation of the Hessian

// Registers of lane l: rank l, expert l, edge l.
struct Lane {
  // rank (the first fields are pair::setup_rank's)
  bool has_rank;
  int deg;
  int edges[kMaxDegree];
  int more_lo, more_hi;
  double fixed, load, cap, beta, d_b, g_b, d_beta;
  bool active, sticky, was_released;
  bool pinned;  // in the best prefix behind the bound (exact::prefix_bound's kstar)
  int cpos;     // its row of the Newton system (-1: inactive)
  // expert
  bool has_exp;
  int lo, hi;  // its edges
  double demand, alpha, d_a, g_a, inv_dal;
  // edge
  bool has_edge;
  int er, em, elo, ehi;  // its rank and expert, and the expert's edges
  unsigned emask;        // the expert's edges as lanes
  double mult, pm, x0, c, y, z, best, flow;  // c: the expert's demand
};

// f(e) for each edge of the lane's rank, rank_edges order (none without a rank).
template <typename F>
__device__ __forceinline__ void for_rank_edges(const View& v, const Lane& L, F&& f) {
LPLB_PRAGMA(unroll)
  for (int q = 0; q < kMaxDegree; ++q)
    if (q < L.deg) f(L.edges[q]);
  for (int q = L.more_lo; q < L.more_hi; ++q) f(v.rank_edges[q]);
}

__device__ __forceinline__ double rank_sum(const View& v, const Lane& L, const double* a) {
  double s = 0.0;
  for_rank_edges(v, L, [&](int e) { s += a[e]; });
  return s;
}

__device__ __forceinline__ double rank_dot(const View& v, const Lane& L, const double* a, const double* b) {
  double s = 0.0;
  for_rank_edges(v, L, [&](int e) { s += a[e] * b[e]; });
  return s;
}

// L.load = the ranks' loads under the edge values val (exact::rank_loads).  Uses e0;
// the barrier in front lets it follow any pass that read e0.
__device__ __forceinline__ void rank_loads(const View& v, Lane& L, const Smem& sm, double val) {
  __syncwarp();
  if (L.has_edge) sm.e0[threadIdx.x] = val;
  __syncwarp();
  L.load = L.fixed + rank_sum(v, L, sm.e0);
}

// The lane's rank, expert and edge, and the even split (exact::solve's setup).
template <typename T>
__device__ __forceinline__ void setup(const View& v, const T* loads, Lane& L) {
  const int lane = threadIdx.x;
  pair::setup_rank(v, loads, L);
  L.load = L.fixed;
  L.cap = L.beta = L.d_b = L.g_b = L.d_beta = 0.0;
  L.active = L.sticky = L.was_released = L.pinned = false;
  L.cpos = -1;
  L.has_exp = lane < v.M;
  L.lo = L.has_exp ? v.exp_ptr[lane] : 0;
  L.hi = L.has_exp ? v.exp_ptr[lane + 1] : 0;
  L.demand = L.has_exp ? static_cast<double>(loads[v.exp_log[lane]]) : 0.0;
  L.alpha = L.d_a = L.g_a = 0.0;
  L.inv_dal = 1.0;
  double slots = 0.0;
  for (int e = L.lo; e < L.hi; ++e) slots += v.edge_mult[e];
  const double x0 = blk::div_nz(L.demand, slots > 1.0 ? slots : 1.0);  // (0 on lanes past M)
  L.has_edge = lane < v.E;
  L.er = L.has_edge ? v.edge_rank[lane] : 0;
  L.em = L.has_edge ? v.edge_exp[lane] : 0;
  L.elo = L.has_edge ? v.exp_ptr[L.em] : 0;
  L.ehi = L.has_edge ? v.exp_ptr[L.em + 1] : 0;
  L.emask = (L.ehi >= 32 ? kFull : (1u << L.ehi) - 1u) & ~((1u << L.elo) - 1u);
  L.mult = L.has_edge ? static_cast<double>(v.edge_mult[lane]) : 0.0;
  L.pm = L.mult;
  const double x0e = shfl(x0, L.em);
  const double ce = shfl(L.demand, L.em);
  L.x0 = L.has_edge ? x0e : 0.0;
  L.c = L.has_edge ? ce : 0.0;
  L.y = L.z = L.best = L.flow = L.mult * L.x0;
}

// ---------------------------------------------------------------- FISTA
// exact::fista's threshold candidate of edge i (value vi) of an expert with three or
// more edges: its rank k in the expert's descending order of values (ties by
// position) and the sum css of the k largest give (css - d) / k, NaN when not valid.
// The siblings' values are read four at a time, their loads issued together (one
// shared-memory latency per four, not per sibling), and added in edge order.
__device__ __forceinline__ double threshold_candidate(const Lane& L, const double* val, double vi) {
  const int i = threadIdx.x;
  int k = 1;
  double css = vi;
  for (int j0 = L.elo; j0 < L.ehi; j0 += 4) {
    double vj[4];
LPLB_PRAGMA(unroll)
    for (int q = 0; q < 4; ++q) vj[q] = j0 + q < L.ehi ? val[j0 + q] : 0.0;
LPLB_PRAGMA(unroll)
    for (int q = 0; q < 4; ++q) {
      const int j = j0 + q;
      if (j < L.ehi && j != i && (vj[q] > vi || (vj[q] == vi && j < i))) {
        ++k;
        css += vj[q];
      }
    }
  }
  const double th = (css - L.c) / k;
  return vi - th > 0.0 ? th : NAN;
}

// The edge's new y: the projection of the values val onto its expert's simplex, by
// exact::fista's closed form for two edges, else by the threshold of the valid
// candidate (th) of smallest value, ties to the later edge (read four at a time, as
// above).
__device__ __forceinline__ double simplex_y(const Lane& L, const double* val, const double* th, double vi) {
  const double d = L.c;
  if (L.ehi - L.elo == 2) {
    double first = 0.5 * (val[L.elo] - val[L.elo + 1] + d);
    first = first < 0.0 ? 0.0 : (first > d ? d : first);
    return static_cast<int>(threadIdx.x) == L.elo ? first : d - first;
  }
  int best = -1;
  double vb = 0.0, t = 0.0;
  for (int j0 = L.elo; j0 < L.ehi; j0 += 4) {
    double tj[4], vj[4];
LPLB_PRAGMA(unroll)
    for (int q = 0; q < 4; ++q) {
      const bool in = j0 + q < L.ehi;
      tj[q] = in ? th[j0 + q] : NAN;
      vj[q] = in ? val[j0 + q] : 0.0;
    }
LPLB_PRAGMA(unroll)
    for (int q = 0; q < 4; ++q) {
      if (tj[q] == tj[q] && (best < 0 || vj[q] < vb || (vj[q] == vb && j0 + q > best))) {
        best = j0 + q;
        vb = vj[q];
        t = tj[q];
      }
    }
  }
  if (best < 0) {  // only when all values are -inf-like: the largest one keeps d
    double mx = val[L.elo];
    for (int j = L.elo + 1; j < L.ehi; ++j) mx = val[j] > mx ? val[j] : mx;
    t = mx - d;
  }
  const double u = vi - t;
  return u > 0.0 ? u : 0.0;
}

// One accelerated projected-gradient sweep (exact::fista's body) on the edges' y, z.
// simplex: some expert has three or more edges (exact::fista's test); otherwise the
// candidates' pass is skipped.
__device__ __forceinline__ void fista_sweep(const View& v, Lane& L, const Smem& sm, double step, double mom,
                                            bool simplex) {
  const int e = threadIdx.x;
  rank_loads(v, L, sm, L.z);
  const double ld = shfl(L.load, L.er);
  const double val = L.z - step * ld;
  if (L.has_edge) sm.e1[e] = val;
  __syncwarp();
  if (simplex) {
    if (L.has_edge && L.ehi - L.elo != 2) sm.e2[e] = threshold_candidate(L, sm.e1, val);
    __syncwarp();
  }
  // (e1 and e2 are rewritten only behind the next sweep's barriers)
  const double ynew = L.has_edge ? simplex_y(L, sm.e1, sm.e2, val) : 0.0;
  L.z = ynew + mom * (ynew - L.y);
  L.y = ynew;
}

// ---------------------------------------------------------------- bound
// exact::prefix_bound on the loads in L.load; pin: whether this lane's rank is in the
// shortest best prefix.
__device__ double prefix_bound(const View& v, Lane& L, const Smem& sm, bool& pin) {
  const int R = v.R, lane = threadIdx.x;
  int pos = 0;
  for (int q = 0; q < R; ++q) {
    const double lq = shfl(L.load, q);
    pos += (lq > L.load || (lq == L.load && q < lane)) ? 1 : 0;
  }
  // an expert's demand counts at the position where its last copy enters the order
  const double pe = shfl(static_cast<double>(pos), L.er);
  __syncwarp();  // (e0, e1: their last readers)
  if (L.has_edge) sm.e0[lane] = pe;
  __syncwarp();
  double last = 0.0;
  for (int j = L.elo; j < L.ehi; ++j) last = sm.e0[j] > last ? sm.e0[j] : last;
  if (L.has_edge) sm.e1[lane] = last == pe ? L.c : 0.0;
  __syncwarp();
  const double s = rank_sum(v, L, sm.e1);
  if (L.has_rank) sm.gain[pos] = L.fixed + s;
  __syncwarp();
  // each lane p sums gain[0..p] left to right: the reference's cumulative sum, bit for
  // bit, without a serial pass
  double ratio = -HUGE_VAL;
  if (lane < R) {
    double acc = 0.0;
    for (int p = 0; p <= lane; ++p) acc += sm.gain[p];
    ratio = acc / (lane + 1);
  }
  const double best = wmax(ratio);
  const unsigned at = __ballot_sync(kFull, lane < R && ratio == best);
  pin = L.has_rank && pos < __ffs(at);  // (__ffs: 1 + the first position; 0 if none)
  return best;
}

// ---------------------------------------------------------------- projection
// project's start: the ranks' room, the edges cut at the pinned prefix, the first
// active set, the dual's constant and its cap.  Returns false when some rank has no
// room even for nothing (the bound is below its fixed load).
__device__ __forceinline__ bool project_start(const View& v, Lane& L, const Smem& sm, double bound, double tol,
                                              double& const_term, double& dual_cap) {
  const int lane = threadIdx.x;
  L.cap = bound - L.fixed;
  L.beta = L.d_b = 0.0;
  L.sticky = L.pinned;
  L.was_released = false;
  L.alpha = L.d_a = 0.0;
  // An expert with copies both in the pinned prefix and outside it sends nothing into
  // the prefix: the prefix's own load fills it exactly to the bound, so in any split
  // under the bound those edges carry 0.  The projection is the same with them cut
  // (the same unique point), and Newton need not find that out.
  const double pin_r = shfl(L.pinned ? 1.0 : 0.0, L.er);
  const bool pin_e = L.has_edge && pin_r > 0.0;
  const unsigned pinned_edges = __ballot_sync(kFull, pin_e);
  const bool in = (pinned_edges & L.emask) != 0u, out = (~pinned_edges & L.emask) != 0u;
  L.pm = in && out && pin_e ? 0.0 : L.mult;
  // the ranks the even split overloads start active
  __syncwarp();  // (e0, e1: their last readers)
  if (L.has_edge) {
    sm.e0[lane] = L.mult;
    sm.e1[lane] = L.x0;
  }
  __syncwarp();
  const double even = L.fixed + rank_dot(v, L, sm.e0, sm.e1);
  L.active = L.has_rank && (even > bound || L.pinned);
  // Any valid split y has 1/2 sum (y - x0)^2 <= 1/2 sum_e mult c^2 (per slot, y and x0
  // both lie in [0, c]), so by weak duality a dual value above twice that (rounding
  // margin) proves that no split meets the bound (exact::project).
  double acc[2] = {L.has_edge ? L.mult * L.x0 * L.x0 : 0.0, L.has_edge ? L.mult * L.c * L.c : 0.0};
  pair::wreduce<2, 0u>(acc);
  const_term = 0.5 * acc[0];
  dual_cap = acc[1];
  return __ballot_sync(kFull, L.has_rank && L.cap < -tol) == 0u;
}

// The Newton system's unknowns: the active ranks in rank order (an inactive rank's row
// is the identity, and eliminating it changes nothing, bit for bit).  Sets each rank's
// row, each row's rank and each edge's row; returns the number of rows.
__device__ __forceinline__ int number_rows(Lane& L, const Smem& sm) {
  const int lane = threadIdx.x;
  const unsigned act = __ballot_sync(kFull, L.active);
  L.cpos = L.active ? __popc(act & ((1u << lane) - 1u)) : -1;
  if (L.active) sm.owner[L.cpos] = lane;
  const double row = shfl(static_cast<double>(L.cpos), L.er);
  if (L.has_edge) sm.ecpos[lane] = static_cast<int>(row);
  return __popc(act);
}

// Gradients, Hessian diagonals and the dual at (alpha, beta) (exact::project's first
// pass): the experts' into L.g_a, L.inv_dal and sm.g_a, sm.inv_dal, the active ranks'
// into L.g_b, L.d_beta; e0 keeps the edges' s = x0 + alpha + beta and e1 their weights
// (slots where s > 0) for the Newton rows.  acc: (max |g|, dual less its constant).
__device__ __forceinline__ void gradient(const View& v, Lane& L, const Smem& sm, double (&acc)[2]) {
  const int lane = threadIdx.x;
  const double a = shfl(L.alpha, L.em);
  const double b = shfl(L.beta, L.er);
  const double s = L.x0 + a + b;
  __syncwarp();  // (e0, e1: the previous iteration's readers)
  if (L.has_edge) {
    sm.e0[lane] = s;
    sm.e1[lane] = s > 0.0 ? L.pm : 0.0;
  }
  __syncwarp();
  acc[0] = -HUGE_VAL;
  acc[1] = 0.0;
  if (L.has_exp) {
    double f = 0.0, wsum = 0.0, sq = 0.0;
    for (int e = L.lo; e < L.hi; ++e) {
      const double m = sm.e1[e], x = sm.e0[e];
      f += m * x;
      wsum += m;
      sq += m * x * x;
    }
    const double g = L.demand - f;
    L.g_a = g;
    L.inv_dal = 1.0 / (wsum + kDelta);
    sm.g_a[lane] = g;
    sm.inv_dal[lane] = L.inv_dal;
    acc[0] = g < 0.0 ? -g : g;
    acc[1] = L.demand * L.alpha - 0.5 * sq;
  }
  L.g_b = 0.0;
  L.d_beta = kDelta;
  if (L.active) {
    double f = 0.0, wsum = 0.0;
    for_rank_edges(v, L, [&](int e) {
      f += sm.e1[e] * sm.e0[e];
      wsum += sm.e1[e];
    });
    L.g_b = L.cap - f;
    L.d_beta = wsum + kDelta;
    acc[1] += L.cap * L.beta;
  }
  if (L.has_rank) acc[0] = blk::nanmax(acc[0], L.g_b < 0.0 ? -L.g_b : L.g_b);
  pair::wmax_sum(acc[0], acc[1]);
}

// Row cpos of the Newton system (the Schur complement over the active ranks) for this
// lane's active rank, its contributions in expert order as exact::project adds them;
// returns its right-hand side.
__device__ __forceinline__ double schur_row(const View& v, const Lane& L, const Smem& sm, int n_act, int lda) {
  double* row = sm.schur + static_cast<size_t>(L.cpos) * lda;
  for (int b = 0; b < n_act; ++b) row[b] = 0.0;
  row[L.cpos] = L.d_beta;
  double s = 0.0;
  for_rank_edges(v, L, [&](int e) {
    const double ce = sm.e1[e];
    if (ce == 0.0) return;
    const int m = v.edge_exp[e];
    const double id = sm.inv_dal[m];
    for (int f = v.exp_ptr[m]; f < v.exp_ptr[m + 1]; ++f) {
      const int b = sm.ecpos[f];
      if (b >= 0) row[b] -= (ce * sm.e1[f]) * id;
    }
    s += ce * (sm.g_a[m] * id);
  });
  return L.g_b - s;
}

// One Newton step from the gradient pass's data: the system solved with a lane per
// row, the experts' direction (their edges in edge order), and the full step taken.
// Returns the slope g . d (every lane).
__device__ double newton_step(const View& v, Lane& L, const Smem& sm, int n_act, Prof& P) {
  const int lane = threadIdx.x, lda = v.R + 1;
  __syncwarp();  // (sm.g_a, sm.inv_dal)
  const double rhs = L.active ? schur_row(v, L, sm, n_act, lda) : 0.0;
  __syncwarp();  // every row complete: lane k reads row k, built by its rank's lane
  LPLB_TICK(P, 5);
  double x = shfl(rhs, lane < n_act ? sm.owner[lane] : 0);
  // (as solve_pair.cuh: Gauss-Jordan over the warp up to 8 rows, shared memory above)
  x = n_act <= 8 ? pair::solve_gj8(sm.schur, n_act, lda, x) : pair::solve_spd(sm.schur, n_act, lda, x);
  const double xr = shfl(x, L.active ? L.cpos : 0);
  L.d_b = L.active ? xr : 0.0;
  LPLB_TICK(P, 6);
  const double db = shfl(L.d_b, L.er);
  if (L.has_edge) sm.e2[lane] = db;  // (e2's last readers: behind the gradient pass's barriers)
  __syncwarp();
  double slope = 0.0;
  if (L.has_exp) {
    double s = 0.0;
    for (int e = L.lo; e < L.hi; ++e) s += sm.e1[e] * sm.e2[e];
    L.d_a = (L.g_a - s) * L.inv_dal;
    L.alpha += L.d_a;
    slope += L.g_a * L.d_a;
  }
  if (L.active) {
    slope += L.g_b * L.d_b;
    L.beta += L.d_b;
  }
  slope = pair::wsum(slope);
  LPLB_TICK(P, 7);
  return slope;
}

// Semismooth Newton on the dual over the current active set (exact::project's inner
// loop).  The step is taken optimistically (full), and the next gradient pass, which
// evaluates the dual anyway, checks Armijo's condition; on failure exact::backtrack
// gives the next trial.  Returns whether the gradient vanished; false after
// kNewtonIters steps or once the dual passes its cap (the bound is too low).
__device__ bool newton(const View& v, Lane& L, const Smem& sm, int n_act, double const_term, double dual_cap,
                       double scale, int& its, Prof& P) {
  bool pending = false;
  double base = 0.0, slope = 0.0, step = 1.0;
  int steps = 0, halvings = 0;
  for (;;) {
    double acc[2];
    gradient(v, L, sm, acc);
    LPLB_TICK(P, 4);
    if (acc[0] <= 1e-11 * scale) return true;
    const double dual = acc[1] + const_term;
    if (dual > dual_cap) return false;
    if (pending && halvings < 40 && !(dual >= base + 1e-4 * step * slope)) {
      double big = L.has_exp ? fabs(L.d_a) : -HUGE_VAL;
      if (L.has_rank) big = blk::nanmax(big, L.active ? fabs(L.d_b) : 0.0);
      big = wmax(big);
      const double next = exact::backtrack(step, slope, base, dual, big, v.R, scale);
      const double back = step - next;
      step = next;
      ++halvings;
      if (L.has_exp) L.alpha -= back * L.d_a;
      if (L.active) L.beta -= back * L.d_b;
      continue;
    }
    pending = false;
    if (steps == exact::kNewtonIters) return false;
    ++steps;
    ++its;
    base = dual;
    slope = newton_step(v, L, sm, n_act, P);
    step = 1.0;
    halvings = 0;
    pending = true;
  }
}

// After Newton: the flows at (alpha, beta) into L.flow and their loads into L.load,
// then the next active set (a bound that pulls load in is not binding, unless
// releasing it overshot).  Returns whether the set stays as it was.
__device__ __forceinline__ bool settle(const View& v, Lane& L, const Smem& sm, double bound, double tol) {
  const int lane = threadIdx.x;
  const double a = shfl(L.alpha, L.em);
  const double b = shfl(L.beta, L.er);
  const double s = L.x0 + a + b, sp = s > 0.0 ? s : 0.0;
  L.flow = L.pm * sp;
  __syncwarp();  // (e0, e1: the last gradient pass's readers)
  if (L.has_edge) {
    sm.e0[lane] = L.pm;
    sm.e1[lane] = sp;
  }
  __syncwarp();
  L.load = L.fixed + rank_dot(v, L, sm.e0, sm.e1);
  const bool over = L.has_rank && !L.active && L.load > bound + tol;
  const bool released = L.has_rank && L.active && L.beta > tol * 1e-3 && !L.sticky;
  const unsigned moved = __ballot_sync(kFull, over || released);
  L.sticky = L.sticky || (over && L.was_released);
  L.was_released = L.was_released || released;
  L.active = (L.active || over) && !released;
  return moved == 0u;
}

// exact::project's end: each expert's flow rescaled onto its demand (one whose flow
// vanished within the tolerance takes the even split), then the certificate on the
// loads of that split (left in L.load).
__device__ __forceinline__ bool rescale_and_check(const View& v, Lane& L, const Smem& sm, double bound,
                                                  double tol) {
  const int lane = threadIdx.x;
  if (L.has_edge) sm.e2[lane] = L.flow;  // (e2's last readers: behind settle's barriers)
  __syncwarp();
  double tot = 0.0;
  for (int j = L.elo; j < L.ehi; ++j) tot += sm.e2[j];
  const bool live = L.c > 0.0, vanished = live && !(tot > 0.0);
  const bool dead = L.has_edge && vanished && !(L.c <= tol);
  const double fac = live && !vanished ? blk::div_nz(L.c, tot) : 0.0;
  L.flow = !live ? 0.0 : (vanished ? L.mult * L.x0 : L.flow * fac);
  if (__ballot_sync(kFull, dead) != 0u) return false;
  rank_loads(v, L, sm, L.flow);
  return __ballot_sync(kFull, L.has_rank && !(L.load - (bound + tol) <= 0.0)) == 0u;
}

// exact::project: the even split projected onto {valid split, load <= bound}; the flow
// ends in L.flow, its loads in L.load.  Returns whether it exists and meets the
// certificate tolerance.
__device__ bool project(const View& v, Lane& L, const Smem& sm, double bound, double scale, int& its, Prof& P) {
  const double tol = exact::kCertRtol * scale;
  double const_term, dual_cap;
  const bool room = project_start(v, L, sm, bound, tol, const_term, dual_cap);
  LPLB_TICK(P, 3);
  if (!room) return false;
  bool settled = false;
  for (int outer = 0; outer < exact::kOuterIters && !settled; ++outer) {
    if (!L.active) L.beta = 0.0;
    const int n_act = number_rows(L, sm);
    if (!newton(v, L, sm, n_act, const_term, dual_cap, scale, its, P)) return false;
    settled = settle(v, L, sm, bound, tol);
    LPLB_TICK(P, 8);
  }
  return settled && rescale_and_check(v, L, sm, bound, tol);
}

// ---------------------------------------------------------------- driver
// Solves the component (one warp); the split ends in sm.flow, its loads in sm.load, as
// exact::solve leaves them in w.flow / w.load.  v: the staged view (index arrays in
// shared memory).  kSubsets: as pair::solve's.
template <bool kSubsets, typename T>
__device__ exact::Result solve(const View& v, const T* loads, const Smem& sm, double lipschitz, int max_rounds) {
  exact::Result res{1, 0, 0, 0.0};
  [[maybe_unused]] Prof P;
  LPLB_TICK(P, 0);
  const int lane = threadIdx.x;
  Lane L;
  setup(v, loads, L);
  rank_loads(v, L, sm, L.y);
  // the even split's max load, the largest demand and fixed load
  double mx[3] = {L.has_rank ? L.load : -HUGE_VAL, L.has_exp ? L.demand : -HUGE_VAL,
                  L.has_rank ? L.fixed : -HUGE_VAL};
  pair::wreduce<3, 7u>(mx);
  const double dmax = mx[1], fmax = mx[2];
  auto finish = [&](double flow, int certified) {
    if (L.has_edge) sm.flow[lane] = flow;
    if (L.has_rank) sm.load[lane] = L.load;
    __syncwarp();
    res.certified = certified;
    return res;
  };
  if (v.E == 0 || !(dmax > 0.0)) {
    res.bound = mx[0];
    return finish(L.y, 1);
  }
  LPLB_TICK(P, 0);
  const double scale = dmax > fmax ? dmax : fmax;
  const double step = 1.0 / lipschitz;
  const bool simplex = v.E != 2 * v.M;  // (every movable expert has at least two edges)
  double best_max = mx[0], bound = -HUGE_VAL, t_k = 1.0;
  int done = 0;
  // 0 rounds (a test hook, like the reference's empty round list): the fallback path
  const int rounds = max_rounds < 0 ? 0 : (max_rounds > 5 ? 5 : max_rounds);
  // With kSubsets the first bound is the optimum itself (pair::subset_bound), with no
  // FISTA sweeps; should that attempt not certify (rounding), the later rounds run as
  // without.  Each expert counts once, at its first edge, with the ranks of all its
  // edges.  (One call of project for both, as pair::solve has it.)
  for (int rnd = 0; rnd < rounds; ++rnd) {
    const bool subsets = kSubsets && rnd == 0 && v.R <= pair::kSubsetRanks;
    bool pin;
    double pb;
    if (subsets) {
      unsigned ranks = 0u;
LPLB_PRAGMA(unroll)
      for (int r = 0; r < pair::kSubsetRanks; ++r)
        if (__ballot_sync(pair::kFull, L.has_edge && L.er == r) & L.emask) ranks |= 1u << r;
      const double c[1] = {L.has_edge && lane == L.elo ? L.c : 0.0};
      const unsigned mask[1] = {L.has_edge ? ranks : 0u};
      pb = pair::subset_bound<1>(v.R, L.fixed, c, mask, pin);
    } else {
      for (int it = exact::rounds_done(rnd) - done; it > 0; --it) {
        const double t_new = 0.5 * (1.0 + sqrt(1.0 + 4.0 * t_k * t_k));
        fista_sweep(v, L, sm, step, (t_k - 1.0) / t_new, simplex);
        t_k = t_new;
      }
      LPLB_TICK(P, 1);
      done = exact::rounds_done(rnd);
      rank_loads(v, L, sm, L.y);
      const double amax = wmax(L.has_rank ? L.load : -HUGE_VAL);
      if (amax < best_max) {
        best_max = amax;
        L.best = L.y;
      }
      pb = prefix_bound(v, L, sm, pin);
    }
    if (pb >= bound) {
      bound = pb;
      L.pinned = pin;
    }
    res.rounds = rnd + 1;
    LPLB_TICK(P, 2);
    const bool ok = project(v, L, sm, bound, scale, res.newton_iters, P);
    LPLB_TICK(P, 9);
#if defined(LPLB_PROF) && defined(__CUDA_ARCH__)
    if (lane == 0)
      printf("wxprof blk %d R %d M %d E %d newton %d: setup %lld fista %lld prefix %lld pre %lld grad %lld "
             "schur %lld solve %lld dir %lld outer %lld final %lld\n",
             blockIdx.x, v.R, v.M, v.E, res.newton_iters, P.acc[0], P.acc[1], P.acc[2], P.acc[3], P.acc[4],
             P.acc[5], P.acc[6], P.acc[7], P.acc[8], P.acc[9]);
#endif
    if (ok) {
      res.bound = bound;
      return finish(L.flow, 1);
    }
    if (subsets) {  // the later rounds' bounds and pins stand on their own
      bound = -HUGE_VAL;
      L.pinned = false;
    }
  }
  // not certified: the best valid split found
  rank_loads(v, L, sm, L.best);
  res.bound = bound;
  return finish(L.best, 0);
}

#endif  // __CUDA_ARCH__ || LPLB_WARP_EMULATION

}  // namespace exact_warp
}  // namespace lplb
