// Expand half of multi_lora_: y[t, o] += scales[sl, a] * sum_{j < r} B[a, o, j] u[sl, t, j] for
// the tokens t of a tile (adapter a) and tiles of 64 output columns o of slice sl; u is the
// sum of the shrink's split-K partials (fixed order), y is rounded once.
//
// Grid: x = token tile + tiles * column group; a group is `ncg` consecutive 64-column tiles
// (of all slices; 1 for small batches), walked one after another by the block so that the
// tile's token ids and u rows are staged once per slice. 128 threads. Paths as the shrink's
// (multi_kernels.cuh says which):
//   streaming: 8 tokens at a time, their u rows go to smem (512 ranks at a time, only the
//     tokens and ranks that exist; in a fused decode, T <= 8, the block computes them from x
//     and A itself, as the shrink kernel would: one launch for multi_lora_); thread (c, h)
//     owns column o0 + c (c < 64) and tokens h, h+2, h+4, h+6: it reads its row B[a, o, :r]
//     with 16-byte loads (a warp covers 32 consecutive rows: contiguous bytes) and broadcasts
//     u from smem; its y values are loaded while u is staged (a decode block is a short chain
//     of memory round trips).
//   tensor cores: 64 tokens x 64 columns, K = r in steps of 32 through smem (u kept there
//     across the group's column tiles when r <= 32), u split into hi + lo TF32 parts (B too
//     when fp32), wmma m16n16k8, fp32 accumulation; the tile goes out through its own smem
//     with 16-byte read-modify-writes of y when aligned, y's loads issued before the MMAs.
#include <algorithm>
#include <type_traits>

#include "multi_kernels.cuh"

