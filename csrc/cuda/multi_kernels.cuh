// Device helpers shared by the multi-adapter kernels (multi_*_kernels.cu). CUDA headers only.
//
// Work is cut into token tiles of one adapter each. Grouped mode (T > kUngroupedMaxT): a tile
// is <= kBM tokens of one adapter, taken from the device-side stable sort (perm + tile records
// in ws). Ungrouped mode: block i serves token i's adapter if i is that adapter's first
// token, with all of its tokens (<= kUngroupedMaxT, ascending), and exits otherwise; with
// T <= kSkinny and r_max * in <= kFusedMaxWork multi_lora_ is one launch (every expand block
// computes u as the shrink would).
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
constexpr int kUChunk = 512;           // ranks of u staged per pass in the streaming expand
constexpr int64_t kUngroupedMaxT = 64; // up to this many tokens, no sort: one token per tile
constexpr int64_t kKAlign = 256;       // split-K chunks are multiples of this
constexpr int64_t kMaxSplits = 16;     // at most this many K chunks
// The fused decode repeats the shrink (r_max x in products per token) in each of its out / 64
// blocks, serially per block: on the H200 (2026-11-30, T = 1, in = out = 4096) it took 22 /
// 38 / 133 us at r = 8 / 16 / 64 against 9.3 / 9.4 / 15.4 us for shrink + expand, and under
// ncu 29 us at r = 4 (T = 4) against 16 us for the two. Beyond this much work per token (e.g.
// in = 1024 with r = 4, in = 256 with r = 16) the shrink runs as its own split-K launch.
constexpr int64_t kFusedMaxWork = 4096;

__device__ __forceinline__ int64_t load_idx(const void* idx, bool idx64, int64_t t) {
  return idx64 ? static_cast<const int64_t*>(idx)[t] : static_cast<const int32_t*>(idx)[t];
}

// ranks are clamped into 0..r_max so that no value can make a kernel leave the pool.
__device__ __forceinline__ int64_t rank_of(const MultiLoraParams& p, int64_t sl, int64_t a) {
  const int64_t r = p.ranks[sl * p.slot_stride + a];
  return r < 0 ? 0 : (r > p.r_max ? p.r_max : r);
}

// Grouped mode's int workspace (plan.ws_ints): one record per token tile {slot (-1 past the
// last tile), first position in perm, tokens, the slot's tokens in the batch}, then perm[T]
// (tokens sorted by slot, stable), then group_tokens' per-warp counts. A tile resolves with
// one round of loads.
__host__ __device__ __forceinline__ int64_t tile_bound(int64_t T, int64_t S) {
  return (T + kBM - 1) / kBM + (S < T ? S : T);
}
__device__ __forceinline__ const int32_t* perm_of(const MultiLoraParams& p) {
  return p.ws + 4 * tile_bound(p.T, p.S);
}

struct Tile {
  int64_t a;  // adapter slot
  int ntok;   // tokens in this tile
  bool tc;    // tensor-core path (the adapter has > kSkinny tokens, sm_80+)
};

// Maps token tile `tile` to its adapter and writes its token ids to toks[0, ntok) (the caller
// syncs); false when the block has no work (past the last tile, an ungrouped token that is not
// its adapter's first, or one without a valid adapter, which `count_bad` adds to p.bad once).
// Ungrouped, every warp reads the T <= 64 indices at once (lane i tokens i and 32 + i) and
// finds the adapter's tokens with two ballots. All threads call it.
static_assert(kUngroupedMaxT <= 64 && kUngroupedMaxT <= kBM,
              "ungrouped: two warp ballots find an adapter's tokens, all in one tile");
