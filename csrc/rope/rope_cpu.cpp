// CPU rotary embedding (and the argument checks shared with the CUDA glue).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/checks.h"
#include "ops.h"
#include "rope/rope.h"

namespace fastdistill {

void check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rank(x, 4, "rope", "x", "[B, H, L, D]");
  check_float_dtype(x, "rope", "x");
  check_rope_tables(x, "x", cos, sin, "rope");
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  check_rope_args(x, cos, sin);
  at::Tensor out = at::empty_like(x);
  const Tensor4 x_desc = describe4(x), out_desc = describe4(out);
  const Tensor2 cos_desc = describe2(cos), sin_desc = describe2(sin);
  const int64_t heads = x.size(1), length = x.size(2), half_dim = x.size(3) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    AT_DISPATCH_FLOATING_TYPES(cos.scalar_type(), "rope_cpu_tables", [&] {
      using TableT = scalar_t;
      const T* x_ptr = x.const_data_ptr<T>();
      T* out_ptr = out.mutable_data_ptr<T>();
      const TableT* cos_ptr = cos.const_data_ptr<TableT>();
      const TableT* sin_ptr = sin.const_data_ptr<TableT>();
      // One task per (b, h, token) row; grain keeps tasks around 16k rotations.
      at::parallel_for(0, x.size(0) * heads * length, std::max<int64_t>(1, 16384 / std::max<int64_t>(half_dim, 1)),
                       [&](int64_t row_begin, int64_t row_end) {
                         for (int64_t row = row_begin; row < row_end; ++row) {
                           const int64_t token = row % length, h = (row / length) % heads, b = row / (length * heads);
                           const T* x_row = x_ptr + x_desc.offset(b, h, token, 0);
                           T* out_row = out_ptr + out_desc.offset(b, h, token, 0);
                           for (int64_t pair = 0; pair < half_dim; ++pair) {
                             rope_rotate_pair(
                                 pair, half_dim, interleaved, static_cast<Acc>(cos_ptr[cos_desc.offset(token, pair)]),
                                 static_cast<Acc>(sin_ptr[sin_desc.offset(token, pair)]),
                                 [&](int64_t d) { return static_cast<Acc>(x_row[d * x_desc.stride[3]]); },
                                 [&](int64_t d, Acc y) { out_row[d * out_desc.stride[3]] = static_cast<T>(y); });
                           }
                         }
                       });
    });
  });
  return out;
}

}  // namespace fastdistill
