// CPU tile-schedule builders (and the parameter checks and output allocation shared with the CUDA glue).
#include <ATen/Parallel.h>

#include "common/checks.h"
#include "ops.h"
#include "schedule/tile_schedule.h"

namespace fastdistill {
namespace {

void check_tiling(const char* op, int64_t lq, int64_t lk, int64_t block_m, int64_t block_n) {
  TORCH_CHECK_VALUE(lq >= 0 && lk >= 0, op, ": lq and lk must be >= 0, got lq = ", lq, ", lk = ", lk);
  TORCH_CHECK_VALUE(block_m >= 1 && block_n >= 1, op, ": block_m and block_n must be >= 1, got block_m = ", block_m,
                    ", block_n = ", block_n);
}

// Runs `build(item)` for every list of a schedule: a parallel loop whose grain keeps tasks of a few
// thousand tile classifications.
template <typename Build>
void for_each_schedule_item(int64_t num_items, int64_t list_length, const Build& build) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(list_length, 1));
  at::parallel_for(0, num_items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) build(item);
  });
}

}  // namespace

ChunkCausalParams make_chunk_causal_params(int64_t lq, int64_t lk, int64_t block_m, int64_t block_n,
                                           int64_t chunk_size, std::optional<int64_t> window, int64_t sink,
                                           int64_t q_offset, int64_t kv_offset) {
  constexpr const char* op = "schedule_chunk_causal";
  check_tiling(op, lq, lk, block_m, block_n);
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(!window.has_value() || *window >= 1, op, ": window must be None or >= 1 tokens, got ",
                    window.value_or(0));
  TORCH_CHECK_VALUE(sink >= 0, op, ": sink must be >= 0 tokens, got ", sink);
  TORCH_CHECK_VALUE(q_offset >= 0 && kv_offset >= 0, op, ": q_offset and kv_offset must be >= 0, got q_offset = ",
                    q_offset, ", kv_offset = ", kv_offset);
  // Positions stay below 2^62 so the classifier's sums (k_last + window, end(p)) cannot overflow.
  constexpr int64_t kMaxPosition = int64_t{1} << 62;
  TORCH_CHECK_VALUE(lq < kMaxPosition && lk < kMaxPosition && chunk_size < kMaxPosition &&
                        q_offset < kMaxPosition - lq - chunk_size && kv_offset < kMaxPosition - lk,
                    op, ": positions must stay below 2^62, got q_offset = ", q_offset, ", lq = ", lq,
                    ", chunk_size = ", chunk_size, ", kv_offset = ", kv_offset, ", lk = ", lk);
  // A window reaching back past position 0 from the last query's chunk end restricts nothing.
  int64_t window_tokens = window.value_or(-1);
  if (lq > 0 && window_tokens >= chunk_end(q_offset + lq - 1, chunk_size)) window_tokens = -1;
  return ChunkCausalParams{lq, lk, block_m, block_n, chunk_size, window_tokens, sink, q_offset, kv_offset};
}

BlockMaskParams make_block_mask_params(const at::Tensor& block_mask, int64_t lq, int64_t lk, int64_t block_m,
                                       int64_t block_n, int64_t mask_block_q, int64_t mask_block_k) {
  constexpr const char* op = "schedule_block_mask";
  check_tiling(op, lq, lk, block_m, block_n);
  TORCH_CHECK_VALUE(mask_block_q >= 1 && mask_block_k >= 1, op,
                    ": mask_block_q and mask_block_k must be >= 1, got ", mask_block_q, " and ", mask_block_k);
  TORCH_CHECK_TYPE(block_mask.scalar_type() == at::kBool, op, ": block_mask must be a bool tensor, got ",
                   block_mask.scalar_type());
  check_rank(block_mask, 4, op, "block_mask", "[B|1, H|1, ceil(lq / mask_block_q), ceil(lk / mask_block_k)]");
  const int64_t blocks_q = ceil_div(lq, mask_block_q), blocks_k = ceil_div(lk, mask_block_k);
  TORCH_CHECK_VALUE(block_mask.size(2) == blocks_q && block_mask.size(3) == blocks_k, op,
                    ": block_mask must have ceil(lq / mask_block_q) = ", blocks_q, " rows and ceil(lk / mask_block_k) = ",
                    blocks_k, " columns for lq = ", lq, ", lk = ", lk, ", mask block (", mask_block_q, ", ",
                    mask_block_k, "); got shape ", block_mask.sizes());
  BlockMaskParams p{lq, lk, block_m, block_n, mask_block_q, mask_block_k, block_mask.size(0), block_mask.size(1), {}};
  for (int i = 0; i < 4; ++i) p.stride[i] = block_mask.stride(i);
  return p;
}

