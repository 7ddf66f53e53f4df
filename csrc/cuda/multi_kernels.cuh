// Device helpers shared by the multi-adapter kernels (multi_*_kernels.cu). CUDA headers only.
//
// Work is cut into token tiles of one adapter each. Grouped mode (T > kUngroupedMaxT): a tile
// is <= kBM tokens of one adapter, taken from the device-side stable sort (perm + segment/tile
// offsets in ws). Ungrouped mode: block i serves token i's adapter if i is that adapter's first
// token, with all of its tokens (<= kUngroupedMaxT, ascending), and exits otherwise.
// Every tile of an adapter with <= kSkinny tokens in the batch runs a streaming (GEMV) path;
// an adapter with more runs a TF32 tensor-core path (tf32_tiles.cuh; sm_80+, else the streaming
// path in groups of kSkinny tokens). The path depends only on that count, and the split-K
// chunks only on `in`, so a token's bits do not depend on its position or on the other
// adapters in the batch, and the results are the same on every run.
#pragma once
#include "launch.h"
#include "tf32_tiles.cuh"

namespace lora_ext::cuda::multi {

constexpr int kThreads = kTileThreads; // 4 warps per block
constexpr int kBM = 64;                // tokens per tile (16 per warp in the mma path)
constexpr int kSkinny = 8;             // tiles of <= kSkinny tokens stream instead
constexpr int kBNE = 64;               // output columns per expand tile
constexpr int64_t kUngroupedMaxT = 16; // up to this many tokens, no sort: one token per tile
constexpr int64_t kKAlign = 256;       // split-K chunks are multiples of this
constexpr int64_t kMaxSplits = 16;     // at most this many K chunks

__device__ __forceinline__ int64_t load_idx(const void* idx, bool idx64, int64_t t) {
  return idx64 ? static_cast<const int64_t*>(idx)[t] : static_cast<const int32_t*>(idx)[t];
}

// ranks are clamped into 0..r_max so that no value can make a kernel leave the pool.
__device__ __forceinline__ int64_t rank_of(const MultiLoraParams& p, int64_t sl, int64_t a) {
  const int64_t r = p.ranks[sl * p.slot_stride + a];
  return r < 0 ? 0 : (r > p.r_max ? p.r_max : r);
}

struct Tile {
  int64_t a;      // adapter slot
  int64_t start;  // grouped: position in perm; ungrouped: the adapter's first token
  int ntok;       // tokens in this tile
  bool tc;        // tensor-core path (the adapter has > kSkinny tokens, sm_80+)
};

// Maps token tile `tile` to its tokens; false when the block has no work (past the last tile,
// an ungrouped token that is not its adapter's first, or one without a valid adapter, which
// `count_bad` adds to p.bad once).
__device__ __forceinline__ bool resolve_tile(const MultiLoraParams& p, bool grouped, int64_t tile,
                                             bool count_bad, Tile& t) {
  if (!grouped) {
    const int64_t a = load_idx(p.idx, p.idx64, tile);
    if (a < 0 || a >= p.S) {
      if (count_bad && a != -1 && p.bad != nullptr && threadIdx.x == 0) atomicAdd(p.bad, 1);
      return false;
    }
    for (int64_t i = 0; i < tile; ++i)
      if (load_idx(p.idx, p.idx64, i) == a) return false;
    int n = 1;
    for (int64_t i = tile + 1; i < p.T; ++i) n += load_idx(p.idx, p.idx64, i) == a ? 1 : 0;
    t = {a, tile, n, p.tc && n > kSkinny};
    return true;
  }
  const int32_t* seg = p.ws + p.T;       // seg_off[S + 1]
  const int32_t* toff = seg + p.S + 1;   // tile_off[S + 1]
  if (tile >= toff[p.S]) return false;
  int64_t lo = 0, hi = p.S;  // toff[lo] <= tile < toff[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (toff[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t start = seg[lo] + (tile - toff[lo]) * kBM, count = seg[lo + 1] - seg[lo];
  t = {lo, start, static_cast<int>(min(static_cast<int64_t>(kBM), seg[lo + 1] - start)),
       p.tc && count > kSkinny};
  return true;
}

// Token ids of the tile into toks[0, ntok); the caller syncs.
__device__ __forceinline__ void load_tokens(const MultiLoraParams& p, bool grouped, const Tile& t,
                                            int64_t* toks) {
  if (grouped) {
    if (static_cast<int>(threadIdx.x) < t.ntok) toks[threadIdx.x] = p.ws[t.start + threadIdx.x];
  } else if (threadIdx.x == 0) {
    int q = 0;
    for (int64_t i = t.start; i < p.T; ++i)
      if (load_idx(p.idx, p.idx64, i) == t.a) toks[q++] = i;
  }
}

// Host: the two halves, each dispatching on dtype and vector width.
void launch_shrink(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, bool count_bad,
                   cudaStream_t s);
void launch_expand(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int64_t ksplit,
                   bool count_bad, cudaStream_t s);

}  // namespace lora_ext::cuda::multi
