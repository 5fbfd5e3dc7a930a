// Every fastdistill op schema, declared once, and the CPU implementations. The CUDA implementations
// are registered by registration_cuda.cpp (built only when CUDA is available); fake (meta) kernels
// and autograd are registered in Python (fastdistill/_library.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

// setup.py defines FASTDISTILL_CUDA_ARCHS as bare comma-separated tokens (sm_80,sm_90a) in CUDA builds.
#define FD_STRINGIFY(...) #__VA_ARGS__
#define FD_EXPAND_STRINGIFY(...) FD_STRINGIFY(__VA_ARGS__)
#ifdef FASTDISTILL_CUDA_ARCHS
#define FD_CUDA_ARCHS_STRING FD_EXPAND_STRINGIFY(FASTDISTILL_CUDA_ARCHS)
#else
#define FD_CUDA_ARCHS_STRING ""
#endif

namespace fastdistill {
namespace {

using ScheduleChunkCausalFn = ScheduleTensors(int64_t, int64_t, int64_t, int64_t, int64_t, std::optional<int64_t>,
                                              int64_t, int64_t, int64_t, at::Device);

// schedule_chunk_causal has no tensor argument, so the dispatcher cannot infer a backend; like
// torch's factory functions it selects one from the `device` argument here and redispatches.
ScheduleTensors schedule_chunk_causal_backend_select(int64_t lq, int64_t lk, int64_t block_m, int64_t block_n,
                                                     int64_t chunk_size, std::optional<int64_t> window,
                                                     int64_t sink, int64_t q_offset, int64_t kv_offset,
                                                     at::Device device) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastdistill::schedule_chunk_causal", "")
                             .typed<ScheduleChunkCausalFn>();
  const c10::DispatchKeySet keys(c10::computeDispatchKey(std::nullopt, std::nullopt, device));
  return op.redispatch(keys, lq, lk, block_m, block_n, chunk_size, window, sink, q_offset, kv_offset, device);
}

}  // namespace
}  // namespace fastdistill

TORCH_LIBRARY(fastdistill, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor", tags);
  m.def(
      "kv_write(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k, Tensor v, Tensor start, Tensor? cos, Tensor? sin, "
      "bool interleaved) -> ()",
      tags);
  m.def(
      "schedule_chunk_causal(int lq, int lk, int block_m, int block_n, int chunk_size, int? window, int sink, "
      "int q_offset, int kv_offset, Device device) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "schedule_block_mask(Tensor block_mask, int lq, int lk, int block_m, int block_n, int mask_block_q, "
      "int mask_block_k) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("rope", &fastdistill::rope_cpu);
  m.impl("kv_write", &fastdistill::kv_write_cpu);
  m.impl("schedule_chunk_causal", &fastdistill::schedule_chunk_causal_cpu);
  m.impl("schedule_block_mask", &fastdistill::schedule_block_mask_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, BackendSelect, m) {
  m.impl("schedule_chunk_causal", &fastdistill::schedule_chunk_causal_backend_select);
}

// Build facts for `fastdistill info`; the ops themselves are reached through torch.ops.fastdistill.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdistill C++/CUDA core: registers torch.ops.fastdistill";
  m.attr("cuda_archs") = std::string(FD_CUDA_ARCHS_STRING);
}
