// Solve kernels: one thread block per connected component of the replica graph
// (solve_exact.cuh, solve_ipm.cuh; one warp for small components: solve_pair.cuh and
// solve_ipm_pair.cuh when two-copy, solve_exact_warp.cuh and solve_ipm_warp.cuh
// otherwise, the one-warp IPMs with four helper warps for their Newton systems beyond
// 16 ranks: team_inverse.cuh).  The same kernels then turn the edge flow into the
// per-slot split and the cumulative copy shares the map kernel reads (slot_split.cuh:
// each component's block for its movable experts, blocks past the components for the
// experts that cannot move).  No host sync.
#include <cuda_runtime.h>

#include <atomic>
#include <utility>

#include "lplb_solve.h"
#include "pdl.cuh"
#include "solve_exact.cuh"
#include "solve_exact_warp.cuh"
#include "solve_ipm.cuh"
#include "solve_ipm_pair.cuh"
#include "solve_ipm_warp.cuh"
#include "solve_pair.cuh"
#include "slot_split.cuh"
#include "team_inverse.cuh"

namespace lplb {
namespace {

constexpr int kSolveThreads = 256;
// The IPM's blocks: its passes are short dependent chains, so fewer warps mean cheaper
// barriers and reductions (128 measured faster than 256 on H100; at most 256 for
// kRedDoubles).
constexpr int kIpmThreads = 128;
constexpr int kRedDoubles = 80;  // reduction scratch: 2 x 32 warps + block_ops scalars (64..67)
constexpr size_t kSmemLimit = 200 * 1024;

// A block's scratch: shared memory after the reduction head.
__device__ __forceinline__ char* scratch(double* smem) { return reinterpret_cast<char*>(smem + kRedDoubles); }

// The start of every solve kernel: this block's component, with its index arrays copied
// into shared memory work_bytes into the scratch when stage (the kernels that walk them
// in every phase).  Then it waits for the kernel before it (launch_solve launches with
// PDL, so that this prologue's static reads overlap that kernel: the loads and the
// outputs only from here on), and lets the next kernel in (Planner.run's map kernel),
// in that order: the map reads the count stage's output before its own wait
// (map_tokens' after_solve), which is complete only once this wait has returned.
__device__ __forceinline__ View begin_solve(const blk::Team& team, const CompArrays& a, double* smem, bool stage,
                                            size_t work_bytes) {
  const View g = View::of(a, static_cast<int>(blockIdx.x));
  const View v = stage ? g.stage(team, reinterpret_cast<int*>(scratch(smem) + work_bytes)) : g;
  pdl_wait();
  pdl_trigger();
  return v;
}

// Where a general kernel's scratch lives (a compile-time choice, so that shared-memory
// accesses compile to shared-memory instructions rather than generic ones).
enum Where : int {
  kAllShared = 0,    // everything in shared memory
  kSchurGlobal = 1,  // the R x R matrix in global memory (`stride` doubles per block), the rest shared
  kAllGlobal = 2,    // everything in global memory (`stride` doubles per block): a component too
                     // large for one block's shared memory; only the reduction head stays there
};

// This block's scratch in global memory (kSchurGlobal: its matrix; kAllGlobal: all of it).
__device__ __forceinline__ double* global_part(double* global, size_t stride) {
  return global + static_cast<size_t>(blockIdx.x) * stride;
}

// The component's index arrays are staged in shared memory after the scratch (except
// kAllGlobal, which reads them where they are).
template <typename T, int kWhere>
__global__ void __launch_bounds__(kSolveThreads) exact_kernel(CompArrays a, const T* loads, double lipschitz,
                                                               int max_rounds, SolveOut out, SlotSplit s,
                                                               double* global, size_t stride, size_t work_bytes) {
  if (blockIdx.x >= a.n_comp) return slots::fixed_split(s, loads, a.n_comp);
  extern __shared__ double smem[];
  const int c = blockIdx.x;
  blk::Team team{smem};
  const View v = begin_solve(team, a, smem, kWhere != kAllGlobal, work_bytes);
  exact::Work w;
  char* base = kWhere == kAllGlobal ? reinterpret_cast<char*>(global_part(global, stride)) : scratch(smem);
  exact::Work::layout(&w, base, v.R, v.M, v.E, kWhere != kSchurGlobal);
  if (kWhere == kSchurGlobal) w.schur = global_part(global, stride);
  const exact::Result r = exact::solve(team, v, loads, w, lipschitz, max_rounds);
  write_out(team, v, c, w.flow, w.load, r.certified, r.bound, r.rounds, r.newton_iters, out);
  slots::component_split(a, c, v, r.certified, s, w.flow);
}

// One warp per component, every component small and two-copy (solve_pair.cuh); J
// experts per lane; kSubsets: pair::solve's.  The same shared-memory layout as
// exact_kernel<T, true> (the launcher sizes both alike).
template <int J, bool kSubsets, typename T>
__global__ void __launch_bounds__(32, 1) pair_kernel(CompArrays a, const T* loads, double lipschitz, int max_rounds,
                                                  SolveOut out, SlotSplit s, size_t work_bytes) {
  if (blockIdx.x >= a.n_comp) return slots::fixed_split(s, loads, a.n_comp);
  extern __shared__ double smem[];
  const int c = blockIdx.x;
  blk::Team team{smem};
  const View v = begin_solve(team, a, smem, true, work_bytes);
  exact::Work w;
  exact::Work::layout(&w, scratch(smem), v.R, v.M, v.E, true);
#if defined(__CUDA_ARCH__)  // (pair::solve is device code only)
  const exact::Result r = pair::solve<J, kSubsets>(v, loads, w, lipschitz, max_rounds);
  write_out(team, v, c, w.flow, w.load, r.certified, r.bound, r.rounds, r.newton_iters, out);
  slots::component_split(a, c, v, r.certified, s, w.flow);
#endif
}

// The exact method in one warp per component, every component small (any number of
// copies per expert; solve_exact_warp.cuh).  The index arrays are staged in shared
// memory after the scratch (work_bytes of it), as ipm_warp_kernel stages them.
// kSubsets: exact_warp::solve's.
template <bool kSubsets, typename T>
__global__ void __launch_bounds__(32, 1) exact_warp_kernel(CompArrays a, const T* loads, double lipschitz,
                                                        int max_rounds, SolveOut out, SlotSplit s,
                                                        size_t work_bytes) {
  if (blockIdx.x >= a.n_comp) return slots::fixed_split(s, loads, a.n_comp);
  extern __shared__ double smem[];
  const int c = blockIdx.x;
  blk::Team team{smem};
  const View v = begin_solve(team, a, smem, true, work_bytes);
  exact_warp::Smem sm;
  exact_warp::Smem::layout(&sm, scratch(smem), v.R, v.M, v.E);
#if defined(__CUDA_ARCH__)  // (exact_warp::solve is device code only)
  const exact::Result r = exact_warp::solve<kSubsets>(v, loads, sm, lipschitz, max_rounds);
  write_out(team, v, c, sm.flow, sm.load, r.certified, r.bound, r.rounds, r.newton_iters, out);
  slots::component_split(a, c, v, r.certified, s, sm.flow);
#endif
}

// kWhere: as exact_kernel's.
template <typename T, int kWhere>
__global__ void __launch_bounds__(kIpmThreads, 1) ipm_kernel(CompArrays a, const T* loads, int max_iters, double tol,
                                                             SolveOut out, SlotSplit s, double* global,
                                                             size_t stride) {
  if (blockIdx.x >= a.n_comp) return slots::fixed_split(s, loads, a.n_comp);
  extern __shared__ double smem[];
  const int c = blockIdx.x;
  blk::Team team{smem};
  const View v = begin_solve(team, a, smem, false, 0);
  ipm::Work w;
  char* base = kWhere == kAllGlobal ? reinterpret_cast<char*>(global_part(global, stride)) : scratch(smem);
  ipm::Work::layout(&w, base, v.R, v.M, v.E, kWhere != kSchurGlobal);
  if (kWhere == kSchurGlobal) w.schur = global_part(global, stride);
  const ipm::Result r = ipm::solve(team, v, loads, w, max_iters, tol);
  write_out(team, v, c, w.flow, w.load, r.converged, r.objective, r.iterations, 0, out);
  slots::component_split(a, c, v, r.converged, s, w.flow);
}

// The one-warp IPM kernels' body after the setup: the solver run by warp 0 (solve()
// -> ipm::Result) while, for the instances with helper warps (ipm_pair::kUsesTeam:
// kTeam), the others serve its Newton matrix (team_inverse.cuh); then the answer to
// out and the component's rows of the slot split (s), written by the whole block.
#if defined(__CUDA_ARCH__)  // (the one-warp solvers are device code only)
template <bool kTeam, typename Sm, typename Solve>
__device__ __forceinline__ void run_ipm_warp(const blk::Team& team, const CompArrays& a, const View& v, const Sm& sm,
                                             int c, const SolveOut& out, const SlotSplit& s, Solve&& solve) {
  if constexpr (kTeam) {
    __shared__ double res[3];  // warp 0's ipm::Result for the whole block
    team_inverse::clear(sm.schur, v.R, v.R + 1);
    __syncthreads();
    if (threadIdx.x < 32) {
      const ipm::Result r = solve();
      team_inverse::dismiss(sm.team);
      if (threadIdx.x == 0) {
        res[0] = r.converged;
        res[1] = r.objective;
        res[2] = r.iterations;
      }
    } else {
      team_inverse::serve(sm.schur, v.R, v.R + 1, sm.team);
    }
    __syncthreads();
    write_out(team, v, c, sm.flow, sm.load, static_cast<int>(res[0]), res[1], static_cast<int>(res[2]), 0, out);
    slots::component_split(a, c, v, static_cast<int>(res[0]), s, sm.flow);
  } else {
    const ipm::Result r = solve();
    write_out(team, v, c, sm.flow, sm.load, r.converged, r.objective, r.iterations, 0, out);
    slots::component_split(a, c, v, r.converged, s, sm.flow);
  }
}
#endif

// Threads of a one-warp IPM block for at most NR ranks: one warp, or with helpers.
template <int NR>
constexpr int kIpmWarpThreads = ipm_pair::kUsesTeam<NR> ? team_inverse::kThreads : 32;

// The threads of the one-warp IPM instance launch() picks for components of at most
// max_ranks ranks (NR = 8, 16 or 32): more than 32 when it runs with helper warps.
int ipm_warp_threads(int max_ranks) {
  return max_ranks <= 8 ? kIpmWarpThreads<8> : max_ranks <= 16 ? kIpmWarpThreads<16> : kIpmWarpThreads<32>;
}

// The IPM in one warp per component, every component small and two-copy
// (solve_ipm_pair.cuh); J experts per lane, at most NR ranks.
template <int J, int NR, typename T>
__global__ void __launch_bounds__(kIpmWarpThreads<NR>, 1)
    ipm_pair_kernel(CompArrays a, const T* loads, int max_iters, double tol, SolveOut out, SlotSplit s) {
  if (blockIdx.x >= a.n_comp) return slots::fixed_split(s, loads, a.n_comp);
  extern __shared__ double smem[];
  const int c = blockIdx.x;
  blk::Team team{smem};
  const View v = begin_solve(team, a, smem, false, 0);
  ipm_pair::Smem sm;
  ipm_pair::Smem::layout(&sm, scratch(smem), v.R, v.E, ipm_pair::kUsesTeam<NR>);
#if defined(__CUDA_ARCH__)  // (ipm_pair::solve is device code only)
  run_ipm_warp<ipm_pair::kUsesTeam<NR>>(team, a, v, sm, c, out, s,
                                          [&] { return ipm_pair::solve<J, NR>(v, loads, sm, max_iters, tol); });
#endif
}

// The IPM in one warp per component, every component small (any number of copies per
// expert; solve_ipm_warp.cuh), at most NR ranks.  The index arrays are staged in
// shared memory after the scratch (work_bytes of it).
template <int NR, typename T>
__global__ void __launch_bounds__(kIpmWarpThreads<NR>, 1)
    ipm_warp_kernel(CompArrays a, const T* loads, int max_iters, double tol, SolveOut out, SlotSplit s,
                    size_t work_bytes) {
  if (blockIdx.x >= a.n_comp) return slots::fixed_split(s, loads, a.n_comp);
  extern __shared__ double smem[];
  const int c = blockIdx.x;
  blk::Team team{smem};
  const View v = begin_solve(team, a, smem, true, work_bytes);
  ipm_warp::Smem sm;
  ipm_warp::Smem::layout(&sm, scratch(smem), v.R, v.E, ipm_pair::kUsesTeam<NR>);
#if defined(__CUDA_ARCH__)  // (ipm_warp::solve is device code only)
  run_ipm_warp<ipm_pair::kUsesTeam<NR>>(team, a, v, sm, c, out, s,
                                          [&] { return ipm_warp::solve<NR>(v, loads, sm, max_iters, tol); });
#endif
}

// Whether components of these sizes fit exact_warp::solve's limits.
bool fits_exact_warp(const SolveSizes& sz) {
  return sz.max_ranks <= exact_warp::kMaxRanks && sz.max_experts <= exact_warp::kMaxExperts &&
         sz.max_edges <= exact_warp::kMaxEdges;
}

// One block's scratch in bytes (after the reduction head) for `method`.  (For exact it
// also bounds exact_warp::Smem wherever that kernel runs, which is only where
// exact::Work keeps its Newton matrix in shared memory too: array for array, Work
// holds at least as much per rank, expert and edge.)
size_t work_bytes(int method, const SolveSizes& sz, bool schur_inside) {
  return method == 1 ? ipm::Work::layout(nullptr, nullptr, sz.max_ranks, sz.max_experts, sz.max_edges, schur_inside)
                     : exact::Work::layout(nullptr, nullptr, sz.max_ranks, sz.max_experts, sz.max_edges, schur_inside);
}

// The index arrays a kernel stages in shared memory after its scratch, in bytes.
size_t staged_bytes(const SolveSizes& sz) {
  return ((View::staged_ints(sz.max_ranks, sz.max_experts, sz.max_edges) * sizeof(int) + 7) / 8) * 8;
}

// One block's dynamic shared memory on the current device: what it grants on opt-in
// (227 KiB on H100 / H200, 163 KiB on A100), at most kSmemLimit.  Asked once per
// device (every solve launch needs it); a device that does not answer is taken at the
// 48 KiB every block gets.
size_t smem_limit() {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices] = {};  // optin + 1, 0 = not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 48 * 1024;
  }
  int optin = dev < kDevices ? known[dev].load(std::memory_order_relaxed) - 1 : -1;
  if (optin < 0) {
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return 48 * 1024;
    }
    if (dev < kDevices) known[dev].store(optin + 1, std::memory_order_relaxed);
  }
  return static_cast<size_t>(optin) < kSmemLimit ? static_cast<size_t>(optin) : kSmemLimit;
}

