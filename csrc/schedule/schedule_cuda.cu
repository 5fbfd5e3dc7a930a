// CUDA tile-schedule builders: one thread per list (a query tile's key tiles, or a key tile's query
// tiles). The classification is the shared header's, so CUDA and CPU schedules are identical, and
// the output size is fixed by (Bm, Hm, nQ, nK): building on the device never syncs with the host.
#include "common/cuda_dispatch.cuh"
#include "cuda_launchers.h"
#include "schedule/tile_schedule.h"

namespace fastdistill {
namespace {

__global__ void schedule_chunk_causal_kernel(ChunkCausalParams params, ScheduleOutputs out, int64_t num_q_tiles,
                                             int64_t num_k_tiles) {
  const int64_t num_items = num_q_tiles + num_k_tiles;
  auto classify = [&](int64_t, int64_t q_tile, int64_t k_tile) {
    return classify_chunk_causal_tile(params, q_tile, k_tile);
  };
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < num_items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    build_schedule_item(classify, item, 1, num_q_tiles, num_k_tiles, out);
  }
}

__global__ void schedule_block_mask_kernel(BlockMaskParams params, const bool* __restrict__ mask, ScheduleOutputs out,
                                           int64_t num_q_tiles, int64_t num_k_tiles) {
  const int64_t num_bh = params.mask_batch * params.mask_heads;
  const int64_t num_items = num_bh * (num_q_tiles + num_k_tiles);
  auto classify = [&](int64_t bh, int64_t q_tile, int64_t k_tile) {
    return classify_block_mask_tile(params, mask, bh, q_tile, k_tile);
  };
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < num_items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    build_schedule_item(classify, item, num_bh, num_q_tiles, num_k_tiles, out);
  }
}

}  // namespace

cudaError_t launch_schedule_chunk_causal(const ChunkCausalParams& params, const ScheduleOutputs& out,
                                         cudaStream_t stream) {
  const int64_t num_q_tiles = ceil_div(params.lq, params.block_m), num_k_tiles = ceil_div(params.lk, params.block_n);
  const int64_t num_items = num_q_tiles + num_k_tiles;
  if (num_items == 0) return cudaSuccess;  // with one length 0 the other side's lists still get count 0
  schedule_chunk_causal_kernel<<<grid_blocks(num_items), kThreadsPerBlock, 0, stream>>>(params, out, num_q_tiles,
                                                                                        num_k_tiles);
  return cudaGetLastError();
}

cudaError_t launch_schedule_block_mask(const BlockMaskParams& params, const bool* mask, const ScheduleOutputs& out,
                                       cudaStream_t stream) {
  const int64_t num_q_tiles = ceil_div(params.lq, params.block_m), num_k_tiles = ceil_div(params.lk, params.block_n);
  const int64_t num_items = params.mask_batch * params.mask_heads * (num_q_tiles + num_k_tiles);
  if (num_items == 0) return cudaSuccess;  // with one length 0 the other side's lists still get count 0
  schedule_block_mask_kernel<<<grid_blocks(num_items), kThreadsPerBlock, 0, stream>>>(params, mask, out, num_q_tiles,
                                                                                      num_k_tiles);
  return cudaGetLastError();
}

}  // namespace fastdistill
