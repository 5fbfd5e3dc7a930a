// Torch-free definitions shared by the CPU (.cpp) and CUDA (.cu) implementations.
//
// Everything here compiles with a plain host compiler and with nvcc, without any torch header, so the
// .cu files can be compiled for sm_80/sm_90a on a machine whose torch is a CPU wheel (CMake target
// `fastdistill_cuda_check`). The torch glue converts tensors to the raw pointers, sizes and strides
// declared here.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fastdistill {

// The element types a launcher accepts. The glue maps torch dtypes onto these; launchers switch on
// them to pick a template instantiation.
enum class ScalarKind : int32_t { Float16 = 0, BFloat16 = 1, Float32 = 2, Float64 = 3 };

// Sizes and element strides of a rank-4 tensor [B, H, L, D]. Strides are in elements, may be any
// value (a BSHD tensor transposed to BHSD has stride(1) = D and stride(2) = H * D), so kernels never
// require a contiguous copy.
struct Tensor4 {
  int64_t size[4];
  int64_t stride[4];
  FD_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t l, int64_t d) const {
    return b * stride[0] + h * stride[1] + l * stride[2] + d * stride[3];
  }
};

// Sizes and element strides of a rank-2 table [L, P] (RoPE cos/sin: one row per token, one column per
// rotation pair).
struct Tensor2 {
  int64_t size[2];
  int64_t stride[2];
  FD_HOST_DEVICE int64_t offset(int64_t l, int64_t p) const { return l * stride[0] + p * stride[1]; }
};

// Floor modulo: the result is in [0, m) for any sign of `a` (C++ `%` truncates toward zero).
FD_HOST_DEVICE int64_t floor_mod(int64_t a, int64_t m) {
  const int64_t r = a % m;
  return r < 0 ? r + m : r;
}

// Ceiling division for a >= 0, m > 0 (tile counts).
FD_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t m) { return (a + m - 1) / m; }

// Floor division for any sign of `a` and m > 0.
FD_HOST_DEVICE int64_t floor_div(int64_t a, int64_t m) {
  const int64_t q = a / m;
  return (a % m != 0 && a < 0) ? q - 1 : q;
}

}  // namespace fastdistill

namespace fastdistill {

// Accumulation type: fp16/bf16/fp32 compute in fp32, fp64 in fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

}  // namespace fastdistill
