// One connected component's part of the flat arrays of
// lplb_plugin/component_arrays.py, in local numbering (see that module).
#pragma once

#include <cstdint>

#include "block_ops.cuh"

namespace lplb {

struct CompArrays {  // the whole graph, as passed to the kernels
  int n_comp;
  const int *comp_rank_off, *comp_exp_off, *comp_edge_off;
  const int *rank_global, *fix_off, *fix_log, *fix_div;
  const int *exp_log, *exp_ptr;
  const int *edge_rank, *edge_exp, *edge_mult, *edge_global;
  const int *rank_ptr, *rank_edges;
};

struct View {
  int R, M, E;
  const int* rank_global;  // [R]
  const int* fix_off;      // [R+1], values index fix_log / fix_div
  const int* fix_log;
  const int* fix_div;
  const int* exp_log;      // [M]
  const int* exp_ptr;      // [M+1], local edge ids
  const int* edge_rank;    // [E], local rank
  const int* edge_exp;     // [E], local expert
  const int* edge_mult;    // [E]
  const int* edge_global;  // [E]
  const int* rank_ptr;     // [R+1]
  const int* rank_edges;   // [E], local edge ids by rank, then expert

  LPLB_HD static View of(const CompArrays& a, int c) {
    View v;
    const int rb = a.comp_rank_off[c], mb = a.comp_exp_off[c], eb = a.comp_edge_off[c];
    v.R = a.comp_rank_off[c + 1] - rb;
    v.M = a.comp_exp_off[c + 1] - mb;
    v.E = a.comp_edge_off[c + 1] - eb;
    v.rank_global = a.rank_global + rb;
    v.fix_off = a.fix_off + rb;
    v.fix_log = a.fix_log;
    v.fix_div = a.fix_div;
    v.exp_log = a.exp_log + mb;
    v.exp_ptr = a.exp_ptr + mb + c;
    v.edge_rank = a.edge_rank + eb;
    v.edge_exp = a.edge_exp + eb;
    v.edge_mult = a.edge_mult + eb;
    v.edge_global = a.edge_global + eb;
    v.rank_ptr = a.rank_ptr + rb + c;
    v.rank_edges = a.rank_edges + eb;
    return v;
  }

  // Ints needed by stage().
  LPLB_HD static size_t staged_ints(int R, int M, int E) {
    return static_cast<size_t>(R + 1) + (M + 1) + 5 * static_cast<size_t>(E);
  }

  // A copy of the index arrays the solvers walk in every phase (CSR offsets, edge
  // ranks / experts / slots) in buf (shared memory on the device): each phase chases
  // two or three dependent indices per edge, and shared memory answers them faster
  // than L1.  Ends with a barrier.
  LPLB_HD View stage(const blk::Team& t, int* buf) const {
    View s = *this;
    int* p = buf;
    int* rp = p; p += R + 1;
    int* ep = p; p += M + 1;
    int* er = p; p += E;
    int* ex = p; p += E;
    int* em = p; p += E;
    int* re = p; p += E;
    int* eg = p;
    blk::pfor(t, (R + 1) + (M + 1) + 5 * E, [&](int i) {
      if (i <= R) { rp[i] = rank_ptr[i]; return; }
      i -= R + 1;
      if (i <= M) { ep[i] = exp_ptr[i]; return; }
      i -= M + 1;
      const int k = i / (E > 0 ? E : 1), e = i - k * E;
      if (k == 0) er[e] = edge_rank[e];
      else if (k == 1) ex[e] = edge_exp[e];
      else if (k == 2) em[e] = edge_mult[e];
      else if (k == 3) re[e] = rank_edges[e];
      else eg[e] = edge_global[e];
    });
    s.rank_ptr = rp;
    s.exp_ptr = ep;
    s.edge_rank = er;
    s.edge_exp = ex;
    s.edge_mult = em;
    s.rank_edges = re;
    s.edge_global = eg;
    return s;
  }
};

// Where a solve writes its answer (graph numbering).  Per component c: status[c] = 1
// when the split is proven optimal (exact) / converged (ipm), 0 for the fallback;
// bound[c] the proven lower bound (exact) or the objective (ipm); iters[2c], iters[2c+1]
// the rounds / outer iterations and the inner (Newton) iterations.
struct SolveOut {
  double* edge_flow;  // [E_graph]
  double* rank_load;  // [R]
  int* status;        // [C]
  double* bound;      // [C]
  int* iters;         // [2C]
};

// The per-slot split the solve kernels also write (slot_split.cuh): the placement's
// tables in, x and cum out.
struct SlotSplit {
  int n_logical, n_cols;     // L, C
  const int64_t* log2phy;    // [L, C] slots of each logical expert (-1 padded)
  const int64_t* logcnt;     // [L] copies of each
  const int* slot_edge;      // [P] edge of each slot (graph numbering), -1 for experts that cannot move
  const int* edge_mult;      // [E_graph] slots on each edge
  const int* slot_share;     // [P] slots of the same expert on the same rank
  const int* copies;         // [M, 1 + 2 C] per movable expert (exp_log order): copies, then
                             // (slot, local edge) per copy (ComponentArrays.copy_table)
  double* x;                 // [P] out: tokens per slot
  double* cum;               // [L, C] out: cumulative copy shares
  int64_t* total_fallback;   // null, or a running count of components whose status is 0
};

// Scatter one component's flow and loads into the graph-numbered outputs.
LPLB_HD void write_out(const blk::Team& t, const View& v, int c, const double* flow, const double* load,
                       int status, double bound, int it_outer, int it_inner, const SolveOut& out) {
  blk::pfor(t, v.E + v.R + 1, [&](int i) {
    if (i < v.E) {
      out.edge_flow[v.edge_global[i]] = flow[i];
    } else if (i < v.E + v.R) {
      out.rank_load[v.rank_global[i - v.E]] = load[i - v.E];
    } else {
      out.status[c] = status;
      out.bound[c] = bound;
      out.iters[2 * c] = it_outer;
      out.iters[2 * c + 1] = it_inner;
    }
  });
}

// Load of local rank r from the experts that cannot move (fix_off / fix_log /
// fix_div, component_arrays.py): each adds its load over its divisor, in list order;
// only every stride-th entry from first (so that several threads can share a long
// list).  Entries go four at a time, their loads issued together: each is a chain of
// two dependent global loads, and a rank may own dozens.  Most divisors are 1 (one
// copy); those skip the division (same bits).
template <typename T>
LPLB_HD double fixed_load(const View& v, const T* loads, int r, int first = 0, int stride = 1) {
  double s = 0.0;
  const int hi = v.fix_off[r + 1];
  for (int j0 = v.fix_off[r] + first; j0 < hi; j0 += 4 * stride) {
    int li[4], dv[4];
    double xv[4];
LPLB_PRAGMA(unroll)
    for (int q = 0; q < 4; ++q) {
      const bool in = j0 + q * stride < hi;
      li[q] = in ? v.fix_log[j0 + q * stride] : -1;
      dv[q] = in ? v.fix_div[j0 + q * stride] : 1;
    }
LPLB_PRAGMA(unroll)
    for (int q = 0; q < 4; ++q) xv[q] = li[q] >= 0 ? static_cast<double>(loads[li[q]]) : 0.0;
LPLB_PRAGMA(unroll)
    for (int q = 0; q < 4; ++q)
      if (li[q] >= 0) s += dv[q] == 1 ? xv[q] : xv[q] / dv[q];
  }
  return s;
}

}  // namespace lplb
