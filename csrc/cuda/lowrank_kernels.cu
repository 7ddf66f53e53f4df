// CUDA kernels of the single-adapter low-rank job (csrc/lowrank_job.h), used by lora_apply_ and
// lora_linear: shrink u[T, r] = (keep ⊙ x) A^T into fp32, expand y += s * keep ⊙ (u B^T)
// (or y = bias + s * keep ⊙ (u B^T) with overwrite_y), two launches through u (no fp16
// intermediate). Dropout masks come from a counter-based hash
// of (seed, element index), the seed read from device memory (graph-safe).
//
// Small T (<= 8 tokens, decode): memory-bound, the bytes are A and B.
//   shrink_small: grid x = K splits x ceil(r/8) row groups, 8 warps per block, warp = one rank
//     row of A; lanes stride their K range with 16-byte loads of A[j] and of each token row,
//     keep T fp32 partial sums and reduce with shuffles.
//   expand_small: one thread per output column o reads its row B[o, :r] with 16-byte loads,
//     broadcasts u[t, :], and adds s * acc into y[t, o] for every token (one rounding).
// Large T (prefill / training): 16-bit jobs on sm_80+ run TF32 tensor-core tiles
//   (lowrank_tc_kernels.cu). Otherwise (fp32, older GPUs, LORA_EXT_CUDA_TENSOR_CORES=0) both
//   halves are the NT product C = a b^T in gemm_nt on CUDA cores, tiles of 64 rows x BN
//   (16/32/64) columns (grid x = all tiles, no 65535 limit), K in steps of 32 through shared
//   memory (converted to fp32 on the way in; a step's second half only when K reaches it, so
//   r <= 16 costs half), a 4 x BN/16 register tile per thread.
//   (LORA_EXT_CUDA_BLAS=1 runs bf16 jobs on cuBLAS instead: lowrank_cuda.cpp.)
// Split K (when too few blocks would fill the GPU): split z writes its partial sums to
// job.work[z, T, r] and sum_splits adds them in the order z = 0, 1, ... into u: no atomics,
// the same bits on every run.
#include <algorithm>
#include <type_traits>

#include "launch.h"
#include "lowrank_kernels.cuh"

namespace lora_ext::cuda {
namespace {

constexpr int kThreads = 256;

// Launch plan, from the job's shapes, alignment and SM count only (so lowrank_workspace and
// lowrank agree, and a captured CUDA graph replays the same launches).
struct Plan {
  bool small = false;  // T <= kSmallT: shrink_small / expand_small
  bool tc = false;     // tiled on tensor cores (lowrank_tc_kernels.cu), else gemm_nt
  bool vec = false;    // shrink_small, shrink_tc: 16-byte loads of x and A
  int bn = 16;         // column tile of the tiled shrink
  int64_t rows = 1;    // shrink_small: row groups; tiled: row tiles (of bn)
  int64_t kchunk = 0, ksplit = 1;
};

// Splits K so that about two waves of `tiles` blocks run, each split >= min_chunk long and a
// multiple of `step` (at most kMaxSplits); returns the chunk length.
constexpr int64_t kMaxSplits = 64;
int64_t split_k(int64_t K, int64_t tiles, int num_sms, int64_t step, int64_t min_chunk) {
  int64_t splits = ceil_div(2 * static_cast<int64_t>(num_sms), tiles);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, K / min_chunk, kMaxSplits}));
  return ceil_div(ceil_div(K, splits), step) * step;
}

// Both halves of a 16-bit job of more than kSmallT tokens run on tensor cores when allowed.
template <class T>
bool tensor_core_tiles(const LowRankJob& j) {
  return j.T > kSmallT && sizeof(T) == 2 && j.tensor_cores;
}

template <class T>
Plan plan_for(const LowRankJob& j) {
  constexpr int V = kVec<T>;
  Plan pl;
  pl.small = j.T <= kSmallT;
  pl.tc = tensor_core_tiles<T>(j);
  pl.vec = j.in % V == 0 && j.ldx % V == 0 && aligned16(j.x) && aligned16(j.A);
  if (pl.small) {
    const int64_t step = 32 * (pl.vec ? V : 1);
    pl.rows = ceil_div(j.r, kThreads / 32);
    pl.kchunk = split_k(j.in, pl.rows, j.num_sms, step, step);
  } else {
    pl.bn = j.r <= 16 ? 16 : (j.r <= 32 ? 32 : 64);
    pl.rows = ceil_div(j.r, pl.bn);
    // tensor cores: chunks of max(256, in / 16) from `in` alone (every token's u has the same
    // bits in any batch); gemm_nt: K splits for about two waves
    pl.kchunk = pl.tc ? std::max<int64_t>(256, ceil_div(ceil_div(j.in, 16), 32) * 32)
                      : split_k(j.in, ceil_div(j.T, 64) * pl.rows, j.num_sms, 32, 256);
  }
  pl.kchunk = std::max<int64_t>(1, pl.kchunk);
  pl.ksplit = ceil_div(j.in, pl.kchunk);
  // tensor cores: one chunk per block (ksplit partials) while the tiles alone would leave the
  // GPU short of blocks in flight, else every chunk in its tile's block (no workspace)
  if (pl.tc && ceil_div(j.T, 64) * pl.rows >= 4LL * j.num_sms) pl.ksplit = 1;
  return pl;
}

