// CUDA kernels of the Planner's count and map stages (torch-free C++ API).
//
// They follow the torch reference exactly (lplb_plugin/counting.py and
// lplb_plugin/redirect.py): the same chunking, the same sequence numbers, the same
// float64 boundaries, so their outputs are bit-identical to it.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lplb {

// Per-chunk histograms of idx (entry i of n belongs to chunk i * n_chunks / n; ids
// outside [0, n_logical), e.g. -1, are skipped), turned into inclusive prefix sums over
// chunks: prefix[c * n_logical + e] = entries of e in chunks 0..c.  counts = prefix of
// the last chunk.  idx is int32 (idx_is_64 = false) or int64.  *invalid = number of
// entries that are neither -1 nor in [0, n_logical) (so callers can validate ids
// without a host sync); chunk_invalid [n_chunks] is scratch for it.  If total_invalid
// is not null, the same number is added to it (a running count).  Two kernels, no
// memset, no host sync.
cudaError_t count_tokens(const void* idx, bool idx_is_64, int64_t n, int64_t n_logical,
                         int64_t n_chunks, int32_t* prefix, int32_t* counts, int32_t* chunk_invalid,
                         int32_t* invalid, int64_t* total_invalid, cudaStream_t stream);

// Logical -> physical rewrite.  For entry i with e = idx[i] in [0, n_logical):
//   seq  = entries of e before i (flattened order), from the chunk prefix sums;
//   B[k] = floor(counts[e] * cum_frac[e, k]) (float64), B[k] = counts[e] from the last
//          real copy on, then clamped to [0, counts[e]] and made non-decreasing;
//   out  = log2phy[e, #{k : B[k] <= seq}].
// Other entries become -1.  out has idx's dtype.  Deterministic (no atomics decide
// which token moves).  No host sync.
//
// after_solve = true is a promise that the kernel launched just before it on this
// stream is solve_split's: those let their dependents in only after their own inputs
// are complete, so idx, prefix and counts are then complete too, and the kernel, a
// programmatic dependent launch (pdl.cuh), counts its chunk while the solve still runs
// (also copying log2phy and counts to shared memory where 48 KiB allow), waiting only
// before it reads cum_frac.  With false it is an ordinary launch (any kernel may
// precede it): it then waits before reading anything, so an early launch gains
// nothing, and behind count_tokens (whose scan lets its dependents in at its start)
// its blocks sat waiting through the histogram and the scan: count + map took 21 us
// instead of 12.7 at 131072 entries (H200; why waiting blocks cost that much is not
// established).
cudaError_t map_tokens(const void* idx, bool idx_is_64, int64_t n, int64_t n_logical,
                       int64_t n_chunks, const int32_t* prefix, const int32_t* counts,
                       const double* cum_frac, const int64_t* log2phy, int64_t max_copies,
                       void* out, bool after_solve, cudaStream_t stream);

}  // namespace lplb
