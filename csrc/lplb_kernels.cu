// Count and map kernels; see lplb_kernels.h for the contract.
//
// Determinism: a chunk is one thread block.  Within a block, entries are taken in
// tiles of blockDim.x consecutive entries; inside a warp, __match_any_sync groups the
// lanes holding the same expert and a popc of the lower lanes ranks them; warps then
// take their turn in order, reading and advancing a shared running count per expert.
// So every entry's sequence number is its position among same-expert entries in
// flattened order, exactly as the torch reference's stable sort defines it.
#include "lplb_kernels.h"

namespace lplb {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int64_t load_id(const void* idx, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(idx)[i] : static_cast<int64_t>(static_cast<const int32_t*>(idx)[i]);
}

__device__ __forceinline__ int64_t chunk_begin(int64_t c, int64_t n, int64_t n_chunks) {
  // smallest i with i * n_chunks / n >= c, i.e. ceil(c * n / n_chunks)
  return (c * n + n_chunks - 1) / n_chunks;
}

// One block per chunk: histogram of the chunk into prefix[c, :] (not yet summed).
__global__ void histogram_kernel(const void* idx, bool is64, int64_t n, int64_t n_logical, int64_t n_chunks,
                                 int32_t* prefix, int32_t* invalid) {
  extern __shared__ int32_t hist[];
  const int64_t c = blockIdx.x;
  for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t lo = chunk_begin(c, n, n_chunks), hi = chunk_begin(c + 1, n, n_chunks);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const int64_t e = load_id(idx, is64, i);
    if (e >= 0 && e < n_logical) atomicAdd(&hist[e], 1);  // integer sums: order-free
    else if (e != -1 && invalid != nullptr) atomicAdd(invalid, 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x) prefix[c * n_logical + e] = hist[e];
}

// Inclusive scan over chunks: one warp per expert, 32 chunks at a time (a serial loop
// per expert would be latency-bound: ~130 dependent loads).
__global__ void scan_kernel(int64_t n_logical, int64_t n_chunks, int32_t* prefix, int32_t* counts) {
  const int64_t e = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (e >= n_logical) return;  // whole warps leave together (e is per warp)
  int32_t carry = 0;
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

__global__ void map_kernel(const void* idx, bool is64, int64_t n, int64_t n_logical, int64_t n_chunks,
                           const int32_t* prefix, const int32_t* counts, const double* cum_frac,
                           const int64_t* log2phy, int64_t max_copies, void* out) {
  extern __shared__ int32_t running[];  // entries of each expert seen so far in this chunk's order
  const int64_t c = blockIdx.x;
  for (int64_t e = threadIdx.x; e < n_logical; e += blockDim.x)
    running[e] = c == 0 ? 0 : prefix[(c - 1) * n_logical + e];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lower = (1u << lane) - 1u;
  const int64_t lo = chunk_begin(c, n, n_chunks), hi = chunk_begin(c + 1, n, n_chunks);
  for (int64_t base = lo; base < hi; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool in = i < hi;
    const int64_t raw = in ? load_id(idx, is64, i) : -1;
    const bool valid = raw >= 0 && raw < n_logical;
    const int key = valid ? static_cast<int>(raw) : -1 - (in ? 0 : 1);  // -1 dropped, -2 padding
    const unsigned same = __match_any_sync(0xffffffffu, key);
    const int rank_in_warp = __popc(same & lower);
    const bool leader = (same & lower) == 0;
    int64_t result = -1;
    for (int w = 0; w < kWarps; ++w) {
      if (w == warp && valid) {
        const int64_t seq = running[raw] + rank_in_warp;
        const int64_t cnt = counts[raw];
        int64_t k = 0, prev = 0;
        for (int64_t j = 0; j < max_copies; ++j) {
          const int64_t slot = log2phy[raw * max_copies + j];
          const bool last = j + 1 == max_copies || log2phy[raw * max_copies + j + 1] < 0 || slot < 0;
          int64_t b = last ? cnt : static_cast<int64_t>(floor(static_cast<double>(cnt) * cum_frac[raw * max_copies + j]));
          b = b < 0 ? 0 : (b > cnt ? cnt : b);
          b = b < prev ? prev : b;
          prev = b;
          k += b <= seq ? 1 : 0;
        }
        result = log2phy[raw * max_copies + (k < max_copies ? k : max_copies - 1)];
      }
      __syncthreads();
      if (w == warp && valid && leader) running[raw] += __popc(same);
      __syncthreads();
    }
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
                         int32_t* prefix, int32_t* counts, int32_t* invalid, cudaStream_t stream) {
  if (n_chunks < 1 || n_logical < 1) return cudaErrorInvalidValue;
  if (invalid != nullptr)
    if (cudaError_t err = cudaMemsetAsync(invalid, 0, sizeof(int32_t), stream); err != cudaSuccess) return err;
  const size_t smem = static_cast<size_t>(n_logical) * sizeof(int32_t);
  if (cudaError_t err = allow_smem(histogram_kernel, smem); err != cudaSuccess) return err;
  histogram_kernel<<<static_cast<unsigned>(n_chunks), kThreads, smem, stream>>>(idx, idx_is_64, n, n_logical, n_chunks, prefix, invalid);
  const int64_t warps_per_block = kThreads / 32;
  const unsigned blocks = static_cast<unsigned>((n_logical + warps_per_block - 1) / warps_per_block);
  scan_kernel<<<blocks, kThreads, 0, stream>>>(n_logical, n_chunks, prefix, counts);
  return cudaGetLastError();
}

cudaError_t map_tokens(const void* idx, bool idx_is_64, int64_t n, int64_t n_logical, int64_t n_chunks,
                       const int32_t* prefix, const int32_t* counts, const double* cum_frac,
                       const int64_t* log2phy, int64_t max_copies, void* out, cudaStream_t stream) {
  if (n_chunks < 1 || n_logical < 1 || max_copies < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(n_logical) * sizeof(int32_t);
  if (cudaError_t err = allow_smem(map_kernel, smem); err != cudaSuccess) return err;
  map_kernel<<<static_cast<unsigned>(n_chunks), kThreads, smem, stream>>>(
      idx, idx_is_64, n, n_logical, n_chunks, prefix, counts, cum_frac, log2phy, max_copies, out);
  return cudaGetLastError();
}

}  // namespace lplb
