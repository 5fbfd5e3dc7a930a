// Launch helpers for the .cu files: dtype dispatch on ScalarKind and grid sizing. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "common/device_math.h"

namespace fastdistill {

// Calls `fn(tag)` with a null pointer of the element type named by `kind`; the callee recovers the
// type with `std::remove_pointer_t<decltype(tag)>`.
template <typename Fn>
cudaError_t dispatch_element_type(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::Float16: return fn(static_cast<__half*>(nullptr));
    case ScalarKind::BFloat16: return fn(static_cast<__nv_bfloat16*>(nullptr));
    case ScalarKind::Float32: return fn(static_cast<float*>(nullptr));
    case ScalarKind::Float64: return fn(static_cast<double*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// RoPE tables are float32 or float64.
template <typename Fn>
cudaError_t dispatch_table_type(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::Float32: return fn(static_cast<float*>(nullptr));
    case ScalarKind::Float64: return fn(static_cast<double*>(nullptr));
    default: return cudaErrorInvalidValue;
  }
}

// Conversions between storage and accumulation types. torch's extension build defines
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, which removes the implicit ones, so
// fp16/bf16 go through the explicit round-to-nearest intrinsics.
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccType<T>::type x) {
  return x;  // float and double
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

constexpr int kThreadsPerBlock = 256;

// Row-wise ops (RoPE, cache writes) run one block per (token, head, batch) row: blockIdx.x = token,
// blockIdx.y = head, blockIdx.z = batch, so no thread divides to find its row. The block is sized to
// the row's work items, rounded up to whole warps, and loops when a row has more items than threads.
inline dim3 row_grid(int64_t batch, int64_t heads, int64_t tokens) {
  return dim3(static_cast<unsigned int>(tokens), static_cast<unsigned int>(heads), static_cast<unsigned int>(batch));
}

inline unsigned int row_block(int64_t items_per_row) {
  const int64_t warps = std::max<int64_t>(1, std::min<int64_t>((items_per_row + 31) / 32, 8));
  return static_cast<unsigned int>(warps * 32);
}


// Blocks for a grid-stride loop over `work` items; capped because a grid-stride loop needs no more
// blocks than the device can keep resident many times over.
inline unsigned int grid_blocks(int64_t work) {
  const int64_t blocks = (work + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20)));
}

}  // namespace fastdistill
