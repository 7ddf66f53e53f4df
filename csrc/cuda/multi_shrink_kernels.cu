// Shrink half of multi_lora_: u[z, sl, t, j] = A[sl, a, j, kz] . x[t, kz] for the tokens t of
// a tile (adapter a), rank rows j < ranks[sl, a], K range kz of split z (partials, no atomics;
// they are summed later in a fixed order, so results are deterministic).
//
// Grid: x = token tile + tiles * (slice x rank tile of BN rows: 16 or 64; tiles past the
// adapter's rank exit, no work on padded ranks), z = K splits. 128 threads. Two paths per
// tile (multi_kernels.cuh says which):
//   streaming (decode): each warp takes 4 rank rows at a time (r = 16: one pass, all loads
//     in flight together); lanes walk the K range with 16-byte loads of the A rows and of the
//     token rows (8 tokens at a time; x rows are re-read from L1/L2), fp32 accumulators for
//     4 x 8 (row, token) pairs, shuffle reductions.
//   tensor cores: 64 x BN output tile, K in steps of 32 through shared memory (gathered token
//     rows of x and the BN rows of A, as fp32; with 16-byte loads the next step's are issued
//     before this step's MMAs), wmma TF32 m16n16k8 with fp32 accumulation; warp w owns token
//     rows 16w..16w+15; the tile goes out through smem.
#include "multi_kernels.cuh"

namespace lora_ext::cuda::multi {
namespace {

// 4 blocks per SM (<= 128 registers, no spills); fp32 (both operands split into hi + lo
// parts) 3.
template <class T, int BN, int V>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 3 : 4)
    shrink_kernel(const MultiLoraParams p, bool grouped, int64_t tiles, int64_t kchunk,
                  bool count_bad) {
  constexpr int kOps = kBM * kLd + BN * kLd, kOut = kBM * (BN + 4);
  __shared__ __align__(32) float smem[kOps > kOut ? kOps : kOut];
  __shared__ int64_t toks[kBM];
  const int64_t tile = blockIdx.x % tiles, by = blockIdx.x / tiles;
  Tile tl;
  if (!resolve_tile(p, grouped, tile, count_bad && by == 0 && blockIdx.z == 0, tl, toks)) return;
  const int64_t nrt = (p.r_max + BN - 1) / BN;
  const int64_t sl = by / nrt, n0 = (by % nrt) * BN;
  const int64_t rank = rank_of(p, sl, tl.a);
  if (n0 >= rank) return;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(BN), rank - n0));
  const int64_t k0 = blockIdx.z * kchunk, k1 = min(p.in, k0 + kchunk);
  __syncthreads();  // toks

  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.A) + ((sl * p.S + tl.a) * p.r_max + n0) * p.in;
  float* u = p.u + (static_cast<int64_t>(blockIdx.z) * p.n + sl) * p.T * p.r_max + n0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ntok = tl.ntok;

  if (!tl.tc) {
    for (int q0 = 0; q0 < ntok; q0 += kSkinny) {  // one pass unless a big tile lacks tensor cores
      const int nq = min(kSkinny, ntok - q0);
      const T* xr[kSkinny];
#pragma unroll
      for (int q = 0; q < kSkinny; ++q) xr[q] = x + toks[q0 + (q < nq ? q : 0)] * p.ldx;
      for (int row0 = kRows * warp; row0 < nrows; row0 += kRows * (kThreads / 32)) {
        const T* ar[kRows];  // rows past nrows re-read the last one (their sums are dropped)
#pragma unroll
        for (int i = 0; i < kRows; ++i) ar[i] = A + min(row0 + i, nrows - 1) * p.in;
        float acc[kRows][kSkinny];
        stream_chunk<T, V>(ar, xr, nq, k0, k1, acc);
#pragma unroll
        for (int q = 0; q < kSkinny; ++q) {
          if (q < nq) {
#pragma unroll
            for (int i = 0; i < kRows; ++i) {
              const float si = warp_sum(acc[i][q]);
              if (lane == 0 && row0 + i < nrows) u[toks[q0 + q] * p.r_max + row0 + i] = si;
            }
          }
        }
      }
    }
    return;
  }

#if LORA_EXT_TF32_MMA
  constexpr int NF = BN / 16;
  constexpr bool kSplit = sizeof(T) == 4;  // fp32 operands need hi + lo TF32 parts
  AccFrag acc[NF];
#pragma unroll
  for (int c = 0; c < NF; ++c) nvcuda::wmma::fill_fragment(acc[c], 0.f);
  float* Xs = smem;
  float* Ws = smem + kBM * kLd;
  auto xrow = [&](int r) { return x + toks[r] * p.ldx; };
  auto arow = [&](int r) { return A + r * p.in; };
  mma_k_range<NF, kSplit, kSplit, T, V, kBM, T, V, BN>(Xs, Ws, xrow, ntok, arow, nrows, k0, k1,
                                                       acc);
  float* Cs = smem;  // [kBM][BN + 4], reusing the operand tiles after the last sync
#pragma unroll
  for (int c = 0; c < NF; ++c)
    nvcuda::wmma::store_matrix_sync(Cs + warp * 16 * (BN + 4) + c * 16, acc[c], BN + 4,
                                    nvcuda::wmma::mem_row_major);
  __syncthreads();
  #pragma unroll 1
  for (int e = threadIdx.x; e < kBM * BN; e += kThreads) {
    const int q = e / BN, j = e % BN;
    if (q < ntok && j < nrows) u[toks[q] * p.r_max + j] = Cs[q * (BN + 4) + j];
  }
#else
  __trap();  // tensor-core tiles need an sm_80+ image (the launcher never sends them here)
#endif
}

template <class T, int BN>
void shrink_bn(const MultiLoraParams& p, const MultiLoraPlan& plan, bool count_bad,
               cudaStream_t s) {
  constexpr int V = kVec<T>;
  const dim3 grid(plan.tiles * p.n * ceil_div(p.r_max, BN), 1, plan.ksplit);
  const bool vec = p.in % V == 0 && p.ldx % V == 0 && aligned16(p.x) && aligned16(p.A);
  if (vec) {
    LORA_EXT_LAUNCH(shrink_kernel<T, BN, V>, grid, kThreads, 0, s, p, plan.grouped, plan.tiles,
                    plan.kchunk, count_bad);
  } else {
    LORA_EXT_LAUNCH(shrink_kernel<T, BN, 1>, grid, kThreads, 0, s, p, plan.grouped, plan.tiles,
                    plan.kchunk, count_bad);
  }
}

}  // namespace

void launch_shrink(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, bool count_bad,
                   cudaStream_t s) {
  dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.r_max <= 16) {
      shrink_bn<T, 16>(p, plan, count_bad, s);
    } else {
      shrink_bn<T, 64>(p, plan, count_bad, s);
    }
  });
}

}  // namespace lora_ext::cuda::multi
