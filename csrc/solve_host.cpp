// CPU build of the solve kernels' code (block_ops.cuh runs it on one host thread).
// Used by the tests (tests/kernel_emulation.py loads it through ctypes), so that the
// kernels' algorithm is checked against the reference on machines without a GPU.
#include <vector>

#include "slot_split.cuh"
#include "solve_exact.cuh"
#include "solve_ipm.cuh"
// the one-warp two-copy solver, its warp emulated by 32 host threads
#define LPLB_WARP_EMULATION
#include "warp_emulation.h"
#include "solve_pair.cuh"
#include "solve_exact_warp.cuh"
#include "solve_ipm_pair.cuh"
#include "solve_ipm_warp.cuh"

namespace {

// solve_one(team, view, c) for every component in turn, as the kernels' grid runs them.
template <typename F>
void each_component(const lplb::CompArrays& a, F&& solve_one) {
  double red[80];
  const lplb::blk::Team team{red};
  for (int c = 0; c < a.n_comp; ++c) solve_one(team, lplb::View::of(a, c), c);
}

// A buffer holding one component's scratch (Newton matrix included), with w laid out in it.
template <typename Work>
std::vector<double> scratch(Work& w, const lplb::View& v) {
  std::vector<double> buf(Work::layout(nullptr, nullptr, v.R, v.M, v.E, true) / sizeof(double) + 1);
  Work::layout(&w, reinterpret_cast<char*>(buf.data()), v.R, v.M, v.E, true);
  return buf;
}

// solve(team, v, w) -> exact::Result for every component as the exact kernels set it
// up (index arrays staged, exact::Work laid out), then its answer to out.
template <typename Solve>
void each_exact_component(const lplb::CompArrays& a, const lplb::SolveOut& out, Solve&& solve) {
  each_component(a, [&](const lplb::blk::Team& team, const lplb::View& g, int c) {
    std::vector<int> staged(lplb::View::staged_ints(g.R, g.M, g.E));
    const lplb::View v = g.stage(team, staged.data());
    lplb::exact::Work w;
    const std::vector<double> buf = scratch(w, v);
    const lplb::exact::Result r = solve(team, v, w);
    lplb::write_out(team, v, c, w.flow, w.load, r.certified, r.bound, r.rounds, r.newton_iters, out);
  });
}

// The largest component's ranks, experts and edges (the CUDA launcher picks the
// one-warp solvers' instances and checks their limits by these).
struct Largest {
  int R = 0, M = 0, E = 0;
};
Largest largest(const lplb::CompArrays& a) {
  Largest l;
  for (int c = 0; c < a.n_comp; ++c) {
    const lplb::View v = lplb::View::of(a, c);
    l.R = v.R > l.R ? v.R : l.R;
    l.M = v.M > l.M ? v.M : l.M;
    l.E = v.E > l.E ? v.E : l.E;
  }
  return l;
}

// As the CUDA launcher: the one-warp exact solvers' instances with the enumerated bound?
bool subsets(const Largest& l) { return lplb::pair::takes_subsets(l.R, l.M); }

// The CPU build without the enumerated bound (-DLPLB_NO_SUBSET_BOUND, a test build:
// tests/kernel_emulation.py's rounds_only) takes the rounds on every component, so
// that the tests still reach them on small components, where the GPU takes them only
// should the enumerated bound fail to certify.
#ifdef LPLB_NO_SUBSET_BOUND
constexpr bool kHostSubsets = false;
#else
constexpr bool kHostSubsets = true;
#endif

// f() on one emulated warp; lane 0's result.
template <typename F>
auto on_warp(F&& f) {
  decltype(f()) r{};
  lplb::emu::run_warp([&] {
    const auto lane_r = f();
    if (lplb::emu::t_lane == 0) r = lane_r;
  });
  return r;
}

// f() on an emulated block with helper warps (team_inverse.cuh: warp 0 runs it, the
// helpers serve the Newton matrix in sm.schur, n x n, until warp 0 dismisses them);
// lane 0's result.
template <typename Smem, typename F>
auto on_team(const Smem& sm, int n, F&& f) {
  namespace ti = lplb::team_inverse;
  decltype(f()) r{};
  lplb::emu::run_block(1 + ti::kHelpers, [&] {
    ti::clear(sm.schur, n, n + 1);  // (the kernel's __syncthreads: the block's barrier)
    lplb::emu::named_bar(1);
    if (lplb::emu::t_tid < 32) {
      const auto lane_r = f();
      ti::dismiss(sm.team);
      if (lplb::emu::t_tid == 0) r = lane_r;
    } else {
      ti::serve(sm.schur, n, n + 1, sm.team);
    }
  });
  return r;
}

// solve(view, sm) -> ipm::Result for every component on one emulated warp (on a team
// when `team`, as the kernels with ipm_pair::kUsesTeam run), with a one-warp IPM's
// shared arrays (Smem) in a host buffer; the view staged first when `stage` (as the
// kernel does); the answer to out.
template <typename Smem, typename Solve>
void each_warp_ipm_component(const lplb::CompArrays& a, const lplb::SolveOut& out, bool stage, bool team,
                             Solve&& solve) {
  each_component(a, [&](const lplb::blk::Team& t, const lplb::View& g, int c) {
    std::vector<int> staged(stage ? lplb::View::staged_ints(g.R, g.M, g.E) : 0);
    const lplb::View v = stage ? g.stage(t, staged.data()) : g;
    std::vector<double> buf(Smem::layout(nullptr, nullptr, v.R, v.E, team) / sizeof(double) + 1);
    Smem sm;
    Smem::layout(&sm, reinterpret_cast<char*>(buf.data()), v.R, v.E, team);
    const lplb::ipm::Result r =
        team ? on_team(sm, v.R, [&] { return solve(v, sm); }) : on_warp([&] { return solve(v, sm); });
    lplb::write_out(t, v, c, sm.flow, sm.load, r.converged, r.objective, r.iterations, 0, out);
  });
}

// solve(view, sm) -> exact::Result for every component on one emulated warp, as
// exact_warp_kernel sets it up (index arrays staged, exact_warp::Smem in a host
// buffer); the answer to out.
template <typename Solve>
void each_exact_warp_component(const lplb::CompArrays& a, const lplb::SolveOut& out, Solve&& solve) {
  namespace xw = lplb::exact_warp;
  each_component(a, [&](const lplb::blk::Team& team, const lplb::View& g, int c) {
    std::vector<int> staged(lplb::View::staged_ints(g.R, g.M, g.E));
    const lplb::View v = g.stage(team, staged.data());
    std::vector<double> buf(xw::Smem::layout(nullptr, nullptr, v.R, v.M, v.E) / sizeof(double) + 1);
    xw::Smem sm;
    xw::Smem::layout(&sm, reinterpret_cast<char*>(buf.data()), v.R, v.M, v.E);
    const lplb::exact::Result r = on_warp([&] { return solve(v, sm); });
    lplb::write_out(team, v, c, sm.flow, sm.load, r.certified, r.bound, r.rounds, r.newton_iters, out);
  });
}

}  // namespace

// Every entry point takes the arrays of lplb_plugin/component_arrays.py (one int
// pointer each, as tests/kernel_emulation.py passes them), the loads, its method's
// options, then the outputs of lplb::SolveOut.
#define LPLB_HOST_ARRAYS                                                                                  \
  int n_comp, const int *comp_rank_off, const int *comp_exp_off, const int *comp_edge_off,               \
      const int *rank_global, const int *fix_off, const int *fix_log, const int *fix_div,                \
      const int *exp_log, const int *exp_ptr, const int *edge_rank, const int *edge_exp,                 \
      const int *edge_mult, const int *edge_global, const int *rank_ptr, const int *rank_edges
#define LPLB_HOST_OUT double *edge_flow, double *rank_load, int *status, double *bound, int *iters
// ... and the two structs the kernels take, built from those parameters
#define LPLB_HOST_COMP                                                                                    \
  const lplb::CompArrays a{n_comp,    comp_rank_off, comp_exp_off, comp_edge_off, rank_global, fix_off,   \
                           fix_log,   fix_div,       exp_log,      exp_ptr,       edge_rank,   edge_exp,  \
                           edge_mult, edge_global,   rank_ptr,     rank_edges}
#define LPLB_HOST_STRUCTS \
  LPLB_HOST_COMP;         \
  const lplb::SolveOut out{edge_flow, rank_load, status, bound, iters}

extern "C" {

// Loads float64 [L].  Returns 0.
int lplb_solve_exact_host(LPLB_HOST_ARRAYS, const double* loads, double lipschitz, int max_rounds, LPLB_HOST_OUT) {
  LPLB_HOST_STRUCTS;
  each_exact_component(a, out, [&](const lplb::blk::Team& team, const lplb::View& v, const lplb::exact::Work& w) {
    return lplb::exact::solve(team, v, loads, w, lipschitz, max_rounds);
  });
  return 0;
}

// The one-warp two-copy exact solver (csrc/solve_pair.cuh): same arrays and outputs as
// lplb_solve_exact_host; every component must be two-copy and within pair::kMax*
// (the caller checks, as the CUDA launcher's caller does).  Experts per lane as the
// kernel: one when no component has more than 32.  Returns 0, or 1 when a component
// is too large.
int lplb_solve_pair_host(LPLB_HOST_ARRAYS, const double* loads, double lipschitz, int max_rounds, LPLB_HOST_OUT) {
  LPLB_HOST_STRUCTS;
  const Largest l = largest(a);
  if (l.R > lplb::pair::kMaxRanks || l.M > lplb::pair::kMaxExperts) return 1;
  each_exact_component(a, out, [&](const lplb::blk::Team&, const lplb::View& v, const lplb::exact::Work& w) {
    return on_warp([&] {
      return subsets(l)  ? lplb::pair::solve<1, kHostSubsets>(v, loads, w, lipschitz, max_rounds)
             : l.M <= 32 ? lplb::pair::solve<1, false>(v, loads, w, lipschitz, max_rounds)
                         : lplb::pair::solve<2, false>(v, loads, w, lipschitz, max_rounds);
    });
  });
  return 0;
}

// The one-warp exact solver for small components of any placement
// (csrc/solve_exact_warp.cuh), its warp emulated by 32 host threads: same arrays,
// options and outputs as lplb_solve_exact_host; every component must be within
// exact_warp::kMax* (the caller checks, as the CUDA launcher's caller does).
// Returns 0, or 1 when a component is too large.
int lplb_solve_exact_warp_host(LPLB_HOST_ARRAYS, const double* loads, double lipschitz, int max_rounds,
                               LPLB_HOST_OUT) {
  LPLB_HOST_STRUCTS;
  namespace xw = lplb::exact_warp;
  const Largest l = largest(a);
  if (l.R > xw::kMaxRanks || l.M > xw::kMaxExperts || l.E > xw::kMaxEdges) return 1;
  each_exact_warp_component(a, out, [&](const lplb::View& v, const xw::Smem& sm) {
    return subsets(l) ? xw::solve<kHostSubsets>(v, loads, sm, lipschitz, max_rounds)
                      : xw::solve<false>(v, loads, sm, lipschitz, max_rounds);
  });
  return 0;
}

// The IPM (csrc/solve_ipm.cuh): same arrays and outputs; status = converged, bound =
// objective (max rank load of the component), iters = (iterations, 0).  Returns 0.
int lplb_solve_ipm_host(LPLB_HOST_ARRAYS, const double* loads, int max_iters, double tol, LPLB_HOST_OUT) {
  LPLB_HOST_STRUCTS;
  each_component(a, [&](const lplb::blk::Team& team, const lplb::View& v, int c) {
    lplb::ipm::Work w;
    const std::vector<double> buf = scratch(w, v);
    const lplb::ipm::Result r = lplb::ipm::solve(team, v, loads, w, max_iters, tol);
    lplb::write_out(team, v, c, w.flow, w.load, r.converged, r.objective, r.iterations, 0, out);
  });
  return 0;
}

// The IPM's one-warp two-copy solver (csrc/solve_ipm_pair.cuh), its warp emulated by
// 32 host threads: same arrays, options and outputs as lplb_solve_ipm_host; every
// component must be two-copy and within pair::kMax*.  Returns 0, or 1 when a
// component is too large.
int lplb_solve_ipm_pair_host(LPLB_HOST_ARRAYS, const double* loads, int max_iters, double tol, LPLB_HOST_OUT) {
  LPLB_HOST_STRUCTS;
  namespace ip = lplb::ipm_pair;
  const Largest l = largest(a);
  if (l.R > lplb::pair::kMaxRanks || l.M > lplb::pair::kMaxExperts) return 1;
  // J and the factor's registers (NR) as the CUDA launcher picks them
  each_warp_ipm_component<ip::Smem>(a, out, false, l.R > ip::kTeamRanks, [&](const lplb::View& v,
                                                                              const ip::Smem& sm) {
    if (l.M <= 32)
      return l.R <= 8    ? ip::solve<1, 8>(v, loads, sm, max_iters, tol)
             : l.R <= 16 ? ip::solve<1, 16>(v, loads, sm, max_iters, tol)
                         : ip::solve<1, 32>(v, loads, sm, max_iters, tol);
    return l.R <= 8    ? ip::solve<2, 8>(v, loads, sm, max_iters, tol)
           : l.R <= 16 ? ip::solve<2, 16>(v, loads, sm, max_iters, tol)
                       : ip::solve<2, 32>(v, loads, sm, max_iters, tol);
  });
  return 0;
}

// The IPM's one-warp solver for small components of any placement
// (csrc/solve_ipm_warp.cuh), its warp emulated by 32 host threads: same arrays,
// options and outputs as lplb_solve_ipm_host; every component must be within
// ipm_warp::kMax*.  Returns 0, or 1 when a component is too large.
int lplb_solve_ipm_warp_host(LPLB_HOST_ARRAYS, const double* loads, int max_iters, double tol, LPLB_HOST_OUT) {
  LPLB_HOST_STRUCTS;
  namespace iw = lplb::ipm_warp;
  const Largest l = largest(a);
  if (l.R > iw::kMaxRanks || l.M > iw::kMaxExperts || l.E > iw::kMaxEdges) return 1;
  // the factor's registers (NR) as the CUDA launcher picks them
  each_warp_ipm_component<iw::Smem>(a, out, true, l.R > lplb::ipm_pair::kTeamRanks,
                                    [&](const lplb::View& v, const iw::Smem& sm) {
    return l.R <= 8    ? iw::solve<8>(v, loads, sm, max_iters, tol)
           : l.R <= 16 ? iw::solve<16>(v, loads, sm, max_iters, tol)
                       : iw::solve<32>(v, loads, sm, max_iters, tol);
  });
  return 0;
}

// The per-slot split x [P] and copy shares cum [L, C] of an edge flow (edge_flow
// float64 [E], graph numbering), as the solve kernels write them (slot_split.cuh):
// each component's movable experts from the copy table (copies:
// ComponentArrays.copy_table) and the component's local flows, then the experts that
// cannot move.  Same arrays as the solvers, then log2phy int64 [L, C], logcnt int64
// [L], slot_edge and slot_share int32 [P], graph_edge_mult int32 [E], loads float64
// [L].  Returns 0.
int lplb_slot_split_host(LPLB_HOST_ARRAYS, const int* copies, int n_logical, int n_cols, const int64_t* log2phy,
                         const int64_t* logcnt, const int* slot_edge, const int* graph_edge_mult,
                         const int* slot_share, const double* loads, const double* edge_flow, double* x,
                         double* cum) {
  LPLB_HOST_COMP;
  const lplb::SlotSplit s{n_logical, n_cols, log2phy, logcnt, slot_edge, graph_edge_mult, slot_share,
                          copies,    x,      cum,     nullptr};
  each_component(a, [&](const lplb::blk::Team&, const lplb::View& v, int c) {
    std::vector<double> flow(v.E);  // the solver's local flow array
    for (int i = 0; i < v.E; ++i) flow[i] = edge_flow[v.edge_global[i]];
    for (int m = 0; m < v.M; ++m)
      lplb::slots::movable_row(s, lplb::slots::copy_line(s, a.comp_exp_off[c] + m), v.exp_log[m], flow.data(),
                               v.edge_mult);
  });
  lplb::slots::fixed_rows(s, loads, 0, 1);
  return 0;
}

// blk::div_small(a[i], n[i], 1 / n[i]) into out[i] (the tests compare it with the
// division).  Returns 0.
int lplb_div_small_host(const double* a, const double* n, int count, double* out) {
  for (int i = 0; i < count; ++i) out[i] = lplb::blk::div_small(a[i], n[i], 1.0 / n[i]);
  return 0;
}

}  // extern "C"
