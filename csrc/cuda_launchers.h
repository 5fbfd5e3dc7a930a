// The binding table between the torch glue (registration_cuda.cpp) and the CUDA kernels.
//
// Launchers take raw pointers, sizes, strides and a stream, never torch types, so every .cu file
// compiles with nvcc alone (CMake target `fastdistill_cuda_check`). Each returns the launch status;
// the glue turns a failure into a Python exception. Arguments are validated by the glue before any
// launcher is called.
#pragma once

#include <cuda_runtime_api.h>

#include "common/device_math.h"
#include "schedule/tile_schedule.h"

namespace fastdistill {

// out = rope(x, cos, sin). x and out are [B, H, L, D] of kind `x_kind`; cos and sin [L, D/2] of kind
// `table_kind` (Float32 or Float64).
cudaError_t launch_rope(ScalarKind x_kind, ScalarKind table_kind, const void* x, const Tensor4& x_desc,
                        const void* cos, const Tensor2& cos_desc, const void* sin, const Tensor2& sin_desc, void* out,
                        const Tensor4& out_desc, bool interleaved, cudaStream_t stream);

// Writes k [B, H, n, D] (rotated when cos/sin are non-null) and v [B, H, n, Dv] into the ring buffers
// cache_k [B, H, S, D] and cache_v [B, H, S, Dv] at slots (start + i) mod S. The start position is read
// on the device from `start_ptr` (int32 or int64 scalar) when it is non-null, else `start_value` is
// used; either way no host synchronisation happens.
cudaError_t launch_kv_write(ScalarKind kind, ScalarKind table_kind, void* cache_k, const Tensor4& cache_k_desc,
                            void* cache_v, const Tensor4& cache_v_desc, const void* k, const Tensor4& k_desc,
                            const void* v, const Tensor4& v_desc, const void* start_ptr, bool start_is_int32,
                            int64_t start_value, const void* cos, const Tensor2& cos_desc, const void* sin,
                            const Tensor2& sin_desc, bool interleaved, cudaStream_t stream);

// Tile schedules (layout in schedule/tile_schedule.h); outputs are contiguous device tensors.
cudaError_t launch_schedule_chunk_causal(const ChunkCausalParams& params, const ScheduleOutputs& out,
                                         cudaStream_t stream);
cudaError_t launch_schedule_block_mask(const BlockMaskParams& params, const bool* mask, const ScheduleOutputs& out,
                                       cudaStream_t stream);

}  // namespace fastdistill