template <class T, int VEC>
__global__ void __launch_bounds__(kThreads)
    shrink_small(const T* __restrict__ x, int64_t ldx, const T* __restrict__ A,
                 float* __restrict__ out, int T_, int64_t in, int64_t r, int64_t kchunk,
                 unsigned ksplit, DropArg drop) {
  const Dropout d = drop.make();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned z = blockIdx.x % ksplit;
  const int64_t j = static_cast<int64_t>(blockIdx.x / ksplit) * (kThreads / 32) + warp;
  if (j >= r) return;
  const int64_t k0 = z * kchunk;
  const int64_t k1 = min(in, k0 + kchunk);
  float* u = out + static_cast<int64_t>(z) * T_ * r;
  float acc[kSmallT];
#pragma unroll
  for (int t = 0; t < kSmallT; ++t) acc[t] = 0.f;
  const T* a = A + j * in;
  for (int64_t k = k0 + lane * VEC; k < k1; k += 32 * VEC) {
    float av[VEC];
    load_f32<T, VEC>(a + k, av);
#pragma unroll
    for (int t = 0; t < kSmallT; ++t) {
      if (t < T_) {
        float xv[VEC];
        load_f32<T, VEC>(x + t * ldx + k, xv);
        if (drop.on) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) xv[i] *= d.factor(static_cast<uint64_t>(t) * in + k + i);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[t] = fmaf(av[i], xv[i], acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kSmallT; ++t) {
    if (t < T_) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) u[t * r + j] = s;
    }
  }
}

// u[e] = sum over z = 0, 1, ... of work[z * n + e] (fixed order).
__global__ void __launch_bounds__(kThreads)
    sum_splits(const float* __restrict__ work, int64_t ksplit, int64_t n, float* __restrict__ u) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = work[e];
    for (int64_t z = 1; z < ksplit; ++z) s += work[z * n + e];
    u[e] = s;
  }
}

template <class T, int VEC>
__global__ void __launch_bounds__(kThreads)
    expand_small(T* __restrict__ y, int64_t ldy, const float* __restrict__ u,
                 const T* __restrict__ B, int T_, int64_t out, int64_t r, float scale,
                 DropArg drop) {
  const Dropout d = drop.make();
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= out) return;
  float acc[kSmallT];
#pragma unroll
  for (int t = 0; t < kSmallT; ++t) acc[t] = 0.f;
  const T* b = B + o * r;
  for (int64_t j = 0; j < r; j += VEC) {
    float bv[VEC];
    load_f32<T, VEC>(b + j, bv);
#pragma unroll
    for (int t = 0; t < kSmallT; ++t) {
      if (t < T_) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[t] = fmaf(bv[i], __ldg(u + t * r + j + i), acc[t]);
      }
    }
  }
  if (drop.on) {
#pragma unroll
    for (int t = 0; t < kSmallT; ++t) acc[t] *= d.factor(static_cast<uint64_t>(t) * out + o);
  }
#pragma unroll
  for (int t = 0; t < kSmallT; ++t) {
    if (t < T_) {
      T* p = y + t * ldy + o;
      *p = from_f32<T>(to_f32(*p) + scale * acc[t]);
    }
  }
}

// Epilogues of gemm_nt (v: the product element, output dropout already applied); the
// expand's, AddY, is in lowrank_kernels.cuh.
struct StoreU {  // shrink: u[z][m, n] = v (split z's partial, or u itself when K is not split)
  float* u;
  int64_t ldu, zstride;
  __device__ void operator()(int64_t m, int64_t n, float v) const {
    u[blockIdx.z * zstride + m * ldu + n] = v;
  }
};

// C[M, N] = a[M, K] b[N, K]^T over the K range [z * kchunk, (z + 1) * kchunk), blockIdx.x =
// row tile + column tile * ceil(M / 64). drop_a masks a (index m * K + k), drop_c the product
// (index m * N + n). Thread (ty, tx) = (tid / 16, tid % 16) owns rows ty*4 .. ty*4+3 and
// columns tx + 16c.
template <class TA, class TB, int BN, class Epi>
__global__ void __launch_bounds__(kThreads)
    gemm_nt(const TA* __restrict__ a, int64_t lda, const TB* __restrict__ b, int64_t ldb,
            int64_t M, int64_t N, int64_t K, int64_t kchunk, Epi epi, DropArg drop_a,
            DropArg drop_c) {
  const Dropout da = drop_a.make(), dc = drop_c.make();
  constexpr int BM = 64, BK = 32, CN = BN / 16;
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t mtiles = (M + BM - 1) / BM;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x % mtiles) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / mtiles) * BN;
  const int64_t kbeg = static_cast<int64_t>(blockIdx.z) * kchunk;
  const int64_t kend = min(K, kbeg + kchunk);
  float acc[4][CN];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < CN; ++c) acc[i][c] = 0.f;

  for (int64_t k0 = kbeg; k0 < kend; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int row = e / BK, col = e % BK;
      const int64_t gm = m0 + row, gk = k0 + col;
      float v = (gm < M && gk < kend) ? to_f32(a[gm * lda + gk]) : 0.f;
      if (drop_a.on) v *= da.factor(static_cast<uint64_t>(gm) * K + gk);
      As[col][row] = v;
    }
    for (int e = tid; e < BN * BK; e += kThreads) {
      const int row = e / BK, col = e % BK;
      const int64_t gn = n0 + row, gk = k0 + col;
      Bs[col][row] = (gn < N && gk < kend) ? to_f32(b[gn * ldb + gk]) : 0.f;
    }
    __syncthreads();
    // the second half of the K step only when K reaches it (r <= 16: half the FMAs)
    const int halves = kend - k0 > BK / 2 ? 2 : 1;
    for (int hk = 0; hk < halves; ++hk) {
#pragma unroll 8
      for (int k = hk * (BK / 2); k < (hk + 1) * (BK / 2); ++k) {
        float av[4], bv[CN];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[k][ty * 4 + i];
#pragma unroll
        for (int c = 0; c < CN; ++c) bv[c] = Bs[k][tx + 16 * c];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int c = 0; c < CN; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < CN; ++c) {
      const int64_t m = m0 + ty * 4 + i, n = n0 + tx + 16 * c;
      if (m < M && n < N)
        epi(m, n, drop_c.on ? acc[i][c] * dc.factor(static_cast<uint64_t>(m) * N + n) : acc[i][c]);
    }
}

// dst[t, k] = keep(t * width + k) * src[t * ld + k]; grid-stride over all elements.
template <class T>
__global__ void __launch_bounds__(kThreads)
    dropout_rows_kernel(const T* __restrict__ src, int64_t ld, T* __restrict__ dst, int64_t T_,
                        int64_t width, DropArg drop) {
  const Dropout d = drop.make();
  const int64_t n = T_ * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = i / width, k = i - t * width;
    dst[i] = from_f32<T>(to_f32(src[t * ld + k]) * d.factor(static_cast<uint64_t>(i)));
  }
}

// Launch errors are returned by lowrank(); the first failing call wins.
#define LORA_EXT_TRY(call)               \
  do {                                   \
    const cudaError_t err_ = (call);     \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

template <class T>
cudaError_t shrink(const LowRankJob& j, DropArg drop, cudaStream_t s) {
  const size_t ubytes = sizeof(float) * j.T * j.r;
  if (j.in == 0) return cudaMemsetAsync(j.u, 0, ubytes, s);
  const Plan pl = plan_for<T>(j);
  const T* x = static_cast<const T*>(j.x);
  const T* A = static_cast<const T*>(j.A);
  float* out = pl.ksplit > 1 ? j.work : j.u;
  if (pl.small) {
    constexpr int V = kVec<T>;
    const int64_t blocks = pl.ksplit * pl.rows;
    const int nt = static_cast<int>(j.T);
    const unsigned ks = static_cast<unsigned>(pl.ksplit);
    if (pl.vec) {
      LORA_EXT_LAUNCH(shrink_small<T, V>, blocks, kThreads, 0, s, x, j.ldx, A, out, nt, j.in, j.r,
                      pl.kchunk, ks, drop);
    } else {
      LORA_EXT_LAUNCH(shrink_small<T, 1>, blocks, kThreads, 0, s, x, j.ldx, A, out, nt, j.in, j.r,
                      pl.kchunk, ks, drop);
    }
  } else if (pl.tc) {
    if constexpr (sizeof(T) == 2)
      LORA_EXT_TRY(shrink_tc<T>(j, out, pl.bn, pl.kchunk, pl.ksplit, pl.vec, drop, s));
  } else {
    const dim3 grid(ceil_div(j.T, 64) * pl.rows, 1, pl.ksplit);
    const StoreU epi{out, j.r, j.T * j.r};
    auto launch = [&](auto bn) {
      LORA_EXT_LAUNCH(gemm_nt<T, T, decltype(bn)::value, StoreU>, grid, kThreads, 0, s, x, j.ldx, A,
                      j.in, j.T, j.r, j.in, pl.kchunk, epi, drop, DropArg{});
    };
    if (pl.bn == 16) {
      launch(std::integral_constant<int, 16>{});
    } else if (pl.bn == 32) {
      launch(std::integral_constant<int, 32>{});
    } else {
      launch(std::integral_constant<int, 64>{});
    }
  }
  LORA_EXT_TRY(cudaGetLastError());
  if (pl.ksplit > 1) {
    const int64_t n = j.T * j.r;
    const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), 4LL * j.num_sms);
    LORA_EXT_LAUNCH(sum_splits, blocks, kThreads, 0, s, j.work, pl.ksplit, n, j.u);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t expand(const LowRankJob& j, DropArg drop, cudaStream_t s) {
  if (j.out == 0) return cudaSuccess;
  const T* B = static_cast<const T*>(j.B);
  T* y = static_cast<T*>(j.y);
  const T* bias = static_cast<const T*>(j.bias);
  constexpr int V = kVec<T>;
  if (j.T <= kSmallT) {
    const int64_t gx = ceil_div(j.out, kThreads);
    const int nt = static_cast<int>(j.T);
    if (j.overwrite_y) {  // few rows: start them from the bias (a row-stride-0 copy) or zero
      if (bias != nullptr) {
        LORA_EXT_LAUNCH(dropout_rows_kernel<T>, ceil_div(j.T * j.out, kThreads), kThreads, 0, s, bias,
                        int64_t{0}, y, j.T, j.out, DropArg{});
      } else {
        LORA_EXT_TRY(cudaMemsetAsync(y, 0, sizeof(T) * j.T * j.out, s));
      }
    }
    if (j.r % V == 0 && aligned16(B)) {
      LORA_EXT_LAUNCH(expand_small<T, V>, gx, kThreads, 0, s, y, j.ldy, j.u, B, nt, j.out, j.r,
                      j.scale, drop);
    } else {
      LORA_EXT_LAUNCH(expand_small<T, 1>, gx, kThreads, 0, s, y, j.ldy, j.u, B, nt, j.out, j.r,
                      j.scale, drop);
    }
  } else if (tensor_core_tiles<T>(j)) {
    if constexpr (sizeof(T) == 2) LORA_EXT_TRY(expand_tc<T>(j, drop, s));
  } else {
    const dim3 grid(ceil_div(j.T, 64) * ceil_div(j.out, 64), 1, 1);
    LORA_EXT_LAUNCH(gemm_nt<float, T, 64, AddY<T>>, grid, kThreads, 0, s, j.u, j.r, B, j.r, j.T,
                    j.out, j.r, j.r, AddY<T>{y, j.ldy, j.scale, j.overwrite_y, bias}, DropArg{}, drop);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t lowrank_workspace(DType dt, const LowRankJob& j) {
  if (j.T == 0 || j.x == nullptr || j.in == 0) return 0;
  return dispatch(dt, [&](auto tag) {
    const Plan pl = plan_for<typename decltype(tag)::type>(j);
    return pl.ksplit > 1 ? pl.ksplit * j.T * j.r : int64_t{0};
  });
}

cudaError_t lowrank(DType dt, const LowRankJob& j, cudaStream_t stream) {
  if (j.T == 0) return cudaSuccess;
  const bool on = j.dropout_p > 0.f;
  const DropArg dx{on && j.mask_x, j.dropout_p, j.seed};
  const DropArg dy{on && j.mask_y, j.dropout_p, j.seed};
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (j.x) LORA_EXT_TRY(shrink<T>(j, dx, stream));
    if (j.y) LORA_EXT_TRY(expand<T>(j, dy, stream));
    return cudaSuccess;
  });
}

cudaError_t dropout_rows(DType dt, const void* src, int64_t ld, void* dst, int64_t T, int64_t width,
                         float p, const int64_t* seed, int num_sms, cudaStream_t stream) {
  if (T == 0 || width == 0) return cudaSuccess;
  const DropArg drop{true, p, seed};
  const int64_t blocks = std::min<int64_t>(ceil_div(T * width, kThreads), 8LL * num_sms);
  dispatch(dt, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    LORA_EXT_LAUNCH(dropout_rows_kernel<T_>, blocks, kThreads, 0, stream,
                    static_cast<const T_*>(src), ld, static_cast<T_*>(dst), T, width, drop);
  });
  return cudaGetLastError();
}

}  // namespace lora_ext::cuda
