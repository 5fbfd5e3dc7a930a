// CUDA rotary embedding: out = rope(x, cos, sin). Math shared with the CPU path (rope/rope.h).
#include <type_traits>

#include "common/cuda_dispatch.cuh"
#include "cuda_launchers.h"
#include "rope/rope.h"

namespace fastdistill {
namespace {

// One work item per rotation pair of one token of one head: B * H * L * D/2 items. Strided indexing
// so BSHD tensors viewed as BHSD are read in place.
template <typename T, typename TableT>
__global__ void rope_kernel(const T* __restrict__ x, Tensor4 x_desc, const TableT* __restrict__ cos, Tensor2 cos_desc,
                            const TableT* __restrict__ sin, Tensor2 sin_desc, T* __restrict__ out, Tensor4 out_desc,
                            bool interleaved, int64_t num_items) {
  using Acc = typename AccType<T>::type;
  const int64_t half_dim = x_desc.size[3] / 2, length = x_desc.size[2], heads = x_desc.size[1];
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < num_items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pair = item % half_dim;
    const int64_t token = (item / half_dim) % length;
    const int64_t bh = item / (half_dim * length);
    const int64_t h = bh % heads, b = bh / heads;
    int64_t d1, d2;
    rope_pair_dims(pair, half_dim, interleaved, d1, d2);
    const Acc c = static_cast<Acc>(cos[cos_desc.offset(token, pair)]);
    const Acc s = static_cast<Acc>(sin[sin_desc.offset(token, pair)]);
    Acc y1, y2;
    rope_rotate(static_cast<Acc>(x[x_desc.offset(b, h, token, d1)]), static_cast<Acc>(x[x_desc.offset(b, h, token, d2)]),
                c, s, y1, y2);
    out[out_desc.offset(b, h, token, d1)] = static_cast<T>(y1);
    out[out_desc.offset(b, h, token, d2)] = static_cast<T>(y2);
  }
}

}  // namespace

cudaError_t launch_rope(ScalarKind x_kind, ScalarKind table_kind, const void* x, const Tensor4& x_desc,
                        const void* cos, const Tensor2& cos_desc, const void* sin, const Tensor2& sin_desc, void* out,
                        const Tensor4& out_desc, bool interleaved, cudaStream_t stream) {
  const int64_t num_items = x_desc.size[0] * x_desc.size[1] * x_desc.size[2] * (x_desc.size[3] / 2);
  if (num_items == 0) return cudaSuccess;
  return dispatch_element_type(x_kind, [&](auto x_tag) {
    using T = std::remove_pointer_t<decltype(x_tag)>;
    return dispatch_table_type(table_kind, [&](auto table_tag) {
      using TableT = std::remove_pointer_t<decltype(table_tag)>;
      rope_kernel<T, TableT><<<grid_blocks(num_items), kThreadsPerBlock, 0, stream>>>(
          static_cast<const T*>(x), x_desc, static_cast<const TableT*>(cos), cos_desc,
          static_cast<const TableT*>(sin), sin_desc, static_cast<T*>(out), out_desc, interleaved, num_items);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastdistill
