// Expand half of multi_lora_: y[t, o] += scales[sl, a] * sum_{j < r} B[a, o, j] u[sl, t, j] for
// the tokens t of a tile (adapter a) and a tile of 64 output columns o of slice sl; u is the
// sum of the shrink's split-K partials (fixed order), y is rounded once.
//
// Grid: x = token tile + tiles * output column tile (of all slices). 128 threads. Paths as
// the shrink's (multi_kernels.cuh says which):
//   streaming: 8 tokens at a time, their u rows go to smem (512 ranks at a time, only the
//     tokens and ranks that exist); thread (c, h) owns column o0 + c (c < 64) and tokens h,
//     h+2, h+4, h+6: it reads its row B[a, o, :r] with 16-byte loads (a warp covers 32
//     consecutive rows: contiguous bytes) and broadcasts u from smem; its y values are
//     loaded while u is staged (a decode block is a short chain of memory round trips).
//   tensor cores: 64 tokens x 64 columns, K = r in steps of 32 through smem,
//     u split into hi + lo TF32 parts (B too when fp32), wmma m16n16k8, fp32 accumulation;
//     the tile goes out through smem with 16-byte read-modify-writes of y when aligned.
#include "multi_kernels.cuh"

namespace lora_ext::cuda::multi {
namespace {

constexpr int kUChunk = 512;  // ranks of u staged per pass in the streaming path

// 3 blocks per SM (<= 170 registers, no spills; left to itself ptxas took ~210: 2 blocks).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, 3)
    expand_kernel(const MultiLoraParams p, bool grouped, int64_t tiles, int64_t ksplit,
                  bool count_bad, bool vec_y) {
  constexpr int kOps = 2 * kBM * kLd, kOut = kBM * (kBNE + 4), kUs = kSkinny * kUChunk;
  constexpr int kA = kOps > kOut ? kOps : kOut;
  __shared__ __align__(32) float smem[kA > kUs ? kA : kUs];
  __shared__ int64_t toks[kBM];
  const int64_t tile = blockIdx.x % tiles;
  int64_t yt = blockIdx.x / tiles, sl = -1, o0 = 0, ncols = 0;
  Tile tl;
  if (!resolve_tile(p, grouped, tile, count_bad && yt == 0, tl)) return;
  for (int s = 0; s < p.n; ++s) {
    const int64_t w = p.out_off[s + 1] - p.out_off[s], nt = (w + kBNE - 1) / kBNE;
    if (yt < nt) {
      sl = s;
      o0 = p.out_off[s] + yt * kBNE;
      ncols = min(static_cast<int64_t>(kBNE), p.out_off[s + 1] - o0);
      break;
    }
    yt -= nt;
  }
  if (sl < 0) return;
  const int64_t rank = rank_of(p, sl, tl.a);
  const float scale = p.scales[sl * p.slot_stride + tl.a];  // loaded beside the rank
  if (rank == 0) return;
  load_tokens(p, grouped, tl, toks);
  __syncthreads();

  const T* B = static_cast<const T*>(p.B) + (tl.a * p.out + o0) * p.r_max;
  const int64_t zstride = p.n * p.T * p.r_max;
  const float* u = p.u + sl * p.T * p.r_max;
  T* y = static_cast<T*>(p.y);
  const int ntok = tl.ntok;

  if (!tl.tc) {
    float* Us = smem;  // [kSkinny][kUChunk]
    const int c = threadIdx.x % kBNE, h = threadIdx.x / kBNE;
    for (int q0 = 0; q0 < ntok; q0 += kSkinny) {  // one pass unless a big tile lacks tensor cores
      const int nq = min(kSkinny, ntok - q0);
      float acc[kSkinny / 2], yv[kSkinny / 2];  // y is read now, while u is staged
#pragma unroll
      for (int qi = 0; qi < kSkinny / 2; ++qi) {
        acc[qi] = 0.f;
        const int q = h + 2 * qi;
        yv[qi] = c < ncols && q < nq ? to_f32(y[toks[q0 + q] * p.ldy + o0 + c]) : 0.f;
      }
      for (int64_t jc = 0; jc < rank; jc += kUChunk) {
        const int jn = static_cast<int>(min(static_cast<int64_t>(kUChunk), rank - jc));
#pragma unroll 1
        for (int e = threadIdx.x; e < nq * jn; e += kThreads) {
          const int q = e / jn, j = e - q * jn;
          Us[q * kUChunk + j] = sum_partials(u + toks[q0 + q] * p.r_max + jc + j, zstride, ksplit);
        }
        __syncthreads();
        if (c < ncols) {
          const T* b = B + c * p.r_max + jc;
          for (int j = 0; j < jn; j += V) {
            float bv[V];
            load_f32<T, V>(b + j, bv);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              if (j + i < jn) {
#pragma unroll
                for (int qi = 0; qi < kSkinny / 2; ++qi)
                  if (h + 2 * qi < nq) acc[qi] = fmaf(bv[i], Us[(h + 2 * qi) * kUChunk + j + i], acc[qi]);
              }
            }
          }
        }
        __syncthreads();
      }
      if (c < ncols) {
#pragma unroll
        for (int qi = 0; qi < kSkinny / 2; ++qi) {
          const int q = h + 2 * qi;
          if (q < nq) y[toks[q0 + q] * p.ldy + o0 + c] = from_f32<T>(yv[qi] + scale * acc[qi]);
        }
      }
    }
    return;
  }

#if LORA_EXT_TF32_MMA
  constexpr bool kSplitB = sizeof(T) == 4;
  const int warp = threadIdx.x >> 5;
  AccFrag acc[kBNE / 16];
#pragma unroll
  for (int c = 0; c < kBNE / 16; ++c) nvcuda::wmma::fill_fragment(acc[c], 0.f);
  float* Xs = smem;
  float* Ws = smem + kBM * kLd;
  for (int64_t k = 0; k < rank; k += kBK) {
    // u rows (sum of the split-K partials): the first partial of all 16 elements a thread
    // owns is loaded at once, then the other splits
    constexpr int kUIters = kBM * kBK / kThreads;
    float sv[kUIters];
#pragma unroll
    for (int it = 0; it < kUIters; ++it) {
      const int e = threadIdx.x + it * kThreads, q = e / kBK, j = e % kBK;
      sv[it] = q < ntok && k + j < rank ? u[toks[q] * p.r_max + k + j] : 0.f;  // split 0
    }
    for (int64_t z = 1; z < ksplit; ++z) {
#pragma unroll
      for (int it = 0; it < kUIters; ++it) {
        const int e = threadIdx.x + it * kThreads, q = e / kBK, j = e % kBK;
        if (q < ntok && k + j < rank) sv[it] += u[z * zstride + toks[q] * p.r_max + k + j];
      }
    }
#pragma unroll
    for (int it = 0; it < kUIters; ++it) {
      const int e = threadIdx.x + it * kThreads;
      Xs[(e / kBK) * kLd + e % kBK] = sv[it];
    }
    load_tile<T, V, kBNE>(Ws, [&](int r) { return B + r * p.r_max; }, static_cast<int>(ncols), k,
                          rank);
    __syncthreads();
    mma_step<kBNE / 16, true, kSplitB>(Xs + warp * 16 * kLd, Ws, acc);
    __syncthreads();
  }
  float* Cs = smem;  // [kBM][kBNE + 4]
#pragma unroll
  for (int c = 0; c < kBNE / 16; ++c)
    nvcuda::wmma::store_matrix_sync(Cs + warp * 16 * (kBNE + 4) + c * 16, acc[c], kBNE + 4,
                                    nvcuda::wmma::mem_row_major);
  __syncthreads();
  if (vec_y) {  // 16-byte read-modify-writes of y; a thread's loads are all issued first
    constexpr int VY = kVec<T>, kChunks = kBNE / VY, kIters = kBM * kChunks / kThreads;
    uint4 raw[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int e = threadIdx.x + it * kThreads, q = e / kChunks, c = (e % kChunks) * VY;
      if (q < ntok && c < ncols)
        raw[it] = *reinterpret_cast<const uint4*>(y + toks[q] * p.ldy + o0 + c);
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int e = threadIdx.x + it * kThreads, q = e / kChunks, c = (e % kChunks) * VY;
      if (q < ntok && c < ncols) {
        T* v = reinterpret_cast<T*>(&raw[it]);
        const float* cs = Cs + q * (kBNE + 4) + c;
#pragma unroll
        for (int i = 0; i < VY; ++i) v[i] = from_f32<T>(to_f32(v[i]) + scale * cs[i]);
        *reinterpret_cast<uint4*>(y + toks[q] * p.ldy + o0 + c) = raw[it];
      }
    }
  } else {
#pragma unroll 4
    for (int e = threadIdx.x; e < kBM * kBNE; e += kThreads) {
      const int q = e / kBNE, c = e % kBNE;
      if (q < ntok && c < ncols) {
        T* py = y + toks[q] * p.ldy + o0 + c;
        *py = from_f32<T>(to_f32(*py) + scale * Cs[q * (kBNE + 4) + c]);
      }
    }
  }
#else
  __trap();  // tensor-core tiles need an sm_80+ image (the launcher never sends them here)
#endif
}

template <class T>
void expand_t(const MultiLoraParams& p, const MultiLoraPlan& plan, int64_t ksplit, bool count_bad,
              cudaStream_t s) {
  constexpr int V = kVec<T>;
  const int64_t ytiles = expand_tiles(p);
  if (ytiles == 0) return;
  const dim3 grid(plan.tiles * ytiles);
  // y rows and every slice boundary V-aligned: the tile epilogue uses 16-byte accesses.
  bool vec_y = aligned16(p.y) && p.ldy % V == 0;
  for (int64_t i = 0; i <= p.n; ++i) vec_y = vec_y && p.out_off[i] % V == 0;
  if (p.r_max % V == 0 && aligned16(p.B)) {
    LORA_EXT_LAUNCH(expand_kernel<T, V>, grid, kThreads, 0, s, p, plan.grouped, plan.tiles, ksplit,
                    count_bad, vec_y);
  } else {
    LORA_EXT_LAUNCH(expand_kernel<T, 1>, grid, kThreads, 0, s, p, plan.grouped, plan.tiles, ksplit,
                    count_bad, vec_y);
  }
}

}  // namespace

void launch_expand(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int64_t ksplit,
                   bool count_bad, cudaStream_t s) {
  dispatch(dt, [&](auto tag) { expand_t<typename decltype(tag)::type>(p, plan, ksplit, count_bad, s); });
}

}  // namespace lora_ext::cuda::multi
