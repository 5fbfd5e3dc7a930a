// Tile classification and list building for attention tile schedules, torch-free, shared by the CPU
// builder (schedule_cpu.cpp) and the CUDA builder (schedule_cuda.cu) so both produce identical lists.
//
// A schedule splits the (Lq x Lk) score matrix into tiles of block_m query rows by block_n key columns.
// Each tile is
//   empty   - no in-bounds (q, k) pair is allowed: never visited;
//   partial - some but not all in-bounds pairs are allowed: visited with the element predicate;
//   full    - every in-bounds pair is allowed: visited without element masking.
// Pairs beyond Lq or Lk do not exist; the kernels mask sequence bounds separately.
//
// Output layout for a mask broadcast over [Bm, Hm] (1 for masks that do not vary with batch/head):
//   kv_count [Bm, Hm, nQ]      int32  key tiles visited by query tile i
//   kv_index [Bm, Hm, nQ, nK]  int32  their indices, ascending, padded with -1
//   kv_full  [Bm, Hm, nQ, nK]  bool   whether each listed tile is full (false in the padding)
//   q_count, q_index, q_full   the same transposed (per key tile, its query tiles), for dK/dV.
#pragma once

#include "common/device_math.h"

namespace fastdistill {

enum TileKind : int32_t { kTileEmpty = 0, kTilePartial = 1, kTileFull = 2 };

// Chunk-causal mask on absolute positions pq = q_offset + i, pk = kv_offset + j, with
// end(p) = (p // chunk_size + 1) * chunk_size:
//   allowed(pq, pk) = (pk < end(pq) and (no window or pk >= end(pq) - window)) or pk < sink.
// `causal` is chunk_size = 1; a sliding window alone is chunk_size = 1 with a window.
struct ChunkCausalParams {
  int64_t lq, lk, block_m, block_n;
  int64_t chunk_size;
  int64_t window;  // < 0: no window
  int64_t sink;
  int64_t q_offset, kv_offset;
};

FD_HOST_DEVICE int64_t chunk_end(int64_t pos, int64_t chunk_size) { return (floor_div(pos, chunk_size) + 1) * chunk_size; }

// O(1) per tile: end(p) is a non-decreasing step function of p that takes every multiple of
// chunk_size between end(q_first) and end(q_last), and for a row the allowed non-sink keys are the
// interval [end(p) - window, end(p)).
FD_HOST_DEVICE int32_t classify_chunk_causal_tile(const ChunkCausalParams& p, int64_t q_tile, int64_t k_tile) {
  const int64_t i_last = (q_tile + 1) * p.block_m < p.lq ? (q_tile + 1) * p.block_m : p.lq;
  const int64_t j_last = (k_tile + 1) * p.block_n < p.lk ? (k_tile + 1) * p.block_n : p.lk;
  const int64_t q_first = p.q_offset + q_tile * p.block_m, q_last = p.q_offset + i_last - 1;
  const int64_t k_first = p.kv_offset + k_tile * p.block_n, k_last = p.kv_offset + j_last - 1;
  const int64_t end_first = chunk_end(q_first, p.chunk_size), end_last = chunk_end(q_last, p.chunk_size);
  const bool has_window = p.window >= 0;

  // Some row p sees some key of the tile iff end(p) lies in [k_first + 1, k_last + window] (the key
  // interval [end - window, end) meets [k_first, k_last]); sink keys are seen by every row.
  bool any = k_first < p.sink;
  if (!any) {
    if (!has_window) {
      any = end_last > k_first;
    } else {
      const int64_t lo = end_first > k_first + 1 ? end_first : k_first + 1;
      const int64_t hi = end_last < k_last + p.window ? end_last : k_last + p.window;
      const int64_t first_multiple = (floor_div(lo - 1, p.chunk_size) + 1) * p.chunk_size;  // >= lo
      any = first_multiple <= hi;
    }
  }
  if (!any) return kTileEmpty;

  // Full iff every non-sink key [max(k_first, sink), k_last] lies in every row's interval: the
  // earliest row's end is past k_last and the latest row's window start is at or before the first key.
  const int64_t k_first_non_sink = k_first > p.sink ? k_first : p.sink;
  const bool full = k_first_non_sink > k_last ||
                    (end_first > k_last && (!has_window || end_last - p.window <= k_first_non_sink));
  return full ? kTileFull : kTilePartial;
}

// Block-boolean mask: allowed(i, j) = mask[b, h, i // mask_block_q, j // mask_block_k]. The kernel tile
// size need not equal the mask block size: a tile is classified over every mask block it overlaps
// (restricted to in-bounds rows and columns).
struct BlockMaskParams {
  int64_t lq, lk, block_m, block_n;
  int64_t mask_block_q, mask_block_k;
  int64_t mask_batch, mask_heads;  // Bm, Hm
  int64_t stride[4];               // element strides of the mask [Bm, Hm, nQb, nKb]
};

FD_HOST_DEVICE int32_t classify_block_mask_tile(const BlockMaskParams& p, const bool* mask, int64_t bh, int64_t q_tile,
                                                int64_t k_tile) {
  const int64_t b = bh / p.mask_heads, h = bh % p.mask_heads;
  const bool* mask_bh = mask + b * p.stride[0] + h * p.stride[1];
  const int64_t i_last = ((q_tile + 1) * p.block_m < p.lq ? (q_tile + 1) * p.block_m : p.lq) - 1;
  const int64_t j_last = ((k_tile + 1) * p.block_n < p.lk ? (k_tile + 1) * p.block_n : p.lk) - 1;
  bool any = false, all = true;
  for (int64_t bi = q_tile * p.block_m / p.mask_block_q; bi <= i_last / p.mask_block_q; ++bi) {
    for (int64_t bj = k_tile * p.block_n / p.mask_block_k; bj <= j_last / p.mask_block_k; ++bj) {
      const bool allowed = mask_bh[bi * p.stride[2] + bj * p.stride[3]];
      any = any || allowed;
      all = all && allowed;
    }
  }
  return !any ? kTileEmpty : (all ? kTileFull : kTilePartial);
}

// Writes one list of a schedule: for a fixed `outer` tile, the inner tiles that classify as non-empty,
// ascending, with their full flags; the rest of the row is padded with -1 / false. `classify(outer,
// inner)` returns a TileKind. One call per (b, h, query tile) builds kv lists; one call per
// (b, h, key tile) with a transposed classifier builds q lists.
template <typename Classify>
FD_HOST_DEVICE void build_tile_list(const Classify& classify, int64_t outer, int64_t num_inner, int32_t* count,
                                    int32_t* index, bool* full) {
  int32_t n = 0;
  for (int64_t inner = 0; inner < num_inner; ++inner) {
    const int32_t kind = classify(outer, inner);
    if (kind != kTileEmpty) {
      index[n] = static_cast<int32_t>(inner);
      full[n] = kind == kTileFull;
      ++n;
    }
  }
  for (int64_t i = n; i < num_inner; ++i) {
    index[i] = -1;
    full[i] = false;
  }
  *count = n;
}

// Output pointers of one schedule (contiguous tensors in the layout above).
struct ScheduleOutputs {
  int32_t* kv_count;
  int32_t* kv_index;
  bool* kv_full;
  int32_t* q_count;
  int32_t* q_index;
  bool* q_full;
};

// Builds list number `item` of a schedule with `num_bh` = Bm * Hm mask slices: items
// [0, num_bh * nQ) are kv lists, the rest q lists. `classify(bh, q_tile, k_tile)` returns a TileKind.
// The CPU builder runs items in a parallel loop, the CUDA builder one item per thread.
template <typename Classify>
FD_HOST_DEVICE void build_schedule_item(const Classify& classify, int64_t item, int64_t num_bh, int64_t num_q_tiles,
                                        int64_t num_k_tiles, const ScheduleOutputs& out) {
  if (item < num_bh * num_q_tiles) {
    const int64_t bh = item / num_q_tiles, q_tile = item % num_q_tiles;
    auto row = [&](int64_t qt, int64_t kt) { return classify(bh, qt, kt); };
    build_tile_list(row, q_tile, num_k_tiles, out.kv_count + item, out.kv_index + item * num_k_tiles,
                    out.kv_full + item * num_k_tiles);
  } else {
    const int64_t col = item - num_bh * num_q_tiles;
    const int64_t bh = col / num_k_tiles, k_tile = col % num_k_tiles;
    auto column = [&](int64_t kt, int64_t qt) { return classify(bh, qt, kt); };
    build_tile_list(column, k_tile, num_q_tiles, out.q_count + col, out.q_index + col * num_q_tiles,
                    out.q_full + col * num_q_tiles);
  }
}

}  // namespace fastdistill
