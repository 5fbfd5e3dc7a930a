// CUDA rotary embedding: out = rope(x, cos, sin). Math shared with the CPU path (rope/rope.h).
#include <type_traits>

#include "common/cuda_dispatch.cuh"
#include "cuda_launchers.h"
#include "rope/rope.h"

namespace fastdistill {
namespace {

// One block per (token, head, batch) row; thread t rotates pairs t, t + blockDim.x, ... Strided
// indexing, so BSHD tensors viewed as BHSD are read in place.
template <typename T, typename TableT>
__global__ void rope_kernel(const T* __restrict__ x, Tensor4 x_desc, const TableT* __restrict__ cos, Tensor2 cos_desc,
                            const TableT* __restrict__ sin, Tensor2 sin_desc, T* __restrict__ out, Tensor4 out_desc,
                            bool interleaved) {
  using Acc = typename AccType<T>::type;
  const int64_t token = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t half_dim = x_desc.size[3] / 2;
  const T* x_row = x + x_desc.offset(b, h, token, 0);
  T* out_row = out + out_desc.offset(b, h, token, 0);
  for (int64_t pair = threadIdx.x; pair < half_dim; pair += blockDim.x) {
    rope_rotate_pair(
        pair, half_dim, interleaved, static_cast<Acc>(cos[cos_desc.offset(token, pair)]),
        static_cast<Acc>(sin[sin_desc.offset(token, pair)]), [&](int64_t d) { return to_acc(x_row[d * x_desc.stride[3]]); },
        [&](int64_t d, Acc y) { out_row[d * out_desc.stride[3]] = from_acc<T>(y); });
  }
}

}  // namespace

cudaError_t launch_rope(ScalarKind x_kind, ScalarKind table_kind, const void* x, const Tensor4& x_desc,
                        const void* cos, const Tensor2& cos_desc, const void* sin, const Tensor2& sin_desc, void* out,
                        const Tensor4& out_desc, bool interleaved, cudaStream_t stream) {
  if (x_desc.size[0] * x_desc.size[1] * x_desc.size[2] * x_desc.size[3] == 0) return cudaSuccess;
  return dispatch_element_type(x_kind, [&](auto x_tag) {
    using T = std::remove_pointer_t<decltype(x_tag)>;
    return dispatch_table_type(table_kind, [&](auto table_tag) {
      using TableT = std::remove_pointer_t<decltype(table_tag)>;
      rope_kernel<T, TableT>
          <<<row_grid(x_desc.size[0], x_desc.size[1], x_desc.size[2]), row_block(x_desc.size[3] / 2), 0, stream>>>(
              static_cast<const T*>(x), x_desc, static_cast<const TableT*>(cos), cos_desc,
              static_cast<const TableT*>(sin), sin_desc, static_cast<T*>(out), out_desc, interleaved);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastdistill
