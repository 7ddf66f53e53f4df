// TF32 tensor-core tiles shared by the tiled kernels (multi_*_kernels.cu, lowrank_tc_kernels.cu).
// CUDA headers only.
//
// Operands go through shared memory as fp32 row-major tiles of kBK columns (row stride kLd):
// 16-bit inputs are exact in TF32, fp32 operands are split into hi + lo TF32 parts (split_tf32;
// ~fp32 accuracy). Blocks have kTileThreads threads (4 warps); warp w multiplies its 16 rows by
// NF fragments of 16 columns (mma_step, wmma m16n16k8, fp32 accumulation).
#pragma once
#include <mma.h>

#include "common.cuh"

namespace lora_ext::cuda {

constexpr int kTileThreads = 128;  // 4 warps per block
constexpr int kBK = 32;            // K step of the tiles
constexpr int kLd = kBK + 4;       // smem row stride (floats) of the operand tiles

// keep() of a tile that is not masked.
struct Ones {
  __device__ __forceinline__ float operator()(int, int64_t) const { return 1.f; }
};

// A ROWS x kBK tile of T (or N of its thread's row groups, from it0 on; N = 0: all of them):
// fetch() issues the thread's global loads into registers, store() writes them to shared memory
// as fp32. Split so that a kernel can have the next K step's loads in flight during this step's
// MMAs. Elements with row >= nrows or k >= kend are zero. With V > 1 the row pointers and k0 are
// V-aligned and a vector never passes the end of the row storage (the caller checked), only kend.
template <class T, int V, int ROWS, int N = 0>
struct TileRegs {
  // a row takes kPerRow threads; thread t owns column (t % kPerRow) * V of rows
  // t / kPerRow + i * kRowStep (i < kIters)
  static constexpr int kPerRow = kBK / V, kRowStep = kTileThreads / kPerRow;
  static constexpr int kIters = (ROWS + kRowStep - 1) / kRowStep;
  static constexpr int kHeld = N == 0 || N > kIters ? kIters : N;
  float v[kHeld][V];

  __device__ __forceinline__ static int row0() { return threadIdx.x / kPerRow; }
  __device__ __forceinline__ static int col() { return (threadIdx.x % kPerRow) * V; }

  template <class RowPtr>
  __device__ __forceinline__ void fetch(RowPtr row_ptr, int nrows, int64_t k0, int64_t kend,
                                        int it0 = 0) {
    const bool kin = k0 + col() < kend;
#pragma unroll
    for (int it = 0; it < kHeld; ++it) {
      const int row = row0() + (it0 + it) * kRowStep;
      if (row < ROWS && row < nrows && kin) {
        load_f32<T, V>(row_ptr(row) + k0 + col(), v[it]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[it][i] = 0.f;
      }
    }
  }
  // dst[row * kLd + c] = keep(row, k0 + c) * value (keep: a 0/1 multiplier, e.g. a dropout mask).
  template <class Keep = Ones>
  __device__ __forceinline__ void store(float* dst, int64_t k0, int64_t kend, Keep keep = {},
                                        int it0 = 0) const {
#pragma unroll
    for (int it = 0; it < kHeld; ++it) {
      const int row = row0() + (it0 + it) * kRowStep;
      if (row < ROWS) {
#pragma unroll
        for (int i = 0; i < V; ++i)
          dst[row * kLd + col() + i] =
              k0 + col() + i < kend ? keep(row, k0 + col() + i) * v[it][i] : 0.f;
      }
    }
  }
};

// dst = the ROWS x kBK tile at row_ptr(row)[k0 ..] times keep(row, k), fetched and stored 4 row
// groups at a time (at most 4 loads in flight per thread, few registers; the caller syncs).
template <class T, int V, int ROWS, class RowPtr, class Keep = Ones>
__device__ __forceinline__ void load_tile(float* dst, RowPtr row_ptr, int nrows, int64_t k0,
                                          int64_t kend, Keep keep = {}) {
  using R = TileRegs<T, V, ROWS, 4>;
#pragma unroll
  for (int it0 = 0; it0 < R::kIters; it0 += R::kHeld) {
    R t;
    t.fetch(row_ptr, nrows, k0, kend, it0);
    t.store(dst, k0, kend, keep, it0);
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
// sum is finite (or +-inf). Those take the truncated v (or v itself) as hi and no lo part
// (and mma_step keeps an infinite hi part away from the other side's lo part).
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

// v, or 0 for +-inf and NaN. The lo-part products take the other operand's hi part this way:
// where that is infinite (or NaN) the hi * hi product carries it already, and inf * lo would
// add NaN (lo = 0) or the other infinity (a hi part rounded up leaves a lo part of the other
// sign); with finite values the products are unchanged.
__device__ __forceinline__ float finite_or_zero(float v) {
  return (__float_as_uint(v) & 0x7F800000u) == 0x7F800000u ? 0.f : v;
}

// acc[c] += Xs[16 rows, kn] * Ws[16c .. 16c + 16 rows, kn]^T (both row-major, stride kLd; kn <=
// kBK, the columns from kn on are skipped: the caller zeroed them or they are past K).
// SA / SB: split that operand into hi + lo TF32 parts (it is not exactly representable).
template <int NF, bool SA, bool SB>
__device__ __forceinline__ void mma_step(const float* Xs, const float* Ws, AccFrag (&acc)[NF],
                                         int kn = kBK) {
#if defined(LORA_EXT_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
#pragma unroll 1
  for (int kk = 0; kk < kn; kk += 8) {  // not unrolled: bounds the live fragments
    FragA ah, al, af;  // af: ah with its infinities as 0, for the products with B's lo part
    wmma::load_matrix_sync(ah, Xs + kk, kLd);
#pragma unroll
    for (int i = 0; i < ah.num_elements; ++i) {
      if constexpr (SA) {
        split_tf32(ah.x[i], ah.x[i], al.x[i]);
      } else {
        ah.x[i] = wmma::__float_to_tf32(ah.x[i]);
      }
      if constexpr (SB) af.x[i] = finite_or_zero(ah.x[i]);
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
      if constexpr (SA) {  // bh's infinities, as 0: the ah * bh product holds them already
#pragma unroll
        for (int i = 0; i < bh.num_elements; ++i) bh.x[i] = finite_or_zero(bh.x[i]);
        wmma::mma_sync(acc[c], al, bh, acc[c]);
      }
      if constexpr (SB) wmma::mma_sync(acc[c], af, bl, acc[c]);
    }
  }
#else
  __trap();  // tensor-core tiles need sm_80+ (the launcher never sends them here)
#endif
}

// Columns of the K step at k that hold data (k < kend), rounded up to the MMA's k = 8.
__device__ __forceinline__ int step_cols(int64_t k, int64_t kend) {
  const int n = static_cast<int>(min(static_cast<int64_t>(kBK), kend - k));
  return (n + 7) & ~7;
}

// acc += (keep_a ⊙ a)[warp's 16 of RA rows, k0 .. k1) b[RB rows, k0 .. k1)^T, a and b given by
// their row pointers (na, nb rows exist), K in steps of kBK through the operand tiles Xs
// [RA][kLd] and Ws [RB][kLd]. With 16-byte loads (VA, VB > 1) the next step's loads are issued
// before this step's MMAs (register prefetch); scalar loads go through load_tile (a whole tile
// in registers would spill). Called by every thread of the block (it synchronises).
template <int NF, bool SA, bool SB, class TA, int VA, int RA, class TB, int VB, int RB,
          class ARow, class BRow, class KeepA = Ones>
__device__ __forceinline__ void mma_k_range(float* Xs, float* Ws, ARow arow, int na, BRow brow,
                                            int nb, int64_t k0, int64_t k1, AccFrag (&acc)[NF],
                                            KeepA keep_a = {}) {
  const float* xw = Xs + (threadIdx.x >> 5) * 16 * kLd;  // the warp's 16 rows
  if constexpr (VA > 1 && VB > 1) {
    TileRegs<TA, VA, RA> ar;
    TileRegs<TB, VB, RB> br;
    ar.fetch(arow, na, k0, k1);
    br.fetch(brow, nb, k0, k1);
    for (int64_t k = k0; k < k1; k += kBK) {
      ar.store(Xs, k, k1, keep_a);
      br.store(Ws, k, k1);
      __syncthreads();
      if (k + kBK < k1) {
        ar.fetch(arow, na, k + kBK, k1);
        br.fetch(brow, nb, k + kBK, k1);
      }
      mma_step<NF, SA, SB>(xw, Ws, acc, step_cols(k, k1));
      __syncthreads();
    }
  } else {
    for (int64_t k = k0; k < k1; k += kBK) {
      load_tile<TA, VA, RA>(Xs, arow, na, k, k1, keep_a);
      load_tile<TB, VB, RB>(Ws, brow, nb, k, k1);
      __syncthreads();
      mma_step<NF, SA, SB>(xw, Ws, acc, step_cols(k, k1));
      __syncthreads();
    }
  }
}

}  // namespace lora_ext::cuda
