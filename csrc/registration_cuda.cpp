// CUDA glue: the only CUDA translation unit that sees torch. It validates arguments (the same checks
// as the CPU path), turns tensors into raw pointers and strides, and calls the launchers of
// cuda_launchers.h on the current stream.
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda_launchers.h"
#include "ops.h"

namespace fastdistill {
namespace {

// Row-wise kernels launch one block per (token, head, batch): grid.x = tokens, grid.y = heads,
// grid.z = batch.
void check_row_grid(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.size(0) <= 65535 && t.size(1) <= 65535 && t.size(2) <= INT32_MAX, op,
                    ": the CUDA kernel supports at most 65535 batches and heads and 2^31 - 1 tokens, got ", name,
                    " of shape ", t.sizes());
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  check_rope_args(x, cos, sin);
  check_row_grid(x, "rope", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  C10_CUDA_CHECK(launch_rope(scalar_kind(x), scalar_kind(cos), x.const_data_ptr(), describe4(x), cos.const_data_ptr(),
                             describe2(cos), sin.const_data_ptr(), describe2(sin), out.mutable_data_ptr(),
                             describe4(out), interleaved, c10::cuda::getCurrentCUDAStream()));
  return out;
}

void kv_write_cuda(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& start, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                   bool interleaved) {
  check_kv_write_args(cache_k, cache_v, k, v, start, cos, sin);
  check_row_grid(k, "kv_write", "k");
  const c10::cuda::CUDAGuard guard(cache_k.device());
  // A CPU scalar is read here and passed by value; a device scalar is read by the kernel (no sync).
  const bool start_on_host = start.is_cpu();
  const int64_t start_value = start_on_host ? start.item<int64_t>() : 0;
  const bool rotate = cos.has_value();
  C10_CUDA_CHECK(launch_kv_write(
      scalar_kind(k), rotate ? scalar_kind(*cos) : ScalarKind::Float32, cache_k.mutable_data_ptr(),
      describe4(cache_k), cache_v.mutable_data_ptr(), describe4(cache_v), k.const_data_ptr(), describe4(k),
      v.const_data_ptr(), describe4(v), start_on_host ? nullptr : start.const_data_ptr(),
      start.scalar_type() == at::kInt, start_value, rotate ? cos->const_data_ptr() : nullptr,
      rotate ? describe2(*cos) : Tensor2{}, rotate ? sin->const_data_ptr() : nullptr,
      rotate ? describe2(*sin) : Tensor2{}, interleaved, c10::cuda::getCurrentCUDAStream()));
}

ScheduleTensors schedule_chunk_causal_cuda(int64_t lq, int64_t lk, int64_t block_m, int64_t block_n,
                                           int64_t chunk_size, std::optional<int64_t> window, int64_t sink,
                                           int64_t q_offset, int64_t kv_offset, at::Device device) {
  const ChunkCausalParams params =
      make_chunk_causal_params(lq, lk, block_m, block_n, chunk_size, window, sink, q_offset, kv_offset);
  const c10::cuda::CUDAGuard guard(device);
  ScheduleTensors tensors = allocate_schedule(1, 1, ceil_div(lq, block_m), ceil_div(lk, block_n), device);
  C10_CUDA_CHECK(launch_schedule_chunk_causal(params, schedule_output_pointers(tensors),
                                              c10::cuda::getCurrentCUDAStream()));
  return tensors;
}

ScheduleTensors schedule_block_mask_cuda(const at::Tensor& block_mask, int64_t lq, int64_t lk, int64_t block_m,
                                         int64_t block_n, int64_t mask_block_q, int64_t mask_block_k) {
  const BlockMaskParams params =
      make_block_mask_params(block_mask, lq, lk, block_m, block_n, mask_block_q, mask_block_k);
  const c10::cuda::CUDAGuard guard(block_mask.device());
  ScheduleTensors tensors = allocate_schedule(params.mask_batch, params.mask_heads, ceil_div(lq, block_m),
                                              ceil_div(lk, block_n), block_mask.device());
  C10_CUDA_CHECK(launch_schedule_block_mask(params, block_mask.const_data_ptr<bool>(),
                                            schedule_output_pointers(tensors), c10::cuda::getCurrentCUDAStream()));
  return tensors;
}

}  // namespace
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("rope", &fastdistill::rope_cuda);
  m.impl("kv_write", &fastdistill::kv_write_cuda);
  m.impl("schedule_chunk_causal", &fastdistill::schedule_chunk_causal_cuda);
  m.impl("schedule_block_mask", &fastdistill::schedule_block_mask_cuda);
}
