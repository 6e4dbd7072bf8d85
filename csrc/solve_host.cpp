// CPU build of the solve kernels' code (block_ops.cuh runs it on one host thread).
// Used by the tests (tests/kernel_emulation.py loads it through ctypes), so that the
// kernels' algorithm is checked against the reference on machines without a GPU.
#include <cstdlib>
#include <vector>

#include "solve_exact.cuh"
#include "solve_ipm.cuh"

extern "C" {

// Arrays as in lplb_plugin/component_arrays.py; loads float64 [L].  Returns 0.
int lplb_solve_exact_host(int n_comp, const int* comp_rank_off, const int* comp_exp_off, const int* comp_edge_off,
                          const int* rank_global, const int* fix_off, const int* fix_log, const int* fix_div,
                          const int* exp_log, const int* exp_ptr, const int* edge_rank, const int* edge_exp,
                          const int* edge_mult, const int* edge_global, const int* rank_ptr, const int* rank_edges,
                          const double* loads, double lipschitz, int max_rounds, double* edge_flow, double* rank_load,
                          int* status, double* bound, int* iters) {
  lplb::CompArrays a{n_comp, comp_rank_off, comp_exp_off, comp_edge_off, rank_global, fix_off, fix_log, fix_div,
                     exp_log, exp_ptr, edge_rank, edge_exp, edge_mult, edge_global, rank_ptr, rank_edges};
  lplb::SolveOut out{edge_flow, rank_load, status, bound, iters};
  double red[80];
  lplb::blk::Team team{red};
  for (int c = 0; c < n_comp; ++c) {
    const lplb::View g = lplb::View::of(a, c);
    // the kernel's staging of the index arrays, exercised here too
    std::vector<int> staged(lplb::View::staged_ints(g.R, g.M, g.E));
    const lplb::View v = g.stage(team, staged.data());
    const size_t bytes = lplb::exact::Work::layout(nullptr, nullptr, v.R, v.M, v.E, true);
    std::vector<double> buf(bytes / sizeof(double) + 1);
    lplb::exact::Work w;
    lplb::exact::Work::layout(&w, reinterpret_cast<char*>(buf.data()), v.R, v.M, v.E, true);
    const lplb::exact::Result r = lplb::exact::solve(team, v, loads, w, lipschitz, max_rounds);
    lplb::write_out(team, v, c, w.flow, w.load, r.certified, r.bound, r.rounds, r.newton_iters, out);
  }
  return 0;
}

// The IPM (csrc/solve_ipm.cuh): same arrays and outputs; status = converged, bound =
// objective (max rank load of the component), iters = (iterations, 0).  Returns 0.
int lplb_solve_ipm_host(int n_comp, const int* comp_rank_off, const int* comp_exp_off, const int* comp_edge_off,
                        const int* rank_global, const int* fix_off, const int* fix_log, const int* fix_div,
                        const int* exp_log, const int* exp_ptr, const int* edge_rank, const int* edge_exp,
                        const int* edge_mult, const int* edge_global, const int* rank_ptr, const int* rank_edges,
                        const double* loads, int max_iters, double tol, double* edge_flow, double* rank_load,
                        int* status, double* bound, int* iters) {
  lplb::CompArrays a{n_comp, comp_rank_off, comp_exp_off, comp_edge_off, rank_global, fix_off, fix_log, fix_div,
                     exp_log, exp_ptr, edge_rank, edge_exp, edge_mult, edge_global, rank_ptr, rank_edges};
  lplb::SolveOut out{edge_flow, rank_load, status, bound, iters};
  double red[80];
  lplb::blk::Team team{red};
  for (int c = 0; c < n_comp; ++c) {
    const lplb::View v = lplb::View::of(a, c);
    const size_t bytes = lplb::ipm::Work::layout(nullptr, nullptr, v.R, v.M, v.E, true);
    std::vector<double> buf(bytes / sizeof(double) + 1);
    lplb::ipm::Work w;
    lplb::ipm::Work::layout(&w, reinterpret_cast<char*>(buf.data()), v.R, v.M, v.E, true);
    const lplb::ipm::Result r = lplb::ipm::solve(team, v, loads, w, max_iters, tol);
    lplb::write_out(team, v, c, w.flow, w.load, r.converged, r.objective, r.iterations, 0, out);
  }
  return 0;
}

}  // extern "C"
