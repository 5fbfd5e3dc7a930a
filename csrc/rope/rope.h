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

// Rotates pair `pair` of one head of `half_dim` = D/2 pairs by the angle with cosine c and sine s:
// (x1, x2) -> (x1 c - x2 s, x1 s + x2 c) in the accumulation type Acc. `load(d)` returns element d of
// the input row as Acc and `store(d, y)` writes element d of the output row, so each caller keeps
// its own addressing and conversions while the pair layout and the formula live here only.
template <typename Acc, typename Load, typename Store>
FD_HOST_DEVICE void rope_rotate_pair(int64_t pair, int64_t half_dim, bool interleaved, Acc c, Acc s, const Load& load,
                                     const Store& store) {
  const int64_t d1 = interleaved ? 2 * pair : pair;
  const int64_t d2 = interleaved ? 2 * pair + 1 : pair + half_dim;
  const Acc x1 = load(d1), x2 = load(d2);
  store(d1, x1 * c - x2 * s);
  store(d2, x1 * s + x2 * c);
}

}  // namespace fastdistill