namespace lora_ext::cuda::multi {
namespace {

// Column tile yt of all slices: its slice, first column and width; false past the last one.
__device__ __forceinline__ bool column_tile(const MultiLoraParams& p, int64_t yt, int64_t& sl,
                                            int64_t& o0, int64_t& ncols) {
  for (int s = 0; s < p.n; ++s) {
    const int64_t w = p.out_off[s + 1] - p.out_off[s], nt = (w + kBNE - 1) / kBNE;
    if (yt < nt) {
      sl = s;
      o0 = p.out_off[s] + yt * kBNE;
      ncols = min(static_cast<int64_t>(kBNE), p.out_off[s + 1] - o0);
      return true;
    }
    yt -= nt;
  }
  return false;
}

// The launch's choices (expand_t): paths, grid split and what the staging reads.
struct ExpandArgs {
  bool grouped;
  int64_t tiles;   // token tiles (grid = tiles x column groups)
  int64_t ksplit;  // split-K partials summed into u (1: u is summed already)
  int64_t kchunk;  // fused: the shrink's K chunk
  int64_t ncg;     // column tiles per block
  bool count_bad, vec_y;
  bool fused;      // u = x A^T computed by the block itself (ungrouped decode; see multi_lora())
  bool vec_x;      // fused: the shrink's 16-byte loads of x and A
};

// Fused decode: Us[q][j] = u of token tk[q] (q < nq) and rank row j < nrows of slice sl,
// adapter a, computed here the way the shrink kernel's streaming path computes its K chunks'
// partials (stream_chunk + warp_sum) and sum_partials folds them (chunk order): the same bits.
template <class T, int VX>
__device__ __forceinline__ void fused_u(const MultiLoraParams& p, int64_t a, int64_t sl,
                                        const int64_t* tk, int nq, int nrows, int64_t ksplit,
                                        int64_t kchunk, float* Us) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* A = static_cast<const T*>(p.A) + (sl * p.S + a) * p.r_max * p.in;
  const T* xr[kSkinny];
#pragma unroll
  for (int q = 0; q < kSkinny; ++q) xr[q] = static_cast<const T*>(p.x) + tk[q < nq ? q : 0] * p.ldx;
  constexpr int R = 2;  // rank rows per warp and pass (registers: the kernel's other paths)
  for (int row0 = R * warp; row0 < nrows; row0 += R * (kThreads / 32)) {
    const T* ar[R];  // rows past nrows re-read the last one (their sums are dropped)
#pragma unroll
    for (int i = 0; i < R; ++i) ar[i] = A + min(row0 + i, nrows - 1) * p.in;
    // The chunks run one after another (each ends in warp sums): the lane's pieces of all of
    // them are requested first, so that their loads hit L1 instead of waiting in turn.
    for (int64_t k = lane * VX; k < p.in; k += 32 * VX) {
#pragma unroll
      for (int i = 0; i < R; ++i) prefetch_l1(ar[i] + k);
#pragma unroll
      for (int q = 0; q < kSkinny; ++q)
        if (q < nq) prefetch_l1(xr[q] + k);
    }
    for (int64_t z = 0; z < ksplit; ++z) {  // chunk partials folded in Us, in chunk order
      float acc[R][kSkinny];
      stream_chunk<T, VX, R>(ar, xr, nq, z * kchunk, min(p.in, (z + 1) * kchunk), acc);
#pragma unroll
      for (int q = 0; q < kSkinny; ++q) {
        if (q < nq) {
#pragma unroll
          for (int i = 0; i < R; ++i) {
            const float part = warp_sum(acc[i][q]);
            float* us = Us + q * kUChunk + row0 + i;
            if (lane == 0 && row0 + i < nrows) *us = z == 0 ? part : *us + part;
          }
        }
      }
    }
  }
}

// 3 blocks per SM for 16-bit T (<= 168 registers, no spills); fp32 (B split into hi + lo parts
// too) needs about 180: 2 blocks. The column-tile loop is instantiated per path (the tile's,
// block-uniform), so neither path's registers hold the other's state.
template <class T, int V>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 3)
    expand_kernel(const MultiLoraParams p, const ExpandArgs ea) {
  constexpr int kOps = 2 * kBM * kLd, kOut = kBM * (kBNE + 4), kUs = kSkinny * kUChunk;
  __shared__ __align__(32) float smem[kOps + kOut > kUs ? kOps + kOut : kUs];
  __shared__ int64_t toks[kBM];
  const int tiles = static_cast<int>(ea.tiles), tile = static_cast<int>(blockIdx.x) % tiles;
  const int yt0 = static_cast<int>(blockIdx.x) / tiles * static_cast<int>(ea.ncg);
  const int64_t ksplit = ea.ksplit;
  Tile tl;
  if (!resolve_tile(p, ea.grouped, tile, ea.count_bad && yt0 == 0, tl, toks)) return;
  __syncthreads();

  const int64_t zstride = p.n * p.T * p.r_max;
  T* y = static_cast<T*>(p.y);
  const int ntok = tl.ntok;
  int64_t staged = -1;  // slice whose u rows are in smem (when they fit one pass), else -1
  int64_t sl, o0, ncols;
  // the path is the tile's (block-uniform): one loop over the column tiles per path
  const auto columns = [&](auto tc_path) {
    constexpr bool kTC = decltype(tc_path)::value;
    for (int g = 0; g < ea.ncg && column_tile(p, yt0 + g, sl, o0, ncols); ++g) {
      const int64_t rank = rank_of(p, sl, tl.a);
      const float scale = p.scales[sl * p.slot_stride + tl.a];  // loaded beside the rank
      if (rank == 0) continue;
      const T* B = static_cast<const T*>(p.B) + (tl.a * p.out + o0) * p.r_max;
      const float* u = p.u + sl * p.T * p.r_max;
      if (threadIdx.x < ncols) prefetch_l1(B + threadIdx.x * p.r_max);  // B rows, while u is staged

      if constexpr (!kTC) {
        float* Us = smem;  // [kSkinny][kUChunk]
        const int c = threadIdx.x % kBNE, h = threadIdx.x / kBNE;
        // one pass of u (<= 8 tokens, <= 512 ranks) stays staged for the next column tiles
        const bool keep = ntok <= kSkinny && rank <= kUChunk;
        // one pass unless a big tile lacks tensor cores
        for (int q0 = 0; q0 < ntok; q0 += kSkinny) {
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
            if (!keep || staged != sl) {
              __syncthreads();  // earlier passes are done with Us
              if (ea.fused) {  // one pass: <= 8 tokens, rank <= 512 (the launcher checked)
                if (ea.vec_x) {
                  fused_u<T, kVec<T>>(p, tl.a, sl, toks + q0, nq, jn, ksplit, ea.kchunk, Us);
                } else {
                  fused_u<T, 1>(p, tl.a, sl, toks + q0, nq, jn, ksplit, ea.kchunk, Us);
                }
              } else {
#pragma unroll 1
                for (int e = threadIdx.x; e < nq * jn; e += kThreads) {
                  const int q = e / jn, j = e - q * jn;
                  Us[q * kUChunk + j] =
                      sum_partials(u + toks[q0 + q] * p.r_max + jc + j, zstride, ksplit);
                }
              }
              __syncthreads();
              staged = keep ? sl : -1;
            }
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
                      if (h + 2 * qi < nq)
                        acc[qi] = fmaf(bv[i], Us[(h + 2 * qi) * kUChunk + j + i], acc[qi]);
                  }
                }
              }
            }
          }
          if (c < ncols) {
#pragma unroll
            for (int qi = 0; qi < kSkinny / 2; ++qi) {
              const int q = h + 2 * qi;
              if (q < nq) y[toks[q0 + q] * p.ldy + o0 + c] = from_f32<T>(yv[qi] + scale * acc[qi]);
            }
          }
        }
      } else {
#if LORA_EXT_TF32_MMA
        constexpr bool kSplitB = sizeof(T) == 4;
        constexpr int VY = kVec<T>, kChunks = kBNE / VY, kYIters = kBM * kChunks / kThreads;
        const int warp = threadIdx.x >> 5;
        float* Xs = smem;                  // u step [kBM][kLd]
        float* Ws = smem + kBM * kLd;      // B step [kBNE][kLd]
        float* Cs = smem + 2 * kBM * kLd;  // product [kBM][kBNE + 4]
        uint4 raw[kYIters];  // this tile's y (16-byte path), loaded before the MMAs
        const bool vec_y = ea.vec_y;
        if (vec_y) {
#pragma unroll
          for (int it = 0; it < kYIters; ++it) {
            const int e = threadIdx.x + it * kThreads, q = e / kChunks, c = (e % kChunks) * VY;
            if (q < ntok && c < ncols)
              raw[it] = *reinterpret_cast<const uint4*>(y + toks[q] * p.ldy + o0 + c);
          }
        }
        AccFrag acc[kBNE / 16];
#pragma unroll
        for (int c = 0; c < kBNE / 16; ++c) nvcuda::wmma::fill_fragment(acc[c], 0.f);
        const bool keep = rank <= kBK;  // u's one K step stays staged for the next column tiles
        for (int64_t k = 0; k < rank; k += kBK) {
          __syncthreads();  // the previous step's (or tile's) MMAs and epilogue are done
          if (!keep || staged != sl) {
            // u rows (sum of the split-K partials), 8 of a thread's 16 elements at a time: their
            // first partials are loaded at once, then the other splits
            constexpr int kUIters = kBM * kBK / kThreads, kUHalf = kUIters / 2;
#pragma unroll 1
            for (int i0 = 0; i0 < kUIters; i0 += kUHalf) {
              float sv[kUHalf];
#pragma unroll
              for (int it = 0; it < kUHalf; ++it) {
                const int e = threadIdx.x + (i0 + it) * kThreads, q = e / kBK, j = e % kBK;
                sv[it] = q < ntok && k + j < rank ? u[toks[q] * p.r_max + k + j] : 0.f;  // split 0
              }
              for (int64_t z = 1; z < ksplit; ++z) {
#pragma unroll
                for (int it = 0; it < kUHalf; ++it) {
                  const int e = threadIdx.x + (i0 + it) * kThreads, q = e / kBK, j = e % kBK;
                  if (q < ntok && k + j < rank)
                    sv[it] += u[z * zstride + toks[q] * p.r_max + k + j];
                }
              }
#pragma unroll
              for (int it = 0; it < kUHalf; ++it) {
                const int e = threadIdx.x + (i0 + it) * kThreads;
                Xs[(e / kBK) * kLd + e % kBK] = sv[it];
              }
            }
            staged = keep ? sl : -1;
          }
          load_tile<T, V, kBNE>(Ws, [&](int r) { return B + r * p.r_max; },
                                static_cast<int>(ncols), k, rank);
          __syncthreads();
          mma_step<kBNE / 16, true, kSplitB>(Xs + warp * 16 * kLd, Ws, acc, step_cols(k, rank));
        }
#pragma unroll
        for (int c = 0; c < kBNE / 16; ++c)
          nvcuda::wmma::store_matrix_sync(Cs + warp * 16 * (kBNE + 4) + c * 16, acc[c], kBNE + 4,
                                          nvcuda::wmma::mem_row_major);
        __syncthreads();
        if (vec_y) {  // 16-byte read-modify-writes of y
#pragma unroll
          for (int it = 0; it < kYIters; ++it) {
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
    }
  };
  if (tl.tc) {
    columns(std::true_type{});
  } else {
    columns(std::false_type{});
  }
}