// Where `method`'s general kernel keeps a block's scratch for components of these
// sizes, and how many doubles of global memory it needs per block (0 for kAllShared).
struct Scratch {
  Where where;
  size_t stride;
};
Scratch plan_scratch(int method, const SolveSizes& sz) {
  const size_t limit = smem_limit();
  const size_t head = kRedDoubles * sizeof(double);
  const size_t staged = method == 0 ? staged_bytes(sz) : 0;  // (the IPM kernel reads them in place)
  if (head + work_bytes(method, sz, true) + staged <= limit) return {kAllShared, 0};
  if (head + work_bytes(method, sz, false) + staged <= limit)
    return {kSchurGlobal, static_cast<size_t>(sz.max_ranks) * sz.max_ranks};
  return {kAllGlobal, (work_bytes(method, sz, true) + 7) / 8};
}

// Lets kernel take smem bytes of dynamic shared memory (above the default 48 KiB).  A
// refusal is returned and also cleared from the runtime's last error, which the
// runtime sets as well: left there, the next solve's launch check (cudaGetLastError)
// would report it against a launch that succeeded.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

// allow_smem, then kernel<<<blocks, threads, bytes, stream>>>(args...) as a
// programmatic dependent launch: the solve kernel may start while the kernel before
// it (the counts' scan in Planner.run) still runs, staging its static index arrays
// meanwhile; it reads the loads only after pdl_wait().  A launch error is also
// cleared from the runtime's last error (see allow_smem).
template <typename... Params, typename... Args>
cudaError_t launch_solve(void (*kernel)(Params...), int blocks, int threads, size_t bytes, cudaStream_t stream,
                         Args&&... args) {
  if (cudaError_t err = allow_smem(kernel, bytes); err != cudaSuccess) return err;
  const cudaError_t err = launch_pdl(kernel, blocks, threads, bytes, stream, std::forward<Args>(args)...);
  const cudaError_t last = cudaGetLastError();
  return err != cudaSuccess ? err : last;
}

template <typename T>
cudaError_t launch(const CompArrays& a, const SolveSizes& sz, const T* loads, int method, double lipschitz,
                   int max_rounds, const SolveOut& out, const SlotSplit& s, double* global, int ipm_max_iters,
                   double ipm_tol, cudaStream_t stream) {
  if (method != 0 && method != 1) return cudaErrorInvalidValue;
  if (a.n_comp == 0 && s.n_logical == 0) return cudaSuccess;
  // a block per component, then blocks for the slot split of the experts that cannot move
  auto grid = [&](int threads) { return a.n_comp + slots::fixed_blocks(s, threads); };
  const size_t head = kRedDoubles * sizeof(double);
  const Scratch plan = plan_scratch(method, sz);
  if (plan.where != kAllShared && global == nullptr) return cudaErrorInvalidValue;
  const bool inside = plan.where == kAllShared;
  const size_t staged = staged_bytes(sz);
  const bool small_pairs = inside && sz.one_warp && sz.two_copy && sz.max_ranks <= pair::kMaxRanks &&
                           sz.max_experts <= pair::kMaxExperts;
  const bool small_any = inside && sz.one_warp && sz.max_ranks <= ipm_warp::kMaxRanks &&
                         sz.max_experts <= ipm_warp::kMaxExperts && sz.max_edges <= ipm_warp::kMaxEdges;
  const bool small_any_exact = inside && sz.one_warp && fits_exact_warp(sz);
  if (method == 1 && small_pairs) {
    const int threads = ipm_warp_threads(sz.max_ranks);
    const size_t bytes = head + ipm_pair::Smem::layout(nullptr, nullptr, sz.max_ranks, sz.max_edges, threads > 32);
    const bool j1 = sz.max_experts <= 32;
    auto kernel = sz.max_ranks <= 8    ? (j1 ? ipm_pair_kernel<1, 8, T> : ipm_pair_kernel<2, 8, T>)
                  : sz.max_ranks <= 16 ? (j1 ? ipm_pair_kernel<1, 16, T> : ipm_pair_kernel<2, 16, T>)
                                       : (j1 ? ipm_pair_kernel<1, 32, T> : ipm_pair_kernel<2, 32, T>);
    return launch_solve(kernel, grid(threads), threads, bytes, stream, a, loads, ipm_max_iters, ipm_tol, out, s);
  } else if (method == 1 && small_any) {
    const int threads = ipm_warp_threads(sz.max_ranks);
    const size_t work = ipm_warp::Smem::layout(nullptr, nullptr, sz.max_ranks, sz.max_edges, threads > 32);
    const size_t bytes = head + work + staged;
    auto kernel = sz.max_ranks <= 8    ? ipm_warp_kernel<8, T>
                  : sz.max_ranks <= 16 ? ipm_warp_kernel<16, T>
                                       : ipm_warp_kernel<32, T>;
    return launch_solve(kernel, grid(threads), threads, bytes, stream, a, loads, ipm_max_iters, ipm_tol, out, s,
                        work);
  } else if (method == 1) {
    const size_t bytes = head + (plan.where == kAllGlobal ? 0 : work_bytes(1, sz, inside));
    auto kernel = plan.where == kAllShared    ? ipm_kernel<T, kAllShared>
                  : plan.where == kSchurGlobal ? ipm_kernel<T, kSchurGlobal>
                                               : ipm_kernel<T, kAllGlobal>;
    return launch_solve(kernel, grid(kIpmThreads), kIpmThreads, bytes, stream, a, loads, ipm_max_iters, ipm_tol,
                        out, s, global, plan.stride);
  } else {
    // the exact kernels' shared memory: scratch, then the staged index arrays
    const size_t work = plan.where == kAllGlobal ? 0 : work_bytes(0, sz, inside);
    const size_t bytes = head + (plan.where == kAllGlobal ? 0 : work + staged);
    // small components: the enumerated bound; larger ones take the kernels without it,
    // which do not carry its code
    const bool subsets = pair::takes_subsets(sz.max_ranks, sz.max_experts);
    if (small_pairs) {
      auto kernel = subsets ? pair_kernel<1, true, T>
                            : (sz.max_experts <= 32 ? pair_kernel<1, false, T> : pair_kernel<2, false, T>);
      return launch_solve(kernel, grid(32), 32, bytes, stream, a, loads, lipschitz, max_rounds, out, s, work);
    } else if (small_any_exact) {  // (two-copy placements keep pair_kernel above)
      const size_t warp_work = exact_warp::Smem::layout(nullptr, nullptr, sz.max_ranks, sz.max_experts, sz.max_edges);
      const size_t warp_bytes = head + warp_work + staged;
      auto kernel = subsets ? exact_warp_kernel<true, T> : exact_warp_kernel<false, T>;
      return launch_solve(kernel, grid(32), 32, warp_bytes, stream, a, loads, lipschitz, max_rounds, out, s,
                          warp_work);
    } else {
      // one warp per 32 of the largest component's edges / experts + ranks (at least
      // one, at most 8): small components get cheap barriers, large ones enough lanes
      const int width = sz.max_edges > sz.max_experts + sz.max_ranks ? sz.max_edges : sz.max_experts + sz.max_ranks;
      int threads = ((width + 31) / 32) * 32;
      threads = threads < 32 ? 32 : (threads > kSolveThreads ? kSolveThreads : threads);
      auto kernel = plan.where == kAllShared    ? exact_kernel<T, kAllShared>
                    : plan.where == kSchurGlobal ? exact_kernel<T, kSchurGlobal>
                                                 : exact_kernel<T, kAllGlobal>;
      return launch_solve(kernel, grid(threads), threads, bytes, stream, a, loads, lipschitz, max_rounds, out, s,
                          global, plan.stride, work);
    }
  }
}

}  // namespace

size_t solve_global_doubles(const SolveSizes& sz, int method) { return plan_scratch(method, sz).stride; }

cudaError_t solve_split(const CompArrays& a, const SolveSizes& sz, const void* loads, bool loads_int32, int method,
                        double lipschitz, int max_rounds, const SolveOut& out, const SlotSplit& slots,
                        double* global, int ipm_max_iters, double ipm_tol, cudaStream_t stream) {
  return loads_int32 ? launch(a, sz, static_cast<const int32_t*>(loads), method, lipschitz, max_rounds, out, slots,
                              global, ipm_max_iters, ipm_tol, stream)
                     : launch(a, sz, static_cast<const double*>(loads), method, lipschitz, max_rounds, out, slots,
                              global, ipm_max_iters, ipm_tol, stream);
}

}  // namespace lplb