ScheduleTensors allocate_schedule(int64_t mask_batch, int64_t mask_heads, int64_t num_q_tiles, int64_t num_k_tiles,
                                  at::Device device) {
  const auto ints = at::TensorOptions().dtype(at::kInt).device(device);
  const auto bools = at::TensorOptions().dtype(at::kBool).device(device);
  return {at::empty({mask_batch, mask_heads, num_q_tiles}, ints),
          at::empty({mask_batch, mask_heads, num_q_tiles, num_k_tiles}, ints),
          at::empty({mask_batch, mask_heads, num_q_tiles, num_k_tiles}, bools),
          at::empty({mask_batch, mask_heads, num_k_tiles}, ints),
          at::empty({mask_batch, mask_heads, num_k_tiles, num_q_tiles}, ints),
          at::empty({mask_batch, mask_heads, num_k_tiles, num_q_tiles}, bools)};
}

ScheduleOutputs schedule_output_pointers(const ScheduleTensors& t) {
  return ScheduleOutputs{std::get<0>(t).mutable_data_ptr<int32_t>(), std::get<1>(t).mutable_data_ptr<int32_t>(),
                         std::get<2>(t).mutable_data_ptr<bool>(),    std::get<3>(t).mutable_data_ptr<int32_t>(),
                         std::get<4>(t).mutable_data_ptr<int32_t>(), std::get<5>(t).mutable_data_ptr<bool>()};
}

ScheduleTensors schedule_chunk_causal_cpu(int64_t lq, int64_t lk, int64_t block_m, int64_t block_n,
                                          int64_t chunk_size, std::optional<int64_t> window, int64_t sink,
                                          int64_t q_offset, int64_t kv_offset, at::Device device) {
  const ChunkCausalParams params =
      make_chunk_causal_params(lq, lk, block_m, block_n, chunk_size, window, sink, q_offset, kv_offset);
  const int64_t num_q_tiles = ceil_div(lq, block_m), num_k_tiles = ceil_div(lk, block_n);
  ScheduleTensors tensors = allocate_schedule(1, 1, num_q_tiles, num_k_tiles, device);
  const ScheduleOutputs out = schedule_output_pointers(tensors);
  auto classify = [&](int64_t, int64_t q_tile, int64_t k_tile) {
    return classify_chunk_causal_tile(params, q_tile, k_tile);
  };
  for_each_schedule_item(num_q_tiles + num_k_tiles, std::max(num_q_tiles, num_k_tiles), [&](int64_t item) {
    build_schedule_item(classify, item, 1, num_q_tiles, num_k_tiles, out);
  });
  return tensors;
}

ScheduleTensors schedule_block_mask_cpu(const at::Tensor& block_mask, int64_t lq, int64_t lk, int64_t block_m,
                                        int64_t block_n, int64_t mask_block_q, int64_t mask_block_k) {
  const BlockMaskParams params =
      make_block_mask_params(block_mask, lq, lk, block_m, block_n, mask_block_q, mask_block_k);
  const int64_t num_q_tiles = ceil_div(lq, block_m), num_k_tiles = ceil_div(lk, block_n);
  const int64_t num_bh = params.mask_batch * params.mask_heads;
  ScheduleTensors tensors =
      allocate_schedule(params.mask_batch, params.mask_heads, num_q_tiles, num_k_tiles, block_mask.device());
  const ScheduleOutputs out = schedule_output_pointers(tensors);
  const bool* mask = block_mask.const_data_ptr<bool>();
  auto classify = [&](int64_t bh, int64_t q_tile, int64_t k_tile) {
    return classify_block_mask_tile(params, mask, bh, q_tile, k_tile);
  };
  for_each_schedule_item(num_bh * (num_q_tiles + num_k_tiles), std::max(num_q_tiles, num_k_tiles), [&](int64_t item) {
    build_schedule_item(classify, item, num_bh, num_q_tiles, num_k_tiles, out);
  });
  return tensors;
}

}  // namespace fastdistill
