// Device helpers shared by the multi-adapter kernels (multi_*_kernels.cu). CUDA headers only.
//
// Work is cut into token tiles of one adapter each. Grouped mode (T > kUngroupedMaxT): a tile
// is <= kBM tokens of one adapter, taken from the device-side stable sort (perm + segment/tile
// offsets in ws). Ungrouped mode: block i serves token i's adapter if i is that adapter's first
// token, with all of its tokens (<= kUngroupedMaxT, ascending), and exits otherwise.
// Every tile of an adapter with <= kSkinny tokens in the batch runs a streaming (GEMV) path;
// an adapter with more runs a TF32 tensor-core path (wmma m16n16k8, fp32 accumulation; sm_80+,
// else the streaming path in groups of kSkinny tokens) whose operands are staged as fp32 in
// shared memory: 16-bit inputs are exact in TF32, fp32 operands are split into hi + lo TF32
// parts (3 products, ~fp32 accuracy). The path depends only on that count, and the split-K
// chunks only on `in`, so a token's bits do not depend on its position or on the other
// adapters in the batch, and the results are the same on every run.
#pragma once
#include <mma.h>

#include "common.cuh"
#include "launch.h"

namespace lora_ext::cuda::multi {

constexpr int kThreads = 128;          // 4 warps per block
constexpr int kBM = 64;                // tokens per tile (16 per warp in the mma path)
constexpr int kBK = 32;                // K step of the mma tiles
constexpr int kLd = kBK + 4;           // smem row stride (floats) of the operand tiles
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

// dst[row * kLd + c] = row_ptr(row)[k0 + c] as fp32 for row < ROWS, c < kBK; zero where
// row >= nrows or k0 + c >= kend. With V > 1 the row pointers and k0 are V-aligned and a
// vector never passes the end of the row storage (the caller checked), only kend.
// All of a thread's global loads are issued before its shared-memory stores.
template <class T, int V, int ROWS, class RowPtr>
__device__ __forceinline__ void load_tile(float* dst, RowPtr row_ptr, int nrows, int64_t k0,
                                          int64_t kend) {
  constexpr int kPerRow = kBK / V, kN = ROWS * kPerRow;
  constexpr int kIters = (kN + kThreads - 1) / kThreads;
  constexpr int kBatch = kIters < 4 ? kIters : 4;  // loads in flight per thread (<= 16 floats)
#pragma unroll
  for (int b0 = 0; b0 < kIters; b0 += kBatch) {
    float v[kBatch][V];
#pragma unroll
    for (int ib = 0; ib < kBatch; ++ib) {
      const int e = threadIdx.x + (b0 + ib) * kThreads;
      const int row = e / kPerRow, col = (e % kPerRow) * V;
      const int64_t gk = k0 + col;
      if (b0 + ib < kIters && e < kN && row < nrows && gk < kend) {
        load_f32<T, V>(row_ptr(row) + gk, v[ib]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[ib][i] = 0.f;
      }
    }
#pragma unroll
    for (int ib = 0; ib < kBatch; ++ib) {
      const int e = threadIdx.x + (b0 + ib) * kThreads;
      const int row = e / kPerRow, col = (e % kPerRow) * V;
      if (b0 + ib < kIters && e < kN) {
#pragma unroll
        for (int i = 0; i < V; ++i)
          dst[row * kLd + col + i] = k0 + col + i < kend ? v[ib][i] : 0.f;
      }
    }
  }
}

using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;

// The TF32 wmma shape exists from sm_80 on: device code compiled for older archs (a
// TORCH_CUDA_ARCH_LIST with 7.x) leaves the tensor-core tiles out, and the launchers never
// request them from such an image (tf32_mma_compiled(), checked at run time).
#if defined(LORA_EXT_EMU) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LORA_EXT_TF32_MMA 1
#else
#define LORA_EXT_TF32_MMA 0
#endif

#if LORA_EXT_TF32_MMA
// hi + lo TF32 parts of an fp32 operand. tf32(v) rounds a finite |v| >= 0x1.ffffep127 up to
// inf, and v - hi is NaN for v = +-inf: such a v would turn its row / column into NaN where the
// sum is finite (or +-inf). Those take the truncated v (or v itself) as hi and no lo part.
// (An infinite operand still meets the other side's lo part when that one is fp32 too, and
// inf * 0 is NaN there: with 16-bit x/A/B, +-inf now comes out as on the CPU.)
__device__ __forceinline__ void split_tf32(float v, float& hi, float& lo) {
  const uint32_t b = __float_as_uint(v);
  if ((b & 0x7F800000u) == 0x7F800000u) {  // inf / NaN: as it is
    hi = v;
    lo = 0.f;
    return;
  }
  hi = nvcuda::wmma::__float_to_tf32(v);
  if ((__float_as_uint(hi) & 0x7FFFFFFFu) == 0x7F800000u) hi = __uint_as_float(b & 0xFFFFE000u);
  lo = nvcuda::wmma::__float_to_tf32(v - hi);
}
#endif

// acc[c] += Xs[16 rows, kBK] * Ws[16c .. 16c + 16 rows, kBK]^T (both row-major, stride kLd).
// SA / SB: split that operand into hi + lo TF32 parts (it is not exactly representable).
template <int NF, bool SA, bool SB>
__device__ __forceinline__ void mma_step(const float* Xs, const float* Ws, AccFrag (&acc)[NF]) {
#if defined(LORA_EXT_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
#pragma unroll 1
  for (int kk = 0; kk < kBK; kk += 8) {  // not unrolled: bounds the live fragments
    FragA ah, al;
    wmma::load_matrix_sync(ah, Xs + kk, kLd);
#pragma unroll
    for (int i = 0; i < ah.num_elements; ++i) {
      if constexpr (SA) {
        split_tf32(ah.x[i], ah.x[i], al.x[i]);
      } else {
        ah.x[i] = wmma::__float_to_tf32(ah.x[i]);
      }
    }
#pragma unroll
    for (int c = 0; c < NF; ++c) {
      FragB bh, bl;
      wmma::load_matrix_sync(bh, Ws + c * 16 * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < bh.num_elements; ++i) {
        if constexpr (SB) {
          split_tf32(bh.x[i], bh.x[i], bl.x[i]);
        } else {
          bh.x[i] = wmma::__float_to_tf32(bh.x[i]);
        }
      }
      wmma::mma_sync(acc[c], ah, bh, acc[c]);
      if constexpr (SA) wmma::mma_sync(acc[c], al, bh, acc[c]);
      if constexpr (SB) wmma::mma_sync(acc[c], ah, bl, acc[c]);
    }
  }
#else
  __trap();  // tensor-core tiles need sm_80+ (the launcher never sends them here)
#endif
}

// Host: the two halves, each dispatching on dtype and vector width.
void launch_shrink(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, bool count_bad,
                   cudaStream_t s);
void launch_expand(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int64_t ksplit,
                   bool count_bad, cudaStream_t s);

}  // namespace lora_ext::cuda::multi
