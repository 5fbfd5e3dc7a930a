// CUDA ring-buffer write with fused RoPE: rotates k (when tables are given) and writes k, v into the
// cache at slots (start + i) mod S. One kernel for both tensors; the start position may live on the
// device, so a whole cache step can be captured in a CUDA graph.
#include <type_traits>

#include "common/cuda_dispatch.cuh"
#include "cuda_launchers.h"
#include "rope/rope.h"

namespace fastdistill {
namespace {

// One block per (token, head, batch) row of the new tokens. A row's work items are its key items
// (D/2 rotation pairs with tables, D elements without, when D may be odd) followed by its Dv value
// elements; thread t takes items t, t + blockDim.x, ...
template <typename T, typename TableT>
__global__ void kv_write_kernel(T* __restrict__ cache_k, Tensor4 cache_k_desc, T* __restrict__ cache_v,
                                Tensor4 cache_v_desc, const T* __restrict__ k, Tensor4 k_desc, const T* __restrict__ v,
                                Tensor4 v_desc, const void* start_ptr, bool start_is_int32, int64_t start_value,
                                const TableT* __restrict__ cos, Tensor2 cos_desc, const TableT* __restrict__ sin,
                                Tensor2 sin_desc, bool interleaved) {
  using Acc = typename AccType<T>::type;
  int64_t start = start_value;
  if (start_ptr != nullptr) {
    start = start_is_int32 ? static_cast<int64_t>(*static_cast<const int32_t*>(start_ptr))
                           : *static_cast<const int64_t*>(start_ptr);
  }
  const int64_t token = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t slot = floor_mod(start + token, cache_k_desc.size[2]);
  const int64_t key_dim = k_desc.size[3], half_dim = key_dim / 2;
  const bool rotate = cos != nullptr;
  const int64_t key_items = rotate ? half_dim : key_dim;
  const int64_t row_items = key_items + v_desc.size[3];
  const T* k_row = k + k_desc.offset(b, h, token, 0);
  T* cache_k_row = cache_k + cache_k_desc.offset(b, h, slot, 0);
  for (int64_t item = threadIdx.x; item < row_items; item += blockDim.x) {
    if (item >= key_items) {
      const int64_t d = item - key_items;
      cache_v[cache_v_desc.offset(b, h, slot, d)] = v[v_desc.offset(b, h, token, d)];
    } else if (rotate) {
      rope_rotate_pair(
          item, half_dim, interleaved, static_cast<Acc>(cos[cos_desc.offset(token, item)]),
          static_cast<Acc>(sin[sin_desc.offset(token, item)]), [&](int64_t d) { return to_acc(k_row[d * k_desc.stride[3]]); },
          [&](int64_t d, Acc y) { cache_k_row[d * cache_k_desc.stride[3]] = from_acc<T>(y); });
    } else {
      cache_k_row[item * cache_k_desc.stride[3]] = k_row[item * k_desc.stride[3]];
    }
  }
}

}  // namespace

cudaError_t launch_kv_write(ScalarKind kind, ScalarKind table_kind, void* cache_k, const Tensor4& cache_k_desc,
                            void* cache_v, const Tensor4& cache_v_desc, const void* k, const Tensor4& k_desc,
                            const void* v, const Tensor4& v_desc, const void* start_ptr, bool start_is_int32,
                            int64_t start_value, const void* cos, const Tensor2& cos_desc, const void* sin,
                            const Tensor2& sin_desc, bool interleaved, cudaStream_t stream) {
  if (k_desc.size[0] * k_desc.size[1] * k_desc.size[2] == 0) return cudaSuccess;
  const int64_t row_items = (cos != nullptr ? k_desc.size[3] / 2 : k_desc.size[3]) + v_desc.size[3];
  return dispatch_element_type(kind, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // Without tables the table type is irrelevant; instantiate with float.
    return dispatch_table_type(cos != nullptr ? table_kind : ScalarKind::Float32, [&](auto table_tag) {
      using TableT = std::remove_pointer_t<decltype(table_tag)>;
      kv_write_kernel<T, TableT>
          <<<row_grid(k_desc.size[0], k_desc.size[1], k_desc.size[2]), row_block(row_items), 0, stream>>>(
              static_cast<T*>(cache_k), cache_k_desc, static_cast<T*>(cache_v), cache_v_desc, static_cast<const T*>(k),
              k_desc, static_cast<const T*>(v), v_desc, start_ptr, start_is_int32, start_value,
              static_cast<const TableT*>(cos), cos_desc, static_cast<const TableT*>(sin), sin_desc, interleaved);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastdistill
