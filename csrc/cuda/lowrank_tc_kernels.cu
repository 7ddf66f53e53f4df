// Tensor-core halves of the single-adapter low-rank job (csrc/lowrank_job.h) for 16-bit jobs of
// more than 8 tokens on sm_80+ (lowrank_kernels.cu plans and picks them; TF32 tiles of
// tf32_tiles.cuh: 16-bit x, A and B are exact in TF32, so every product is exact and the sums
// are fp32, like the CUDA-core tiles').
//   shrink_tc: u[T, r] = (keep ⊙ x) A^T. Block = 64 tokens x BN (16/32/64) rank rows, 4 warps
//     of 16 tokens; K in steps of 32 through shared memory; with 16-byte loads the next step's
//     are issued before this step's MMAs (register prefetch). Dropout stages keep ⊙ x with a
//     0/1 mask (exact) and scales by 1 / (1 - p). K is cut into chunks that depend on `in` only
//     (the launcher's plan); u = s S_0 + s S_1 + ... in chunk order, either one chunk per block
//     (z = chunk: partials to job.work, summed in order by sum_splits) or all chunks in one
//     block (large T: no workspace): the same bits either way, so a token's u does not depend
//     on the batch it came in.
//   expand_tc: y[T, out] (+)= s keep ⊙ (u B^T). Block = 64 tokens x 64 columns, K = r in steps
//     of 32 (only the steps' columns below r multiplied), u split into hi + lo TF32 parts
//     (~fp32 accuracy); the tile goes out through shared memory, with 16-byte
//     read-modify-writes of y when aligned; y rounded once.
#include "lowrank_kernels.cuh"
#include "launch.h"
#include "tf32_tiles.cuh"

namespace lora_ext::cuda {
namespace {

constexpr int kBM = 64;  // tokens per tile (16 per warp)
constexpr int kBNE = 64; // output columns per expand tile

// Blocks per SM the shrink's registers must allow: 16-byte tiles at <= 64 registers (<= 128
// with BN >= 32) fit without spills; the scalar-load variants (unaligned inputs) spill under
// ptxas's default target, so they get the registers of one block.
template <int BN, int V>
constexpr int kShrinkMinBlocks = V == 1 ? 1 : BN == 16 ? 8 : 4;

template <class T, int BN, int V>
__global__ void __launch_bounds__(kTileThreads, kShrinkMinBlocks<BN, V>)
    shrink_tc_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ A,
                     float* __restrict__ out, int64_t M, int64_t N, int64_t K, int64_t kchunk,
                     int64_t chunks_per_block, DropArg drop) {
#if LORA_EXT_TF32_MMA
  constexpr int NF = BN / 16, kOps = (kBM + BN) * kLd, kOut = kBM * (BN + 4);
  __shared__ __align__(32) float smem[kOps > kOut ? kOps : kOut];
  const Dropout d = drop.make();
  const int64_t mtiles = (M + kBM - 1) / kBM;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x % mtiles) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / mtiles) * BN;
  const int mrows = static_cast<int>(min(static_cast<int64_t>(kBM), M - m0));
  const int nrows = static_cast<int>(min(static_cast<int64_t>(BN), N - n0));
  const T* xb = x + m0 * ldx;
  const T* Ab = A + n0 * K;
  auto xrow = [&](int r) { return xb + r * ldx; };
  auto arow = [&](int r) { return Ab + r * K; };
  auto keep = [&](int r, int64_t k) {
    return d.keep(static_cast<uint64_t>(m0 + r) * K + k) ? 1.f : 0.f;
  };
  const int warp = threadIdx.x >> 5;
  const float s = drop.on ? d.keep_scale : 1.f;
  float* Xs = smem;
  float* Ws = smem + kBM * kLd;
  // chunks c0 .. c1 - 1; total = s * S(c0), then total += s * S(c) in chunk order: the bits of
  // one chunk per block (partials summed by sum_splits), however many chunks a block runs
  const int64_t nchunks = (K + kchunk - 1) / kchunk;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * chunks_per_block;
  const int64_t c1 = min(nchunks, c0 + chunks_per_block);
  AccFrag total[NF];
  for (int64_t ch = c0; ch < c1; ++ch) {
    const int64_t kbeg = ch * kchunk, kend = min(K, kbeg + kchunk);
    AccFrag acc[NF];
#pragma unroll
    for (int c = 0; c < NF; ++c) nvcuda::wmma::fill_fragment(acc[c], 0.f);
    if (drop.on) {
      mma_k_range<NF, false, false, T, V, kBM, T, V, BN>(Xs, Ws, xrow, mrows, arow, nrows, kbeg,
                                                          kend, acc, keep);
    } else {
      mma_k_range<NF, false, false, T, V, kBM, T, V, BN>(Xs, Ws, xrow, mrows, arow, nrows, kbeg,
                                                          kend, acc);
    }
#pragma unroll
    for (int c = 0; c < NF; ++c)
#pragma unroll
      for (int i = 0; i < acc[c].num_elements; ++i)  // element-wise: the same layout
        total[c].x[i] = ch == c0 ? __fmul_rn(s, acc[c].x[i])
                                 : __fadd_rn(total[c].x[i], __fmul_rn(s, acc[c].x[i]));
  }
  float* Cs = smem;  // [kBM][BN + 4], reusing the operand tiles after the last sync
#pragma unroll
  for (int c = 0; c < NF; ++c)
    nvcuda::wmma::store_matrix_sync(Cs + warp * 16 * (BN + 4) + c * 16, total[c], BN + 4,
                                    nvcuda::wmma::mem_row_major);
  __syncthreads();
  float* u = out + static_cast<int64_t>(blockIdx.z) * M * N + m0 * N + n0;
#pragma unroll 1
  for (int e = threadIdx.x; e < kBM * BN; e += kTileThreads) {
    const int q = e / BN, c = e % BN;
    if (q < mrows && c < nrows) u[q * N + c] = Cs[q * (BN + 4) + c];
  }
#else
  __trap();  // tensor-core tiles need an sm_80+ image (the launcher never sends them here)
#endif
}

// VEC: 6 blocks per SM (<= 80 registers: 78, no spills). The operand tiles go through
// load_tile (no register prefetch of the next K step: r <= 32 is one step, and the prefetch
// held ~40 more registers, which left 3 blocks per SM: 18.75% occupancy, 23% of DRAM
// bandwidth on the H200 for this read-modify-write of y). The scalar variant spills below its
// 146 registers: one.
template <class T, bool VEC>
__global__ void __launch_bounds__(kTileThreads, VEC ? 6 : 1)
    expand_tc_kernel(const float* __restrict__ u, const T* __restrict__ B, int64_t M, int64_t N,
                     int64_t R, AddY<T> eo, DropArg drop, bool vec_y) {
#if LORA_EXT_TF32_MMA
  constexpr int VU = VEC ? 4 : 1, VB = VEC ? kVec<T> : 1, NF = kBNE / 16;
  constexpr int kOps = 2 * kBM * kLd, kOut = kBM * (kBNE + 4);
  __shared__ __align__(32) float smem[kOps > kOut ? kOps : kOut];
  const Dropout d = drop.make();
  const int64_t mtiles = (M + kBM - 1) / kBM;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x % mtiles) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / mtiles) * kBNE;
  const int mrows = static_cast<int>(min(static_cast<int64_t>(kBM), M - m0));
  const int ncols = static_cast<int>(min(static_cast<int64_t>(kBNE), N - n0));
  auto urow = [&](int r) { return u + (m0 + r) * R; };
  auto brow = [&](int r) { return B + (n0 + r) * R; };
  const int warp = threadIdx.x >> 5;
  // the tile's y rows (64 columns: one line each), fetched during the MMAs
  if (!eo.overwrite && static_cast<int>(threadIdx.x) < mrows)
    prefetch_l1(eo.y + (m0 + threadIdx.x) * eo.ldy + n0);
  AccFrag acc[NF];
#pragma unroll
  for (int c = 0; c < NF; ++c) nvcuda::wmma::fill_fragment(acc[c], 0.f);
  float* Xs = smem;
  float* Ws = smem + kBM * kLd;
  for (int64_t k = 0; k < R; k += kBK) {  // u's hi + lo TF32 parts times B's (exact) TF32
    load_tile<float, VU, kBM>(Xs, urow, mrows, k, R);
    load_tile<T, VB, kBNE>(Ws, brow, ncols, k, R);
    __syncthreads();
    mma_step<NF, true, false>(Xs + warp * 16 * kLd, Ws, acc, step_cols(k, R));
    __syncthreads();
  }
  float* Cs = smem;  // [kBM][kBNE + 4]
#pragma unroll
  for (int c = 0; c < NF; ++c)
    nvcuda::wmma::store_matrix_sync(Cs + warp * 16 * (kBNE + 4) + c * 16, acc[c], kBNE + 4,
                                    nvcuda::wmma::mem_row_major);
  __syncthreads();
  auto value = [&](int q, int c) {  // the product with the output mask applied
    const float v = Cs[q * (kBNE + 4) + c];
    return drop.on ? v * d.factor(static_cast<uint64_t>(m0 + q) * N + n0 + c) : v;
  };
  if (vec_y) {  // 16-byte accesses of y (and bias); a thread's loads are all issued first
    constexpr int VY = kVec<T>, kChunks = kBNE / VY, kIters = kBM * kChunks / kTileThreads;
    uint4 raw[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int e = threadIdx.x + it * kTileThreads, q = e / kChunks, c = (e % kChunks) * VY;
      raw[it] = make_uint4(0, 0, 0, 0);
      if (q < mrows && c < ncols) {
        if (!eo.overwrite) {
          raw[it] = *reinterpret_cast<const uint4*>(eo.y + (m0 + q) * eo.ldy + n0 + c);
        } else if (eo.bias != nullptr) {
          raw[it] = *reinterpret_cast<const uint4*>(eo.bias + n0 + c);
        }
      }
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int e = threadIdx.x + it * kTileThreads, q = e / kChunks, c = (e % kChunks) * VY;
      if (q < mrows && c < ncols) {
        T* v = reinterpret_cast<T*>(&raw[it]);
#pragma unroll
        for (int i = 0; i < VY; ++i) v[i] = from_f32<T>(to_f32(v[i]) + eo.scale * value(q, c + i));
        *reinterpret_cast<uint4*>(eo.y + (m0 + q) * eo.ldy + n0 + c) = raw[it];
      }
    }
  } else {
#pragma unroll 4
    for (int e = threadIdx.x; e < kBM * kBNE; e += kTileThreads) {
      const int q = e / kBNE, c = e % kBNE;
      if (q < mrows && c < ncols) {
        eo(m0 + q, n0 + c, value(q, c));
      }
    }
  }
#else
  __trap();  // tensor-core tiles need an sm_80+ image (the launcher never sends them here)
#endif
}

}  // namespace

template <class T>
cudaError_t shrink_tc(const LowRankJob& j, float* out, int bn, int64_t kchunk, int64_t blocks_z,
                      bool vec, DropArg drop, cudaStream_t s) {
  constexpr int V = kVec<T>;
  const T* x = static_cast<const T*>(j.x);
  const T* A = static_cast<const T*>(j.A);
  const dim3 grid(ceil_div(j.T, kBM) * ceil_div(j.r, bn), 1, blocks_z);
  const int64_t per_block = ceil_div(ceil_div(j.in, kchunk), blocks_z);
  auto launch = [&](auto bn_c, auto v_c) {
    LORA_EXT_LAUNCH((shrink_tc_kernel<T, decltype(bn_c)::value, decltype(v_c)::value>), grid,
                    kTileThreads, 0, s, x, j.ldx, A, out, j.T, j.r, j.in, kchunk, per_block, drop);
  };
  auto with_v = [&](auto bn_c) {
    if (vec) {
      launch(bn_c, std::integral_constant<int, V>{});
    } else {
      launch(bn_c, std::integral_constant<int, 1>{});
    }
  };
  if (bn == 16) {
    with_v(std::integral_constant<int, 16>{});
  } else if (bn == 32) {
    with_v(std::integral_constant<int, 32>{});
  } else {
    with_v(std::integral_constant<int, 64>{});
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t expand_tc(const LowRankJob& j, DropArg drop, cudaStream_t s) {
  const T* B = static_cast<const T*>(j.B);
  const AddY<T> eo{static_cast<T*>(j.y), j.ldy, j.scale, j.overwrite_y,
                   static_cast<const T*>(j.bias)};
  constexpr int V = kVec<T>;
  const bool vec = j.r % V == 0 && aligned16(j.u) && aligned16(B);
  const bool vec_y = aligned16(j.y) && j.ldy % V == 0 && j.out % V == 0 &&
                     (!j.overwrite_y || j.bias == nullptr || aligned16(j.bias));
  const dim3 grid(ceil_div(j.T, kBM) * ceil_div(j.out, kBNE));
  if (vec) {
    LORA_EXT_LAUNCH((expand_tc_kernel<T, true>), grid, kTileThreads, 0, s, j.u, B, j.T, j.out, j.r,
                    eo, drop, vec_y);
  } else {
    LORA_EXT_LAUNCH((expand_tc_kernel<T, false>), grid, kTileThreads, 0, s, j.u, B, j.T, j.out,
                    j.r, eo, drop, vec_y);
  }
  return cudaGetLastError();
}

template cudaError_t shrink_tc<__half>(const LowRankJob&, float*, int, int64_t, int64_t, bool,
                                       DropArg, cudaStream_t);
template cudaError_t shrink_tc<__nv_bfloat16>(const LowRankJob&, float*, int, int64_t, int64_t,
                                              bool, DropArg, cudaStream_t);
template cudaError_t expand_tc<__half>(const LowRankJob&, DropArg, cudaStream_t);
template cudaError_t expand_tc<__nv_bfloat16>(const LowRankJob&, DropArg, cudaStream_t);

}  // namespace lora_ext::cuda
