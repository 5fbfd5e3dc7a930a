// Torch-side declarations of every op: argument checks (shared by the CPU implementations and the
// CUDA glue, so both devices reject bad input with the same message) and the CPU implementations.
// Schemas live in registration.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "schedule/tile_schedule.h"

namespace fastdistill {

// rope(x [B, H, L, D], cos [L, D/2], sin [L, D/2], interleaved) -> [B, H, L, D]
void check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved);

// kv_write(cache_k [B, H, S, D], cache_v [B, H, S, Dv], k [B, H, n, D], v [B, H, n, Dv], start, cos?, sin?)
void check_kv_write_args(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& start, const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin);
void kv_write_cpu(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& start, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                  bool interleaved);

// Tile schedules: (kv_count, kv_index, kv_full, q_count, q_index, q_full), layout in tile_schedule.h.
using ScheduleTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ChunkCausalParams make_chunk_causal_params(int64_t lq, int64_t lk, int64_t block_m, int64_t block_n,
                                           int64_t chunk_size, std::optional<int64_t> window, int64_t sink,
                                           int64_t q_offset, int64_t kv_offset);
BlockMaskParams make_block_mask_params(const at::Tensor& block_mask, int64_t lq, int64_t lk, int64_t block_m,
                                       int64_t block_n, int64_t mask_block_q, int64_t mask_block_k);
// Allocates the six (empty) output tensors of a schedule over [mask_batch, mask_heads].
ScheduleTensors allocate_schedule(int64_t mask_batch, int64_t mask_heads, int64_t num_q_tiles, int64_t num_k_tiles,
                                  at::Device device);
ScheduleOutputs schedule_output_pointers(const ScheduleTensors& tensors);

ScheduleTensors schedule_chunk_causal_cpu(int64_t lq, int64_t lk, int64_t block_m, int64_t block_n,
                                          int64_t chunk_size, std::optional<int64_t> window, int64_t sink,
                                          int64_t q_offset, int64_t kv_offset, at::Device device);
ScheduleTensors schedule_block_mask_cpu(const at::Tensor& block_mask, int64_t lq, int64_t lk, int64_t block_m,
                                        int64_t block_n, int64_t mask_block_q, int64_t mask_block_k);

}  // namespace fastdistill