template <class T>
void expand_t(const MultiLoraParams& p, const MultiLoraPlan& plan, int64_t ksplit, bool count_bad,
              bool fused, cudaStream_t s) {
  constexpr int V = kVec<T>;
  const int64_t ytiles = expand_tiles(p);
  if (ytiles == 0) return;
  ExpandArgs ea{};
  ea.grouped = plan.grouped;
  ea.tiles = plan.tiles;
  ea.ksplit = ksplit;
  ea.kchunk = plan.kchunk;
  ea.count_bad = count_bad;
  ea.fused = fused;
  // the shrink kernel's rule for its 16-byte loads (the bits depend on it)
  ea.vec_x = p.in % V == 0 && p.ldx % V == 0 && aligned16(p.x) && aligned16(p.A);
  // ncg column tiles per block, so that a token tile's ids and u rows are staged once for
  // several column tiles, while about 8 blocks per SM are left (decode: one each). Fused, each
  // block computes its tiles' u (reading A): about one block per SM bounds that work. The
  // tiles that work are at most min(T, S) ungrouped (one per adapter; the others exit).
  const int64_t busy = plan.grouped ? plan.tiles : std::min(plan.tiles, p.S);
  ea.ncg = fused ? std::clamp<int64_t>(ceil_div(busy * ytiles, p.num_sms), 1, ytiles)
                 : std::clamp<int64_t>(busy * ytiles / (8LL * p.num_sms), 1, 8);
  const dim3 grid(plan.tiles * ceil_div(ytiles, ea.ncg));
  // y rows and every slice boundary V-aligned: the tile epilogue uses 16-byte accesses.
  ea.vec_y = aligned16(p.y) && p.ldy % V == 0;
  for (int64_t i = 0; i <= p.n; ++i) ea.vec_y = ea.vec_y && p.out_off[i] % V == 0;
  if (p.r_max % V == 0 && aligned16(p.B)) {
    LORA_EXT_LAUNCH(expand_kernel<T, V>, grid, kThreads, 0, s, p, ea);
  } else {
    LORA_EXT_LAUNCH(expand_kernel<T, 1>, grid, kThreads, 0, s, p, ea);
  }
}

}  // namespace

void launch_expand(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int64_t ksplit,
                   bool count_bad, bool fused, cudaStream_t s) {
  dispatch(dt, [&](auto tag) {
    expand_t<typename decltype(tag)::type>(p, plan, ksplit, count_bad, fused, s);
  });
}

}  // namespace lora_ext::cuda::multi
