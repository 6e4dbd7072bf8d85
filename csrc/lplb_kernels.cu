// Count and map kernels; see lplb_kernels.h for the contract.
//
// Determinism: a chunk is one thread block, and each warp of the block one contiguous
// part of the chunk.  An entry's sequence number is the chunk prefix of earlier chunks,
// plus the counts of earlier warps' parts, plus its rank among same-expert entries
// earlier in its own part (32 at a time: __match_any_sync and a popc of the lower
// lanes).  So it is its position among same-expert entries in flattened order, exactly
// as the torch reference's stable sort defines it; no atomic decides an order.
#include "lplb_kernels.h"
#include "pdl.cuh"

namespace lplb {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kScanRegs = 8;  // scan_kernel keeps up to 32 * kScanRegs chunks in registers

__device__ __forceinline__ int64_t load_id(const void* idx, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(idx)[i] : static_cast<int64_t>(static_cast<const int32_t*>(idx)[i]);
}

__device__ __forceinline__ int64_t chunk_begin(int64_t c, int64_t n, int64_t n_chunks) {
  // smallest i with i * n_chunks / n >= c, i.e. ceil(c * n / n_chunks)
  return (c * n + n_chunks - 1) / n_chunks;
}

// One block per chunk: histogram of the chunk into prefix[c, :] (not yet summed) and
// its number of invalid ids into chunk_invalid[c] (summed by scan_kernel: no memset).
__global__ void histogram_kernel(const void* idx, bool is64, int64_t n, int64_t n_logical, int64_t n_chunks,
                                 int32_t* prefix, int32_t* chunk_invalid) {
  extern __shared__ int32_t hist[];
  __shared__ int32_t bad;
  pdl_trigger();  // the scan kernel may start (it waits for this one's end)
  const int64_t c = blockIdx.x;
  for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x) hist[e] = 0;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const int64_t lo = chunk_begin(c, n, n_chunks), hi = chunk_begin(c + 1, n, n_chunks);
  int32_t my_bad = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const int64_t e = load_id(idx, is64, i);
    if (e >= 0 && e < n_logical) atomicAdd(&hist[e], 1);  // integer sums: order-free
    else if (e != -1) ++my_bad;
  }
  if (__any_sync(0xffffffffu, my_bad != 0)) {
    for (int off = 16; off > 0; off >>= 1) my_bad += __shfl_down_sync(0xffffffffu, my_bad, off);
    if ((threadIdx.x & 31) == 0) atomicAdd(&bad, my_bad);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x) prefix[c * n_logical + e] = hist[e];
  if (threadIdx.x == 0) chunk_invalid[c] = bad;
}

// Inclusive scan over chunks: one warp per expert, 32 chunks at a time (a serial loop
// per expert would be latency-bound: ~130 dependent loads).  The warp after the last
// expert's sums the chunks' invalid ids into *invalid (and adds them to *total_invalid
// when given: a running count callers read later without a sync).
__global__ void scan_kernel(int64_t n_logical, int64_t n_chunks, int32_t* prefix, int32_t* counts,
                            const int32_t* chunk_invalid, int32_t* invalid, int64_t* total_invalid) {
  const int64_t e = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  // the next kernel may start: the solve kernels (launch_pdl) stage static arrays and
  // then wait for this one's end; the map kernel waits at once
  pdl_trigger();
  pdl_wait();  // launched with launch_pdl right after histogram_kernel
  if (e > n_logical) return;  // whole warps leave together (e is per warp)
  if (e == n_logical) {
    int32_t s = 0;
    for (int64_t c = lane; c < n_chunks; c += 32) s += chunk_invalid[c];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) {
      *invalid = s;
      if (total_invalid != nullptr) *total_invalid += s;
    }
    return;
  }
  int32_t carry = 0;
  if (n_chunks <= 32 * kScanRegs) {
    // all of the expert's chunks loaded at once: one memory latency, not one per 32
    int32_t v[kScanRegs];
#pragma unroll
    for (int q = 0; q < kScanRegs; ++q) {
      const int64_t c = 32 * q + lane;
      v[q] = c < n_chunks ? prefix[c * n_logical + e] : 0;
    }
#pragma unroll
    for (int q = 0; q < kScanRegs; ++q) {
      if (32 * q >= n_chunks) break;  // (uniform)
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t up = __shfl_up_sync(0xffffffffu, v[q], off);
        if (lane >= off) v[q] += up;
      }
      v[q] += carry;
      const int64_t c = 32 * q + lane;
      if (c < n_chunks) prefix[c * n_logical + e] = v[q];
      carry = __shfl_sync(0xffffffffu, v[q], 31);
    }
    if (lane == 0) counts[e] = carry;
    return;
  }
  for (int64_t base = 0; base < n_chunks; base += 32) {
    const int64_t c = base + lane;
    int32_t v = c < n_chunks ? prefix[c * n_logical + e] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int32_t up = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += up;
    }
    v += carry;
    if (c < n_chunks) prefix[c * n_logical + e] = v;
    carry = __shfl_sync(0xffffffffu, v, 31);
  }
  if (lane == 0) counts[e] = carry;
}