__device__ __forceinline__ bool resolve_tile(const MultiLoraParams& p, bool grouped, int64_t tile,
                                             bool count_bad, Tile& t, int64_t* toks) {
  const int i = threadIdx.x;
  if (!grouped) {
    const int lane = i & 31;
    int mine[2];  // the lane's tokens' slots: -1 for index -1 and past T, -2 for a bad index
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tok = lane + 32 * h;
      const int64_t v = tok < p.T ? load_idx(p.idx, p.idx64, tok) : -1;
      mine[h] = v >= 0 && v < p.S ? static_cast<int>(v) : v == -1 ? -1 : -2;
    }
    const int ti = static_cast<int>(tile);
    const int a = __shfl_sync(0xffffffffu, ti < 32 ? mine[0] : mine[1], ti & 31);
    const unsigned lo = __ballot_sync(0xffffffffu, mine[0] == a),
                   hi = __ballot_sync(0xffffffffu, mine[1] == a);  // tokens 0-31, 32-63 of a
    if (a < 0) {
      if (count_bad && a == -2 && p.bad != nullptr && i == 0) atomicAdd(p.bad, 1);
      return false;
    }
    const auto below = [](unsigned m, int b) {  // m's bits below b
      return b <= 0 ? 0u : b >= 32 ? m : m & ((1u << b) - 1u);
    };
    if (below(lo, ti) != 0 || below(hi, ti - 32) != 0) return false;  // not a's first token
    const int n = __popc(lo) + __popc(hi);
    if (i < 64 && ((i < 32 ? lo : hi) >> (i & 31) & 1u))  // after a's earlier tokens
      toks[__popc(below(lo, i)) + __popc(below(hi, i - 32))] = i;
    t = {a, n, p.tc && n > kSkinny};
    return true;
  }
  const int32_t* rec = p.ws + 4 * tile;
  const int32_t a = rec[0], start = rec[1], n = rec[2], count = rec[3];
  if (a < 0) return false;
  if (i < n) toks[i] = perm_of(p)[start + i];
  t = {a, n, p.tc && count > kSkinny};
  return true;
}

// src[0] + src[zstride] + ... + src[(ksplit - 1) * zstride], added in that order (the bits of
// the plain loop), with the loads issued 8 at a time: split-K partials are summed by few
// threads per block, so a load-add chain would be ksplit memory latencies long.
__device__ __forceinline__ float sum_partials(const float* src, int64_t zstride, int64_t ksplit) {
  constexpr int kG = 8;
  float s = 0.f;
  for (int64_t z0 = 0; z0 < ksplit; z0 += kG) {
    float v[kG];
#pragma unroll
    for (int z = 0; z < kG; ++z) v[z] = z0 + z < ksplit ? src[(z0 + z) * zstride] : 0.f;
    s = z0 == 0 ? v[0] : s + v[0];
#pragma unroll
    for (int z = 1; z < kG; ++z)
      if (z0 + z < ksplit) s += v[z];
  }
  return s;
}

// The streaming (GEMV) shrink of one K chunk: acc[i][q] = this lane's share of A row ar[i] . x
// row xr[q] over k in [k0, k1) (lanes take V elements each, 32 V apart; q < nq), from 0. The
// warp's sum (warp_sum) of acc[i][q] is the chunk's partial: the shrink kernel writes it, the
// fused decode expand folds the chunks in order, both with the same bits.
// ROWS rank rows at a time (the sums do not depend on it: the shrink kernel takes kRows, the
// fused decode, short of registers, 2).
constexpr int kRows = 4;  // rank rows per warp and pass in the streaming shrink
template <class T, int V, int ROWS = kRows>
__device__ __forceinline__ void stream_chunk(const T* const (&ar)[ROWS], const T* const (&xr)[kSkinny],
                                             int nq, int64_t k0, int64_t k1,
                                             float (&acc)[ROWS][kSkinny]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < ROWS; ++i)
#pragma unroll
    for (int q = 0; q < kSkinny; ++q) acc[i][q] = 0.f;
#pragma unroll(sizeof(T) == 4 ? 1 : 2)
  for (int64_t k = k0 + lane * V; k < k1; k += 32 * V) {
    float av[ROWS][V];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) load_f32<T, V>(ar[i] + k, av[i]);
#pragma unroll
    for (int q = 0; q < kSkinny; ++q) {
      if (q < nq) {
        float xv[V];
        load_f32<T, V>(xr[q] + k, xv);
#pragma unroll
        for (int i = 0; i < ROWS; ++i)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[i][q] = fmaf(av[i][v], xv[v], acc[i][q]);
      }
    }
  }
}

// Host: the two halves, each dispatching on dtype and vector width.
void launch_shrink(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, bool count_bad,
                   cudaStream_t s);
// fused: the expand computes u itself (no shrink launch; ungrouped, u fits one staging pass).
void launch_expand(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int64_t ksplit,
                   bool count_bad, bool fused, cudaStream_t s);

}  // namespace lora_ext::cuda::multi
