// One CUDA warp emulated by 32 host threads, so that warp-synchronous device code
// (solve_pair.cuh) also builds as a CPU program for the tests (CI has no GPU); or a
// block of several such warps with the named barriers team_inverse.cuh uses (its
// helper warps).
//
// Each lane is a std::thread.  __syncwarp and every shuffle meet at a barrier, where
// lane 0 also checks that all lanes came from the same source line: a shuffle or
// __syncwarp that some lanes skip (a divergent branch, a short-circuited call) is a
// deadlock or undefined behaviour on the GPU, and here it aborts with the two lines.
// Values agree with the device up to floating-point contraction.  Only what
// solve_pair.cuh uses is provided.  Define LPLB_WARP_EMULATION and include this
// before solve_pair.cuh.
#pragma once

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

namespace lplb {
namespace emu {

struct Warp {
  std::barrier<> bar{32};
  double slot[32];
  int line[32];
};

inline thread_local int t_lane = 0;
inline thread_local int t_tid = 0;  // thread index in the block
inline thread_local Warp* t_warp = nullptr;
inline thread_local std::barrier<>* t_named[3] = {nullptr, nullptr, nullptr};

struct ThreadIdx {
  int x;
};
inline ThreadIdx thread_idx() { return ThreadIdx{t_tid}; }

// The device's named barriers as team_inverse.cuh uses them: 1 is every thread of the
// block, 2 every thread of warps 1 .. (its helpers).
inline void named_bar(int id) { t_named[id]->arrive_and_wait(); }

// Every lane publishes (value, source line); read(slots) runs on every lane once all
// have published, and its result is returned.
template <typename Read>
inline auto meet_with(double v, int line, Read&& read) {
  Warp& w = *t_warp;
  w.bar.arrive_and_wait();  // the previous meeting's reads are done
  w.slot[t_lane] = v;
  w.line[t_lane] = line;
  w.bar.arrive_and_wait();
  if (t_lane == 0)
    for (int l = 1; l < 32; ++l)
      if (w.line[l] != w.line[0]) {
        std::fprintf(stderr, "warp emulation: lanes diverged: lane 0 at line %d, lane %d at line %d\n", w.line[0], l,
                     w.line[l]);
        std::abort();
      }
  const auto r = read(static_cast<const double*>(w.slot));
  w.bar.arrive_and_wait();
  return r;
}

// The slot of lane src.
inline double meet(double v, int src, int line) {
  return meet_with(v, line, [&](const double* slot) { return slot[src & 31]; });
}

// Bit l set where lane l's predicate is non-zero.
inline unsigned ballot(int pred, int line) {
  return meet_with(pred ? 1.0 : 0.0, line, [](const double* slot) {
    unsigned m = 0;
    for (int l = 0; l < 32; ++l)
      if (slot[l] != 0.0) m |= 1u << l;
    return m;
  });
}

// Bit l set where lane l passed the same value as this lane.
inline unsigned match_any(unsigned v, int line) {
  return meet_with(static_cast<double>(v), line, [](const double* slot) {
    unsigned m = 0;
    for (int l = 0; l < 32; ++l)
      if (slot[l] == slot[t_lane]) m |= 1u << l;
    return m;
  });
}

// The bitwise or of every lane's v.
inline unsigned reduce_or(unsigned v, int line) {
  return meet_with(static_cast<double>(v), line, [](const double* slot) {
    unsigned m = 0;
    for (int l = 0; l < 32; ++l) m |= static_cast<unsigned>(slot[l]);
    return m;
  });
}

// f() on every thread of a block of n_warps warps, in parallel; returns when all have
// returned.
inline void run_block(int n_warps, const std::function<void()>& f) {
  std::vector<Warp> warps(n_warps);
  std::barrier<> block(32 * n_warps), helpers(n_warps > 1 ? 32 * (n_warps - 1) : 1);
  std::vector<std::thread> threads;
  threads.reserve(32 * n_warps);
  for (int t = 0; t < 32 * n_warps; ++t)
    threads.emplace_back([&, t] {
      t_lane = t & 31;
      t_tid = t;
      t_warp = &warps[t >> 5];
      t_named[1] = &block;
      t_named[2] = &helpers;
      f();
    });
  for (auto& t : threads) t.join();
}

// f() on 32 lanes of one warp, in parallel; returns when all have returned.
inline void run_warp(const std::function<void()>& f) { run_block(1, f); }

}  // namespace emu
}  // namespace lplb

#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define threadIdx (::lplb::emu::thread_idx())
inline void __syncwarp(int line = __builtin_LINE()) { ::lplb::emu::meet(0.0, 0, line); }
inline double __shfl_sync(unsigned, double v, int src, int line = __builtin_LINE()) {
  return ::lplb::emu::meet(v, src, line);
}
inline double __shfl_xor_sync(unsigned, double v, int mask, int line = __builtin_LINE()) {
  return ::lplb::emu::meet(v, ::lplb::emu::t_lane ^ mask, line);
}
// block_ops.cuh's shuffles, with the caller's line
namespace lplb {
template <typename T>
inline T shfl(T v, int src, int line = __builtin_LINE()) {
  return static_cast<T>(__shfl_sync(0xffffffffu, static_cast<double>(v), src, line));
}
template <typename T>
inline T shfl_xor(T v, int mask, int line = __builtin_LINE()) {
  return static_cast<T>(__shfl_xor_sync(0xffffffffu, static_cast<double>(v), mask, line));
}
}  // namespace lplb
inline unsigned __ballot_sync(unsigned, int pred, int line = __builtin_LINE()) {
  return ::lplb::emu::ballot(pred, line);
}
inline unsigned __match_any_sync(unsigned, unsigned v, int line = __builtin_LINE()) {
  return ::lplb::emu::match_any(v, line);
}
inline unsigned __reduce_or_sync(unsigned, unsigned v, int line = __builtin_LINE()) {
  return ::lplb::emu::reduce_or(v, line);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