// The map kernel's shared memory: [stage: log2phy int64 [L, C]] hist int32 [kWarps, L],
// bnd int32 [L, C], [stage: counts int32 [L]].
struct MapSmem {
  int64_t* l2p;
  int32_t *hist, *bnd, *cnt;
  __host__ __device__ static size_t layout(MapSmem* m, void* base, int64_t n_logical, int64_t max_copies, bool stage) {
    char* p = static_cast<char*>(base);
    auto take = [&p](size_t bytes) {
      char* q = p;
      p += bytes;
      return q;
    };
    const size_t lc = static_cast<size_t>(n_logical * max_copies);
    int64_t* l2p = stage ? reinterpret_cast<int64_t*>(take(lc * sizeof(int64_t))) : nullptr;
    int32_t* hist = reinterpret_cast<int32_t*>(take(static_cast<size_t>(kWarps * n_logical) * sizeof(int32_t)));
    int32_t* bnd = reinterpret_cast<int32_t*>(take(lc * sizeof(int32_t)));
    int32_t* cnt = stage ? reinterpret_cast<int32_t*>(take(static_cast<size_t>(n_logical) * sizeof(int32_t))) : nullptr;
    if (m != nullptr) *m = MapSmem{l2p, hist, bnd, cnt};
    return static_cast<size_t>(p - static_cast<char*>(base));
  }
};

// One block per chunk, one contiguous part of the chunk per warp (in warp order), so
// that no warp waits for another while it ranks its entries:
//   1. each warp counts its part per expert (hist[w, e]);
//   2. one thread per expert turns the chunk's prefix and those counts into each
//      warp's starting sequence number;
//   3. each warp walks its part again, 32 entries at a time: __match_any_sync groups
//      the lanes of one expert, a popc of the lower lanes ranks them.
// The copy boundaries B[e, k] are computed once per block into shared memory.
// after_solve: steps 1 and 2 read only idx and prefix, which are complete before a
// solve kernel lets this one in (see map_tokens), so they run before pdl_wait() and
// overlap the solve; only the boundaries and step 3 wait for its split.  kStage (with
// after_solve, where shared memory allows): log2phy and counts are copied to shared
// memory before the wait too, leaving cum_frac the only global read between the wait
// and the writes (a compile-time choice, so that their reads are shared-memory ones).
template <bool kStage>
__global__ void __launch_bounds__(kThreads) map_kernel(const void* idx, bool is64, int64_t n, int64_t n_logical,
                                                        int64_t n_chunks, const int32_t* prefix,
                                                        const int32_t* counts, const double* cum_frac,
                                                        const int64_t* log2phy, int64_t max_copies, void* out,
                                                        bool after_solve) {
  extern __shared__ int64_t smem_map[];
  MapSmem m;
  MapSmem::layout(&m, smem_map, n_logical, max_copies, kStage);
  const int64_t c = blockIdx.x;
  for (int64_t q = threadIdx.x; q < kWarps * n_logical; q += blockDim.x) m.hist[q] = 0;
  // without after_solve an ordinary launch (the wait is then a no-op), kept so that
  // the kernel stays correct as a dependent launch either way
  if (!after_solve) pdl_wait();
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lower = (1u << lane) - 1u;
  const int64_t lo = chunk_begin(c, n, n_chunks), hi = chunk_begin(c + 1, n, n_chunks);
  const int64_t wlo = lo + (hi - lo) * warp / kWarps, whi = lo + (hi - lo) * (warp + 1) / kWarps;
  int32_t* mine = m.hist + warp * n_logical;
  for (int64_t base = wlo; base < whi; base += 32) {
    const int64_t i = base + lane;
    const int64_t raw = i < whi ? load_id(idx, is64, i) : -1;
    const bool valid = raw >= 0 && raw < n_logical;
    const unsigned same = __match_any_sync(0xffffffffu, valid ? static_cast<int>(raw) : -1);
    if (valid && (same & lower) == 0) mine[raw] += __popc(same);
    __syncwarp();
  }
  if (kStage) {
    for (int64_t q = threadIdx.x; q < n_logical * max_copies; q += blockDim.x) m.l2p[q] = log2phy[q];
    for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x) m.cnt[e] = counts[e];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x) {
    int32_t run = c == 0 ? 0 : prefix[(c - 1) * n_logical + e];
    for (int w = 0; w < kWarps; ++w) {
      const int32_t t = m.hist[w * n_logical + e];
      m.hist[w * n_logical + e] = run;
      run += t;
    }
  }
  if (after_solve) pdl_wait();
  const int64_t* l2p = kStage ? m.l2p : log2phy;
  for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x) {
    const int64_t cnt = kStage ? m.cnt[e] : counts[e];
    int64_t prev = 0;
    for (int64_t j = 0; j < max_copies; ++j) {
      const int64_t slot = l2p[e * max_copies + j];
      const bool last = j + 1 == max_copies || l2p[e * max_copies + j + 1] < 0 || slot < 0;
      int64_t b = last ? cnt : static_cast<int64_t>(floor(static_cast<double>(cnt) * cum_frac[e * max_copies + j]));
      b = b < 0 ? 0 : (b > cnt ? cnt : b);
      b = b < prev ? prev : b;
      prev = b;
      m.bnd[e * max_copies + j] = static_cast<int32_t>(b);
    }
  }
  __syncthreads();
  for (int64_t base = wlo; base < whi; base += 32) {
    const int64_t i = base + lane;
    const bool in = i < whi;
    const int64_t raw = in ? load_id(idx, is64, i) : -1;
    const bool valid = raw >= 0 && raw < n_logical;
    const unsigned same = __match_any_sync(0xffffffffu, valid ? static_cast<int>(raw) : -1);
    int64_t result = -1;
    if (valid) {
      const int32_t seq = mine[raw] + __popc(same & lower);
      int64_t k = 0;
      for (int64_t j = 0; j < max_copies; ++j) k += m.bnd[raw * max_copies + j] <= seq ? 1 : 0;
      result = l2p[raw * max_copies + (k < max_copies ? k : max_copies - 1)];
    }
    __syncwarp();
    if (valid && (same & lower) == 0) mine[raw] += __popc(same);
    __syncwarp();
    if (in) {
      if (is64) static_cast<int64_t*>(out)[i] = result;
      else static_cast<int32_t*>(out)[i] = static_cast<int32_t>(result);
    }
  }
}

