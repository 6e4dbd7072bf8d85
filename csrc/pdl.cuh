// Programmatic dependent launch (Hopper): a kernel launched with launch_pdl() may be
// scheduled while the previous kernel in the stream still runs, and waits for it with
// pdl_wait() before it reads that kernel's output.  The previous kernel lets it in
// early with pdl_trigger(); one that never calls it lets it in when it ends.
//
// Why: the Planner's stages are a chain of short kernels (histogram -> scan -> solve,
// which also writes the per-slot split -> map) where each waits on its predecessor's
// output, so a launch's latency and a kernel's ramp-up would otherwise add up on the
// critical path.
//
// The rule that keeps it correct: before pdl_wait(), a kernel launched this way reads
// nothing that a kernel launched just before it may write, and writes nothing any
// earlier kernel still reads.  Every thread calls pdl_wait() (also the ones that exit
// early), so the kernel ends after its predecessor.  What kernels further back wrote
// may be read before pdl_wait() only where the kernel just before lets it in after its
// own pdl_wait() (or at its end): the solve kernels do, and the map kernel relies on
// it in Planner.run (map_tokens' after_solve).  On devices before sm_90 the launch is
// an ordinary one and both device calls compile to nothing.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace lplb {

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether the current device supports programmatic dependent launch (sm_90+).
inline bool pdl_supported() {
  static int cached[64] = {0};  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cached[dev] = major >= 9 ? 2 : 1;
  }
  return cached[dev] == 2;
}

// kernel<<<grid, block, smem, stream>>>(args...), programmatically dependent on the
// previous kernel of the stream when `dependent` and the device supports it (an
// ordinary launch otherwise).
template <typename... Params, typename... Args>
cudaError_t launch_maybe_pdl(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = dependent && pdl_supported() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// launch_maybe_pdl, dependent.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  return launch_maybe_pdl(true, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace lplb
