// Rotary position embedding math, torch-free, shared by rope_cpu.cpp, kv_write_cpu.cpp and the CUDA
// kernels so CPU and GPU rotate with the same formula.
//
// A head of dim D holds D/2 rotation pairs. Pair p of token l is rotated by the angle whose cosine and
// sine are cos[l, p] and sin[l, p]:
//   interleaved (GPT-J, Wan): pair p = (x[2p], x[2p+1])
//   half-split  (GPT-NeoX):   pair p = (x[p],  x[p + D/2])
#pragma once

#include "common/device_math.h"

namespace fastdistill {

// Element indices of rotation pair `pair` in a head of `half_dim` = D/2 pairs.
FD_HOST_DEVICE void rope_pair_dims(int64_t pair, int64_t half_dim, bool interleaved, int64_t& d1, int64_t& d2) {
  if (interleaved) {
    d1 = 2 * pair;
    d2 = 2 * pair + 1;
  } else {
    d1 = pair;
    d2 = pair + half_dim;
  }
}

// (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), in the accumulation type `Acc`.
template <typename Acc>
FD_HOST_DEVICE void rope_rotate(Acc x1, Acc x2, Acc c, Acc s, Acc& y1, Acc& y2) {
  y1 = x1 * c - x2 * s;
  y2 = x1 * s + x2 * c;
}

}  // namespace fastdistill
