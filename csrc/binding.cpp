// pybind11 binding of the count and map kernels as lplb_plugin._C.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "lplb_kernels.h"
#include "lplb_solve.h"

namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lplb_plugin._C.", what, ": ", cudaGetErrorString(err));
}

void check_idx(const torch::Tensor& idx) {
  TORCH_CHECK(idx.is_cuda(), "idx must be a CUDA tensor");
  TORCH_CHECK(idx.scalar_type() == torch::kInt32 || idx.scalar_type() == torch::kInt64,
              "idx must be int32 or int64, got ", idx.scalar_type());
}

// A running total the kernels add to (int64 [>= slot + 1] on `device`), or null.
int64_t* total_ptr(const c10::optional<torch::Tensor>& totals, int64_t slot, const torch::Device& device) {
  if (!totals.has_value()) return nullptr;
  const auto& t = *totals;
  TORCH_CHECK(t.device() == device && t.scalar_type() == torch::kInt64 && t.is_contiguous() && t.numel() > slot,
              "totals must be a contiguous int64 tensor of at least ", slot + 1, " entries on ", device);
  return t.data_ptr<int64_t>() + slot;
}

// (counts int32 [L], prefix int32 [n_chunks, L], invalid int32 [1]: ids that are neither
// -1 nor in [0, L)); invalid is also added to totals[0] when totals is given.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> count(torch::Tensor idx, int64_t n_logical, int64_t n_chunks,
                                                              c10::optional<torch::Tensor> totals) {
  check_idx(idx);
  TORCH_CHECK(n_logical >= 1 && n_chunks >= 1, "n_logical and n_chunks must be >= 1");
  auto flat = idx.contiguous().view(-1);
  auto opts = idx.options().dtype(torch::kInt32);
  auto prefix = torch::empty({n_chunks, n_logical}, opts);
  auto counts = torch::empty({n_logical}, opts);
  auto invalid = torch::empty({1}, opts);
  auto chunk_invalid = torch::empty({n_chunks}, opts);
  int64_t* total = total_ptr(totals, 0, idx.device());
  const c10::cuda::CUDAGuard guard(idx.device());
  check(lplb::count_tokens(flat.data_ptr(), idx.scalar_type() == torch::kInt64, flat.numel(), n_logical, n_chunks,
                           prefix.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), chunk_invalid.data_ptr<int32_t>(),
                           invalid.data_ptr<int32_t>(), total, c10::cuda::getCurrentCUDAStream()),
        "count");
  return {counts, prefix, invalid};
}

const int* int_ptr(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kInt32 && t.is_contiguous(), name,
              " must be a contiguous CUDA int32 tensor");
  return t.data_ptr<int32_t>();
}

// Solve stage.  arrays: the 15 int32 tensors of ComponentArrays.tensors(); sizes:
// (n_comp, max_ranks, max_experts, max_edges, two_copy: 1 when every movable expert
// has two edges, one_warp: 1 to let small components take the one-warp solvers); graph: (slot_edge int32 [P], edge_mult
// int32 [E], slot_share int32 [P], log2phy int64 [L, C], logcnt int64 [L], copy table
// int32 [M, 1 + 2 C] of ComponentArrays.copy_table).  One kernel writes all outputs.
// Returns (edge_flow f64 [E], rank_load f64 [R], status i32 [n_comp], bound f64
// [n_comp], iters i32 [n_comp, 2], x f64 [P], cum f64 [L, C]), all on loads' device.
// When totals is given, the number of components with status 0 is added to totals[1].
std::vector<torch::Tensor> solve(std::vector<torch::Tensor> arrays, std::vector<int64_t> sizes,
                                 std::vector<torch::Tensor> graph, torch::Tensor loads, int64_t n_ranks,
                                 int64_t method, double lipschitz, int64_t max_rounds, int64_t ipm_max_iters,
                                 double ipm_tol, c10::optional<torch::Tensor> totals) {
  TORCH_CHECK(arrays.size() == 15, "solve: expected the 15 ComponentArrays tensors, got ", arrays.size());
  TORCH_CHECK(sizes.size() == 6,
              "solve: sizes must be (n_comp, max_ranks, max_experts, max_edges, two_copy, one_warp)");
  TORCH_CHECK(graph.size() == 6,
              "solve: graph must be (slot_edge, edge_mult, slot_share, log2phy, logcnt, copy table)");
  TORCH_CHECK(loads.is_cuda() && (loads.scalar_type() == torch::kInt32 || loads.scalar_type() == torch::kFloat64),
              "loads must be a CUDA int32 or float64 tensor, got ", loads.scalar_type());
  TORCH_CHECK(method == 0 || method == 1, "method must be 0 (exact) or 1 (ipm), got ", method);
  const auto& log2phy = graph[3];
  const auto& logcnt = graph[4];
  TORCH_CHECK(log2phy.is_cuda() && log2phy.scalar_type() == torch::kInt64 && log2phy.dim() == 2 &&
                  log2phy.is_contiguous(),
              "log2phy must be a contiguous CUDA int64 [L, C] tensor");
  TORCH_CHECK(logcnt.is_cuda() && logcnt.scalar_type() == torch::kInt64 && logcnt.numel() == log2phy.size(0),
              "logcnt must be a CUDA int64 [L] tensor");
  TORCH_CHECK(loads.numel() == log2phy.size(0), "loads must have one entry per logical expert (", log2phy.size(0),
              "), got ", loads.numel());
  TORCH_CHECK(graph[5].numel() == arrays[7].numel() * (1 + 2 * log2phy.size(1)),
              "solve: the copy table must be [M, 1 + 2 C] = [", arrays[7].numel(), ", ", 1 + 2 * log2phy.size(1),
              "] (ComponentArrays.copy_table), got ", graph[5].numel(), " entries");
  const c10::cuda::CUDAGuard guard(loads.device());
  auto ld = loads.contiguous();
  const int n_comp = static_cast<int>(sizes[0]);
  lplb::CompArrays a{n_comp};
  const int** fields[] = {&a.comp_rank_off, &a.comp_exp_off, &a.comp_edge_off, &a.rank_global, &a.fix_off,
                          &a.fix_log, &a.fix_div, &a.exp_log, &a.exp_ptr, &a.edge_rank, &a.edge_exp,
                          &a.edge_mult, &a.edge_global, &a.rank_ptr, &a.rank_edges};
  for (int i = 0; i < 15; ++i) *fields[i] = int_ptr(arrays[i], "component array");
  const int64_t n_edges = graph[1].numel(), n_phys = graph[0].numel();
  auto f64 = ld.options().dtype(torch::kFloat64);
  auto i32 = ld.options().dtype(torch::kInt32);
  auto edge_flow = torch::empty({n_edges}, f64);
  auto rank_load = torch::empty({n_ranks}, f64);
  auto status = torch::empty({n_comp}, i32);
  auto bound = torch::empty({n_comp}, f64);
  auto iters = torch::empty({n_comp, 2}, i32);
  auto x = torch::empty({n_phys}, f64);
  auto cum = torch::empty({log2phy.size(0), log2phy.size(1)}, f64);
  lplb::SolveSizes sz{static_cast<int>(sizes[1]), static_cast<int>(sizes[2]), static_cast<int>(sizes[3]),
                      sizes[4] != 0, sizes[5] != 0};
  // scratch in global memory for components too large for one block's shared memory
  torch::Tensor global;
  const size_t per_comp = lplb::solve_global_doubles(sz, static_cast<int>(method));
  if (per_comp > 0) global = torch::empty({n_comp * static_cast<int64_t>(per_comp)}, f64);
  lplb::SolveOut out{edge_flow.data_ptr<double>(), rank_load.data_ptr<double>(), status.data_ptr<int32_t>(),
                     bound.data_ptr<double>(), iters.data_ptr<int32_t>()};
  lplb::SlotSplit slots{static_cast<int>(log2phy.size(0)),
                        static_cast<int>(log2phy.size(1)),
                        log2phy.data_ptr<int64_t>(),
                        logcnt.data_ptr<int64_t>(),
                        int_ptr(graph[0], "slot_edge"),
                        int_ptr(graph[1], "edge_mult"),
                        int_ptr(graph[2], "slot_share"),
                        int_ptr(graph[5], "copy table"),
                        x.data_ptr<double>(),
                        cum.data_ptr<double>(),
                        total_ptr(totals, 1, ld.device())};
  const bool is_int = ld.scalar_type() == torch::kInt32;
  auto stream = c10::cuda::getCurrentCUDAStream();
  check(lplb::solve_split(a, sz, ld.data_ptr(), is_int, static_cast<int>(method), lipschitz,
                          static_cast<int>(max_rounds), out, slots,
                          global.defined() ? global.data_ptr<double>() : nullptr, static_cast<int>(ipm_max_iters),
                          ipm_tol, stream),
        "solve");
  return {edge_flow, rank_load, status, bound, iters, x, cum};
}

// Doubles of global scratch per component the solve stage takes on CUDA device `device`
// for `method` and sizes (max_ranks, max_experts, max_edges, two_copy): 0 when a block's
// scratch fits in its shared memory, max_ranks^2 when only the Newton matrix moves
// out, more when all of it does.
int64_t global_doubles(std::vector<int64_t> sizes, int64_t method, int64_t device) {
  TORCH_CHECK(sizes.size() >= 4, "global_doubles: sizes must start with (max_ranks, max_experts, max_edges, two_copy)");
  TORCH_CHECK(method == 0 || method == 1, "method must be 0 (exact) or 1 (ipm), got ", method);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  lplb::SolveSizes sz{static_cast<int>(sizes[0]), static_cast<int>(sizes[1]), static_cast<int>(sizes[2]),
                      sizes[3] != 0, false};
  return static_cast<int64_t>(lplb::solve_global_doubles(sz, static_cast<int>(method)));
}

// physical ids, idx's shape and dtype; after_solve: lplb::map_tokens's (true only
// right after solve() on the same stream)
torch::Tensor map(torch::Tensor idx, torch::Tensor prefix, torch::Tensor counts, torch::Tensor cum_frac,
                  torch::Tensor log2phy, bool after_solve) {
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
                         cf.data_ptr<double>(), l2p.data_ptr<int64_t>(), cf.size(1), out.data_ptr(), after_solve,
                         c10::cuda::getCurrentCUDAStream()),
        "map");
  return out.view(idx.sizes());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lplb_plugin CUDA kernels: count, solve and map stages of the Planner";
  m.def("count", &count, "per-expert counts, per-chunk inclusive prefix sums and the number of invalid ids",
        py::arg("idx"), py::arg("n_logical"), py::arg("n_chunks"), py::arg("totals") = py::none());
  m.def("solve", &solve, "split LP, one block per connected component, then the per-slot split and copy shares",
        py::arg("arrays"), py::arg("sizes"), py::arg("graph"), py::arg("loads"), py::arg("n_ranks"),
        py::arg("method"), py::arg("lipschitz"), py::arg("max_rounds"), py::arg("ipm_max_iters"),
        py::arg("ipm_tol"), py::arg("totals") = py::none());
  m.def("global_doubles", &global_doubles, "global scratch doubles per component of the solve stage",
        py::arg("sizes"), py::arg("method"), py::arg("device"));
  m.def("map", &map, "logical -> physical rewrite from the chunk prefix sums and the split", py::arg("idx"),
        py::arg("prefix"), py::arg("counts"), py::arg("cum_frac"), py::arg("log2phy"), py::arg("after_solve") = false);
}
