// CPU ring-buffer write with fused RoPE (and the argument checks shared with the CUDA glue).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/checks.h"
#include "ops.h"
#include "rope/rope.h"

namespace fastdistill {

void check_kv_write_args(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& start, const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin) {
  constexpr const char* op = "kv_write";
  check_rank(cache_k, 4, op, "cache_k", "[B, H, S, D]");
  check_rank(cache_v, 4, op, "cache_v", "[B, H, S, Dv]");
  check_rank(k, 4, op, "k", "[B, H, n, D]");
  check_rank(v, 4, op, "v", "[B, H, n, Dv]");
  check_float_dtype(cache_k, op, "cache_k");
  check_same_dtype(cache_k, "cache_k", cache_v, "cache_v", op);
  check_same_dtype(cache_k, "cache_k", k, "k", op);
  check_same_dtype(cache_v, "cache_v", v, "v", op);
  check_same_device(cache_k, "cache_k", cache_v, "cache_v", op);
  check_same_device(cache_k, "cache_k", k, "k", op);
  check_same_device(cache_k, "cache_k", v, "v", op);
  const auto b = cache_k.size(0), h = cache_k.size(1), slots = cache_k.size(2), n = k.size(2);
  TORCH_CHECK_VALUE(cache_v.size(0) == b && cache_v.size(1) == h && cache_v.size(2) == slots, op,
                    ": cache_v must match cache_k in [B, H, S]; got cache_k ", cache_k.sizes(), " and cache_v ",
                    cache_v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == b && k.size(1) == h && k.size(3) == cache_k.size(3), op,
                    ": k must be [B, H, n, D] matching cache_k ", cache_k.sizes(), " in B, H and D; got k ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == b && v.size(1) == h && v.size(2) == n && v.size(3) == cache_v.size(3), op,
                    ": v must be [B, H, n, Dv] with n = ", n, " (from k) matching cache_v ", cache_v.sizes(),
                    "; got v ", v.sizes());
  TORCH_CHECK_VALUE(n <= slots, op, ": cannot write n = ", n, " tokens (k ", k.sizes(),
                    ") into a ring of S = ", slots, " slots (cache_k ", cache_k.sizes(), ") in one call");
  TORCH_CHECK_TYPE(start.scalar_type() == at::kInt || start.scalar_type() == at::kLong, op,
                   ": start must be an int32 or int64 tensor, got ", start.scalar_type());
  TORCH_CHECK_VALUE(start.numel() == 1 && start.dim() <= 1, op,
                    ": start must hold one position (a 0-d or 1-element tensor), got shape ", start.sizes());
  TORCH_CHECK_VALUE(start.device() == cache_k.device() || start.is_cpu(), op,
                    ": start must be on the cache's device (", cache_k.device(), ") or a CPU scalar, got ",
                    start.device());
  // Threads write cache slots in parallel: a cache whose elements alias (e.g. an expanded tensor) or
  // that overlaps another argument would race. Like torch's in-place ops, overlap is detected where it
  // is decidable cheaply (dense tensors); interleaved layouts such as a packed [B, S, 2, H, D] buffer
  // share a storage without sharing elements and pass.
  for (const auto& [cache, cache_name] : {std::pair{&cache_k, "cache_k"}, std::pair{&cache_v, "cache_v"}}) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*cache) != at::MemOverlap::Yes, op, ": ", cache_name,
                      " has elements that share memory (an expanded or broadcast tensor?); it must be writable "
                      "element by element");
    for (const auto& [other, other_name] :
         {std::pair{&cache_v, "cache_v"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
      if (other == cache) continue;
      const auto status = at::get_overlap_status(*cache, *other);
      TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ",
                        cache_name, " and ", other_name, " overlap in memory");
    }
  }
  TORCH_CHECK_VALUE(cos.has_value() == sin.has_value(), op, ": pass both cos and sin or neither");
  if (cos.has_value()) check_rope_tables(k, "k", *cos, *sin, op);
}

void kv_write_cpu(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& start, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                  bool interleaved) {
  check_kv_write_args(cache_k, cache_v, k, v, start, cos, sin);
  const int64_t start_pos = start.item<int64_t>();  // a CPU tensor: reading it is no device sync
  const Tensor4 ck = describe4(cache_k), cv = describe4(cache_v), kd = describe4(k), vd = describe4(v);
  const int64_t heads = k.size(1), tokens = k.size(2), slots = cache_k.size(2);
  const int64_t key_dim = k.size(3), half_dim = key_dim / 2, value_dim = v.size(3);
  const bool rotate = cos.has_value();
  const Tensor2 cos_desc = rotate ? describe2(*cos) : Tensor2{}, sin_desc = rotate ? describe2(*sin) : Tensor2{};
  const at::ScalarType table_type = rotate ? cos->scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "kv_write_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    AT_DISPATCH_FLOATING_TYPES(table_type, "kv_write_cpu_tables", [&] {
      using TableT = scalar_t;
      T* cache_k_ptr = cache_k.mutable_data_ptr<T>();
      T* cache_v_ptr = cache_v.mutable_data_ptr<T>();
      const T* k_ptr = k.const_data_ptr<T>();
      const T* v_ptr = v.const_data_ptr<T>();
      const TableT* cos_ptr = rotate ? cos->const_data_ptr<TableT>() : nullptr;
      const TableT* sin_ptr = rotate ? sin->const_data_ptr<TableT>() : nullptr;
      at::parallel_for(0, k.size(0) * heads * tokens, 64, [&](int64_t row_begin, int64_t row_end) {
        for (int64_t row = row_begin; row < row_end; ++row) {
          const int64_t token = row % tokens, h = (row / tokens) % heads, b = row / (tokens * heads);
          const int64_t slot = floor_mod(start_pos + token, slots);
          const T* k_row = k_ptr + kd.offset(b, h, token, 0);
          T* cache_k_row = cache_k_ptr + ck.offset(b, h, slot, 0);
          if (rotate) {
            for (int64_t pair = 0; pair < half_dim; ++pair) {
              rope_rotate_pair(
                  pair, half_dim, interleaved, static_cast<Acc>(cos_ptr[cos_desc.offset(token, pair)]),
                  static_cast<Acc>(sin_ptr[sin_desc.offset(token, pair)]),
                  [&](int64_t d) { return static_cast<Acc>(k_row[d * kd.stride[3]]); },
                  [&](int64_t d, Acc y) { cache_k_row[d * ck.stride[3]] = static_cast<T>(y); });
            }
          } else {
            for (int64_t d = 0; d < key_dim; ++d) cache_k_row[d * ck.stride[3]] = k_row[d * kd.stride[3]];
          }
          for (int64_t d = 0; d < value_dim; ++d) {
            cache_v_ptr[cv.offset(b, h, slot, d)] = v_ptr[vd.offset(b, h, token, d)];
          }
        }
      });
    });
  });
}

}  // namespace fastdistill