// Dynamic shared memory above 48 KiB needs an opt-in per kernel.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

}  // namespace

cudaError_t count_tokens(const void* idx, bool idx_is_64, int64_t n, int64_t n_logical, int64_t n_chunks,
                         int32_t* prefix, int32_t* counts, int32_t* chunk_invalid, int32_t* invalid,
                         int64_t* total_invalid, cudaStream_t stream) {
  if (n_chunks < 1 || n_logical < 1) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(n_logical) * sizeof(int32_t);
  if (cudaError_t err = allow_smem(histogram_kernel, smem); err != cudaSuccess) return err;
  histogram_kernel<<<static_cast<unsigned>(n_chunks), kThreads, smem, stream>>>(idx, idx_is_64, n, n_logical, n_chunks,
                                                                                prefix, chunk_invalid);
  // one warp per expert, and one more for the invalid ids
  const int64_t warps_per_block = kThreads / 32;
  const unsigned blocks = static_cast<unsigned>((n_logical + 1 + warps_per_block - 1) / warps_per_block);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  return launch_pdl(scan_kernel, blocks, kThreads, 0, stream, n_logical, n_chunks, prefix, counts, chunk_invalid,
                    invalid, total_invalid);
}

cudaError_t map_tokens(const void* idx, bool idx_is_64, int64_t n, int64_t n_logical, int64_t n_chunks,
                       const int32_t* prefix, const int32_t* counts, const double* cum_frac,
                       const int64_t* log2phy, int64_t max_copies, void* out, bool after_solve,
                       cudaStream_t stream) {
  if (n_chunks < 1 || n_logical < 1 || max_copies < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  // staging log2phy and counts is worth a little latency, not an opt-in to large
  // shared memory (fewer blocks per SM)
  const size_t staged = MapSmem::layout(nullptr, nullptr, n_logical, max_copies, true);
  const bool stage = after_solve && staged <= 48 * 1024;
  const size_t smem = stage ? staged : MapSmem::layout(nullptr, nullptr, n_logical, max_copies, false);
  auto kernel = stage ? map_kernel<true> : map_kernel<false>;
  if (cudaError_t err = allow_smem(kernel, smem); err != cudaSuccess) return err;
  // A dependent launch only after a solve (why: lplb_kernels.h; the figures:
  // docs/benchmarks.md, "The map as an ordinary launch after the count").
  return launch_maybe_pdl(after_solve, kernel, static_cast<unsigned>(n_chunks), kThreads, smem, stream, idx,
                          idx_is_64, n, n_logical, n_chunks, prefix, counts, cum_frac, log2phy, max_copies, out,
                          after_solve);
}

}  // namespace lplb
