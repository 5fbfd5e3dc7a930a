// CUDA ring-buffer write with fused RoPE: rotates k (when tables are given) and writes k, v into the
// cache at slots (start + i) mod S. One kernel for both tensors; the start position may live on the
// device, so a whole cache step can be captured in a CUDA graph.
#include <type_traits>

#include "common/cuda_dispatch.cuh"
#include "cuda_launchers.h"
#include "rope/rope.h"

namespace fastdistill {
namespace {

// Work items: the key items of every row first (D/2 rotation pairs, or D elements without tables),
// then B * H * n * Dv value elements.
template <typename T, typename TableT>
__global__ void kv_write_kernel(T* __restrict__ cache_k, Tensor4 cache_k_desc, T* __restrict__ cache_v,
                                Tensor4 cache_v_desc, const T* __restrict__ k, Tensor4 k_desc, const T* __restrict__ v,
                                Tensor4 v_desc, const void* start_ptr, bool start_is_int32, int64_t start_value,
                                const TableT* __restrict__ cos, Tensor2 cos_desc, const TableT* __restrict__ sin,
                                Tensor2 sin_desc, bool interleaved, int64_t num_key_items, int64_t num_items) {
  using Acc = typename AccType<T>::type;
  int64_t start = start_value;
  if (start_ptr != nullptr) {
    start = start_is_int32 ? static_cast<int64_t>(*static_cast<const int32_t*>(start_ptr))
                           : *static_cast<const int64_t*>(start_ptr);
  }
  const int64_t heads = k_desc.size[1], tokens = k_desc.size[2], slots = cache_k_desc.size[2];
  const int64_t key_dim = k_desc.size[3], value_dim = v_desc.size[3];
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < num_items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (item < num_key_items) {
      // With tables an item is a rotation pair; without, one element (D may then be odd).
      const int64_t per_row = cos != nullptr ? key_dim / 2 : key_dim;
      const int64_t col = item % per_row;
      const int64_t token = (item / per_row) % tokens;
      const int64_t bh = item / (per_row * tokens);
      const int64_t h = bh % heads, b = bh / heads;
      const int64_t slot = floor_mod(start + token, slots);
      if (cos != nullptr) {
        int64_t d1, d2;
        rope_pair_dims(col, key_dim / 2, interleaved, d1, d2);
        Acc y1, y2;
        rope_rotate(static_cast<Acc>(k[k_desc.offset(b, h, token, d1)]), static_cast<Acc>(k[k_desc.offset(b, h, token, d2)]),
                    static_cast<Acc>(cos[cos_desc.offset(token, col)]), static_cast<Acc>(sin[sin_desc.offset(token, col)]),
                    y1, y2);
        cache_k[cache_k_desc.offset(b, h, slot, d1)] = static_cast<T>(y1);
        cache_k[cache_k_desc.offset(b, h, slot, d2)] = static_cast<T>(y2);
      } else {
        cache_k[cache_k_desc.offset(b, h, slot, col)] = k[k_desc.offset(b, h, token, col)];
      }
    } else {
      const int64_t value_item = item - num_key_items;
      const int64_t d = value_item % value_dim;
      const int64_t token = (value_item / value_dim) % tokens;
      const int64_t bh = value_item / (value_dim * tokens);
      const int64_t h = bh % heads, b = bh / heads;
      const int64_t slot = floor_mod(start + token, slots);
      cache_v[cache_v_desc.offset(b, h, slot, d)] = v[v_desc.offset(b, h, token, d)];
    }
  }
}

}  // namespace

cudaError_t launch_kv_write(ScalarKind kind, ScalarKind table_kind, void* cache_k, const Tensor4& cache_k_desc,
                            void* cache_v, const Tensor4& cache_v_desc, const void* k, const Tensor4& k_desc,
                            const void* v, const Tensor4& v_desc, const void* start_ptr, bool start_is_int32,
                            int64_t start_value, const void* cos, const Tensor2& cos_desc, const void* sin,
                            const Tensor2& sin_desc, bool interleaved, cudaStream_t stream) {
  const int64_t rows = k_desc.size[0] * k_desc.size[1] * k_desc.size[2];
  const int64_t num_key_items = rows * (cos != nullptr ? k_desc.size[3] / 2 : k_desc.size[3]);
  const int64_t num_items = num_key_items + rows * v_desc.size[3];
  if (num_items == 0) return cudaSuccess;
  return dispatch_element_type(kind, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // Without tables the table type is irrelevant; instantiate with float.
    return dispatch_table_type(cos != nullptr ? table_kind : ScalarKind::Float32, [&](auto table_tag) {
      using TableT = std::remove_pointer_t<decltype(table_tag)>;
      kv_write_kernel<T, TableT><<<grid_blocks(num_items), kThreadsPerBlock, 0, stream>>>(
          static_cast<T*>(cache_k), cache_k_desc, static_cast<T*>(cache_v), cache_v_desc, static_cast<const T*>(k),
          k_desc, static_cast<const T*>(v), v_desc, start_ptr, start_is_int32, start_value,
          static_cast<const TableT*>(cos), cos_desc, static_cast<const TableT*>(sin), sin_desc, interleaved,
          num_key_items, num_items);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastdistill
