// Torch-side argument checks and tensor descriptors shared by the CPU implementations and the CUDA glue.
//
// Every check raises ValueError (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) with the op name,
// the argument name and the shapes/dtypes/devices seen, so bad input never reaches a kernel.
#pragma once

#include <ATen/ATen.h>

#include "common/device_math.h"

namespace fastdistill {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline ScalarKind scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kFloat: return ScalarKind::Float32;
    case at::kDouble: return ScalarKind::Float64;
    default: TORCH_CHECK_TYPE(false, "fastdistill: unsupported dtype ", t.scalar_type());
  }
}

inline Tensor4 describe4(const at::Tensor& t) {
  Tensor4 d{};
  for (int i = 0; i < 4; ++i) {
    d.size[i] = t.size(i);
    d.stride[i] = t.stride(i);
  }
  return d;
}

inline Tensor2 describe2(const at::Tensor& t) {
  Tensor2 d{};
  for (int i = 0; i < 2; ++i) {
    d.size[i] = t.size(i);
    d.stride[i] = t.stride(i);
  }
  return d;
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be ", layout, " (rank ", rank, "), got shape ",
                    t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b,
                             const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b,
                              const char* op) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

// RoPE tables are kept in full precision (the rotation angle of late positions needs it), so they
// are float32 or float64 whatever the activations are.
inline void check_rope_tables(const at::Tensor& x, const char* x_name, const at::Tensor& cos,
                              const at::Tensor& sin, const char* op) {
  check_rank(cos, 2, op, "cos", "[L, D/2]");
  check_rank(sin, 2, op, "sin", "[L, D/2]");
  const int64_t length = x.size(2), head_dim = x.size(3);
  TORCH_CHECK_VALUE(head_dim % 2 == 0, op, ": the head dim of ", x_name, " (size(3) of shape ", x.sizes(),
                    ") must be even to form rotation pairs");
  TORCH_CHECK_VALUE(cos.size(0) == length && cos.size(1) == head_dim / 2, op, ": cos must be [L, D/2] = [",
                    length, ", ", head_dim / 2, "] for ", x_name, " of shape ", x.sizes(), ", got ", cos.sizes());
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), op, ": sin must have the shape of cos ", cos.sizes(), ", got ",
                    sin.sizes());
  TORCH_CHECK_TYPE(cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kDouble, op,
                   ": cos must be float32 or float64 (RoPE tables are kept in full precision), got ",
                   cos.scalar_type());
  check_same_dtype(cos, "cos", sin, "sin", op);
  check_same_device(x, x_name, cos, "cos", op);
  check_same_device(x, x_name, sin, "sin", op);
}

}  // namespace fastdistill
