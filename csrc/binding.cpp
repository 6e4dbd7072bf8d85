// pybind11 binding of the count and map kernels as lplb_plugin._C.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "lplb_kernels.h"

namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lplb_plugin._C.", what, ": ", cudaGetErrorString(err));
}

void check_idx(const torch::Tensor& idx) {
  TORCH_CHECK(idx.is_cuda(), "idx must be a CUDA tensor");
  TORCH_CHECK(idx.scalar_type() == torch::kInt32 || idx.scalar_type() == torch::kInt64,
              "idx must be int32 or int64, got ", idx.scalar_type());
}

// (counts int32 [L], prefix int32 [n_chunks, L])
std::tuple<torch::Tensor, torch::Tensor> count(torch::Tensor idx, int64_t n_logical, int64_t n_chunks) {
  check_idx(idx);
  TORCH_CHECK(n_logical >= 1 && n_chunks >= 1, "n_logical and n_chunks must be >= 1");
  auto flat = idx.contiguous().view(-1);
  auto opts = idx.options().dtype(torch::kInt32);
  auto prefix = torch::empty({n_chunks, n_logical}, opts);
  auto counts = torch::empty({n_logical}, opts);
  const c10::cuda::CUDAGuard guard(idx.device());
  check(lplb::count_tokens(flat.data_ptr(), idx.scalar_type() == torch::kInt64, flat.numel(), n_logical, n_chunks,
                           prefix.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                           c10::cuda::getCurrentCUDAStream()),
        "count");
  return {counts, prefix};
}

// physical ids, idx's shape and dtype
torch::Tensor map(torch::Tensor idx, torch::Tensor prefix, torch::Tensor counts, torch::Tensor cum_frac,
                  torch::Tensor log2phy) {
  check_idx(idx);
  TORCH_CHECK(prefix.is_cuda() && prefix.scalar_type() == torch::kInt32 && prefix.dim() == 2,
              "prefix must be a CUDA int32 [n_chunks, L] tensor");
  const int64_t n_chunks = prefix.size(0), n_logical = prefix.size(1);
  TORCH_CHECK(counts.is_cuda() && counts.scalar_type() == torch::kInt32 && counts.numel() == n_logical,
              "counts must be a CUDA int32 [L] tensor");
  TORCH_CHECK(cum_frac.is_cuda() && cum_frac.scalar_type() == torch::kFloat64 && cum_frac.dim() == 2 &&
                  cum_frac.size(0) == n_logical,
              "cum_frac must be a CUDA float64 [L, C] tensor");
  TORCH_CHECK(log2phy.is_cuda() && log2phy.scalar_type() == torch::kInt64 && log2phy.sizes() == cum_frac.sizes(),
              "log2phy must be a CUDA int64 tensor shaped like cum_frac");
  auto flat = idx.contiguous().view(-1);
  auto out = torch::empty_like(flat);
  auto cf = cum_frac.contiguous();
  auto l2p = log2phy.contiguous();
  const c10::cuda::CUDAGuard guard(idx.device());
  check(lplb::map_tokens(flat.data_ptr(), idx.scalar_type() == torch::kInt64, flat.numel(), n_logical, n_chunks,
                         prefix.contiguous().data_ptr<int32_t>(), counts.contiguous().data_ptr<int32_t>(),
                         cf.data_ptr<double>(), l2p.data_ptr<int64_t>(), cf.size(1), out.data_ptr(),
                         c10::cuda::getCurrentCUDAStream()),
        "map");
  return out.view(idx.sizes());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lplb_plugin CUDA kernels: count and map stages of the Planner";
  m.def("count", &count, "per-expert counts and per-chunk inclusive prefix sums", py::arg("idx"),
        py::arg("n_logical"), py::arg("n_chunks"));
  m.def("map", &map, "logical -> physical rewrite from the chunk prefix sums and the split", py::arg("idx"),
        py::arg("prefix"), py::arg("counts"), py::arg("cum_frac"), py::arg("log2phy"));
}
