// CUDA kernels of merge_ / remerge_ / merge_points_ (element math: ../merge_math.h, shared
// with the CPU kernels, so both give the same bits), and dora_norm (the same tiles summed into
// squares in ../dora_math.h's order; its tiling: above dora_kernel).
//
// Tiling of merge_kernel: a block of 256 threads (8 warps) owns a tile of BP rows x BQ
// columns of W [P, Q]. A thread owns RPT rows (warp * RPT + i) and V columns laid out as
// V/4 groups of 4: columns h * 128 + lane * 4 + u, so a warp reads each row piece with
// 8- or 16-byte accesses that cover 256 / 512 contiguous bytes, and its float4 reads of the
// R tile in shared memory are conflict free.
//   16-bit W: RPT = 4, V = 8 -> tile 32 x 256;  fp32 W: RPT = 8, V = 4 -> tile 64 x 128.
// The thread first issues the loads of its 32 W elements, then computes their fp32 delta
// S = L R in registers: the rank is walked in chunks of kJC = 16 staged in shared memory
// (R chunk [16][BQ], L chunk [16][BP]); each rank step is 1-2 float4 loads of L
// (broadcast), 1-2 float4 loads of R and 32 FMAs in a fixed order (so S matches the CPU).
// W is read once and written once; nothing but the two small staging arrays is used.
// The exact variant computes S for the old and for the new adapter set, reconstructs W0,
// checks the new value and ORs failure bits (rare) and first-merge codes into int32 words.
#include <algorithm>
#include <type_traits>

#include "../dora_math.h"
#include "../merge_math.h"
#include "common.cuh"
#include "launch.h"

namespace lora_ext::cuda {
namespace {

namespace mm = lora_ext::merge_math;
namespace dm = lora_ext::dora_math;

constexpr int kThreads = 256;
constexpr int kJC = 16;  // rank chunk staged in shared memory

template <class F>
struct Tile {
  static constexpr int V = F::kBits == 16 ? 8 : 4;  // columns per thread
  static constexpr int G = V / 4;                   // groups of 4 columns
  static constexpr int RPT = F::kBits == 16 ? 4 : 8;
  static constexpr int BP = 8 * RPT;   // rows per block (8 warps)
  static constexpr int BQ = 32 * V;    // columns per block
  static constexpr int LS = BP + 4;    // padded row of the L chunk in shared memory
};

// Raw bits of 4 consecutive elements of a row, packed: 2 words for 16-bit, 4 for fp32.
template <class F>
constexpr int kWords = F::kBits == 16 ? 2 : 4;

template <class F>
__device__ __forceinline__ uint32_t get(const uint32_t (&g)[kWords<F>], int u) {
  if constexpr (F::kBits == 16) {
    return (g[u >> 1] >> ((u & 1) * 16)) & 0xFFFFu;
  } else {
    return g[u];
  }
}

template <class F>
__device__ __forceinline__ void set(uint32_t (&g)[kWords<F>], int u, uint32_t v) {
  if constexpr (F::kBits == 16) {
    const int sh = (u & 1) * 16;
    g[u >> 1] = (g[u >> 1] & ~(0xFFFFu << sh)) | (v << sh);
  } else {
    g[u] = v;
  }
}

// Loads / stores the n (<= 4) in-bounds elements of a group; 8- or 16-byte accesses when
// the group is whole and `vec` (aligned rows).
template <class F>
__device__ __forceinline__ void load4(const void* base, int64_t off, bool vec, int n,
                                      uint32_t (&g)[kWords<F>]) {
  using Raw = std::conditional_t<F::kBits == 16, uint16_t, uint32_t>;
  const Raw* b = static_cast<const Raw*>(base) + off;
  if (vec && n == 4) {
    if constexpr (F::kBits == 16) {
      const uint2 r = *reinterpret_cast<const uint2*>(b);
      g[0] = r.x, g[1] = r.y;
    } else {
      const uint4 r = *reinterpret_cast<const uint4*>(b);
      g[0] = r.x, g[1] = r.y, g[2] = r.z, g[3] = r.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kWords<F>; ++i) g[i] = 0;
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < n) set<F>(g, u, b[u]);
  }
}

template <class F>
__device__ __forceinline__ void store4(void* base, int64_t off, bool vec, int n,
                                       const uint32_t (&g)[kWords<F>]) {
  using Raw = std::conditional_t<F::kBits == 16, uint16_t, uint32_t>;
  Raw* b = static_cast<Raw*>(base) + off;
  if (vec && n == 4) {
    if constexpr (F::kBits == 16) {
      *reinterpret_cast<uint2*>(b) = make_uint2(g[0], g[1]);
    } else {
      *reinterpret_cast<uint4*>(b) = make_uint4(g[0], g[1], g[2], g[3]);
    }
  } else {
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < n) b[u] = static_cast<Raw>(get<F>(g, u));
  }
}

// One element of a factor as fp32.
__device__ __forceinline__ float factor_elem(const void* base, DType t, int64_t i) {
  if (t == DType::BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  if (t == DType::F16) return __half2float(static_cast<const __half*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

// L[p, j] and R[j, q] of a piece (j counted within the piece), scaled as launch.h says.
__device__ __forceinline__ float l_at(const FactorPiece& pc, int64_t p, int64_t j) {
  const float v = factor_elem(pc.l, pc.lt, p * pc.ls0 + j * pc.ls1);
  return pc.scaled == 1 ? __fmul_rn(v, pc.scale) : v;
}
__device__ __forceinline__ float r_at(const FactorPiece& pc, int64_t j, int64_t q) {
  const float v = factor_elem(pc.r, pc.rt, j * pc.rs0 + q * pc.rs1);
  return pc.scaled == 2 ? __fmul_rn(v, pc.scale) : v;
}

// R[j, q .. q + 3] into v, zeros past column Q; one 8- or 16-byte load when the row allows.
__device__ __forceinline__ void r_at4(const FactorPiece& pc, int64_t j, int64_t q, int64_t Q,
                                      float (&v)[4]) {
  if (pc.vec_r && q + 4 <= Q) {
    const int64_t i = j * pc.rs0 + q;
    if (pc.rt == DType::F32) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(pc.r) + i));
      v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
    } else {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(pc.r) + i));
      const uint32_t w[2] = {x.x, x.y};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint16_t h = static_cast<uint16_t>(w[u >> 1] >> ((u & 1) * 16));
        v[u] = pc.rt == DType::BF16 ? __uint_as_float(static_cast<uint32_t>(h) << 16)
                                    : __half2float(__ushort_as_half(h));
      }
    }
    if (pc.scaled == 2) {
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = __fmul_rn(v[u], pc.scale);
    }
  } else {
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = q + u < Q ? r_at(pc, j, q + u) : 0.f;
  }
}

// acc[i][h*4+u] = fma chain over the concatenated rank j of L[row_i, j] * R[j, col(h, u)],
// from +0; rows past P and columns past Q read zero factors. Each piece's rank is walked in
// chunks of kJC staged in shared memory (fp32, converted and scaled on the way).
// Called by every thread of the block (it synchronises).
template <class F>
__device__ __forceinline__ void delta(const Factors& f, int64_t P, int64_t Q, int64_t p0,
                                      int64_t q0, float (*Rs)[Tile<F>::BQ],
                                      float (*Ls)[Tile<F>::LS],
                                      float (&acc)[Tile<F>::RPT][Tile<F>::V]) {
  using TL = Tile<F>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < TL::RPT; ++i)
#pragma unroll
    for (int v = 0; v < TL::V; ++v) acc[i][v] = 0.f;
  for (int k = 0; k < f.n; ++k) {
    const FactorPiece& pc = f.pc[k];
    for (int64_t j0 = 0; j0 < pc.rank; j0 += kJC) {
      const int jn = static_cast<int>(min(static_cast<int64_t>(kJC), pc.rank - j0));
      __syncthreads();  // the previous chunk is consumed
      for (int t = threadIdx.x; t < jn * (TL::BQ / 4); t += kThreads) {
        const int jj = t / (TL::BQ / 4), c4 = t % (TL::BQ / 4);
        float v[4];
        r_at4(pc, j0 + jj, q0 + c4 * 4, Q, v);
        float4 x;
        x.x = v[0], x.y = v[1], x.z = v[2], x.w = v[3];
        *reinterpret_cast<float4*>(&Rs[jj][c4 * 4]) = x;
      }
      for (int t = threadIdx.x; t < jn * TL::BP; t += kThreads) {
        const int r = t / jn, jj = t % jn;
        Ls[jj][r] = p0 + r < P ? l_at(pc, p0 + r, j0 + jj) : 0.f;
      }
      __syncthreads();
#pragma unroll 2
      for (int jj = 0; jj < jn; ++jj) {
        float lv[TL::RPT], rv[TL::V];
#pragma unroll
        for (int i = 0; i < TL::RPT; i += 4) {
          const float4 x = *reinterpret_cast<const float4*>(&Ls[jj][warp * TL::RPT + i]);
          lv[i] = x.x, lv[i + 1] = x.y, lv[i + 2] = x.z, lv[i + 3] = x.w;
        }
#pragma unroll
        for (int h = 0; h < TL::G; ++h) {
          const float4 x = *reinterpret_cast<const float4*>(&Rs[jj][h * 128 + lane * 4]);
          rv[h * 4] = x.x, rv[h * 4 + 1] = x.y, rv[h * 4 + 2] = x.z, rv[h * 4 + 3] = x.w;
        }
#pragma unroll
        for (int i = 0; i < TL::RPT; ++i)
#pragma unroll
          for (int v = 0; v < TL::V; ++v) acc[i][v] = __fmaf_rn(lv[i], rv[v], acc[i][v]);
      }
    }
  }
}

// Raw bits of the thread's elements of the tile at (p0, q0) of W [P, Q] (row stride ld), packed;
// zeros outside W.
template <class F>
__device__ __forceinline__ void load_tile(const void* w, int64_t P, int64_t Q, int64_t ld, bool vec,
                                          int64_t p0, int64_t q0,
                                          uint32_t (&g)[Tile<F>::RPT][Tile<F>::G][kWords<F>]) {
  using TL = Tile<F>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < TL::RPT; ++i) {
    const int64_t row = p0 + warp * TL::RPT + i;
#pragma unroll
    for (int h = 0; h < TL::G; ++h) {
      const int64_t col = q0 + h * 128 + lane * 4;
      const int n = row < P ? static_cast<int>(max(int64_t{0}, min(int64_t{4}, Q - col))) : 0;
      load4<F>(w, row * ld + col, vec, n, g[i][h]);
    }
  }
}

template <class F>
__device__ __forceinline__ bool vec_rows(const void* w, int64_t ld) {
  return ld % 4 == 0 && (reinterpret_cast<uintptr_t>(w) & (F::kBits == 16 ? 7 : 15)) == 0;
}

template <class F, bool EXACT>
__global__ void __launch_bounds__(kThreads, EXACT ? 1 : 2) merge_kernel(const MergeParams p) {
  using TL = Tile<F>;
  __shared__ __align__(16) float Rs[kJC][TL::BQ];
  __shared__ __align__(16) float Ls[kJC][TL::LS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ptiles = (p.P + TL::BP - 1) / TL::BP;  // blockIdx.x = row tile + ptiles * column tile
  const int64_t p0 = static_cast<int64_t>(blockIdx.x % ptiles) * TL::BP;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x / ptiles) * TL::BQ;
  const bool vec = vec_rows<F>(p.w, p.ld);

  uint32_t w[TL::RPT][TL::G][kWords<F>];  // raw bits of the thread's elements, packed
  load_tile<F>(p.w, p.P, p.Q, p.ld, vec, p0, q0, w);

  float acc[TL::RPT][TL::V];
  if constexpr (EXACT) {
    const int k = p.bits;
    const bool has_old = p.fo.Rt > 0, has_new = p.f.Rt > 0;
    if (has_old) delta<F>(p.fo, p.P, p.Q, p0, q0, Rs, Ls, acc);
    float so[TL::RPT][TL::V];
#pragma unroll
    for (int i = 0; i < TL::RPT; ++i)
#pragma unroll
      for (int v = 0; v < TL::V; ++v) so[i][v] = has_old ? acc[i][v] : 0.f;
    if (has_new) delta<F>(p.f, p.P, p.Q, p0, q0, Rs, Ls, acc);
#pragma unroll
    for (int i = 0; i < TL::RPT; ++i) {
      const int64_t row = p0 + warp * TL::RPT + i;
#pragma unroll
      for (int h = 0; h < TL::G; ++h) {
        const int64_t col = q0 + h * 128 + lane * 4;
        int64_t word = -1;  // first-merge codes, OR-ed one word at a time
        uint32_t bits = 0;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (row >= p.P || col + u >= p.Q) continue;
          const int64_t e = row * p.Q + col + u;
          uint32_t x = get<F>(w[i][h], u);
          uint32_t code;
          if (!has_old) {
            code = mm::code_of<F>(x, k);
            const int64_t bit = e * k;
            if (k > 0 && (bit >> 5) != word) {
              if (word >= 0 && bits) atomicOr(p.codes + word, bits);
              word = bit >> 5;
              bits = 0;
            }
            if (k > 0) bits |= code << (bit & 31);
          } else {
            code = mm::read_code(p.codes, e, k);
          }
          if (!mm::transition<F>(x, so[i][h * 4 + u], has_new ? acc[i][h * 4 + u] : 0.f, code, k,
                                 has_old, has_new))
            atomicOr(p.fails + (e >> 5), 1u << (e & 31));
          set<F>(w[i][h], u, x);
        }
        if (word >= 0 && bits) atomicOr(p.codes + word, bits);
      }
    }
  } else {
    delta<F>(p.f, p.P, p.Q, p0, q0, Rs, Ls, acc);
#pragma unroll
    for (int i = 0; i < TL::RPT; ++i)
#pragma unroll
      for (int h = 0; h < TL::G; ++h)
#pragma unroll
        for (int u = 0; u < 4; ++u)
          set<F>(w[i][h], u, mm::merged<F>(get<F>(w[i][h], u), acc[i][h * 4 + u], true));
  }

#pragma unroll
  for (int i = 0; i < TL::RPT; ++i) {
    const int64_t row = p0 + warp * TL::RPT + i;
    if (row >= p.P) continue;
#pragma unroll
    for (int h = 0; h < TL::G; ++h) {
      const int64_t col = q0 + h * 128 + lane * 4;
      const int n = static_cast<int>(max(int64_t{0}, min(int64_t{4}, p.Q - col)));
      store4<F>(p.w, row * p.ld + col, vec, n, w[i][h]);
    }
  }
}

// dora_norm: the tile's W + S folded into sums of squares (order: ../dora_math.h). A block owns
// one chunk of 512 `in` indices. ROWS (in along Q): a row tile x the chunk's 4 (fp32) / 2 (16-bit)
// column tiles; a thread chains the squares of its columns 4 lane + u (of every 128) per row, and
// the warp combines a row's 128 classes in 8 shuffles. Columns (in along P): a column tile x the
// chunk's 8 / 16 row tiles; a thread chains its rows per column (class = its warp) and the block
// combines its 8 warps through shared memory. One chunk: the norm is written; more: the partial,
// to ws [chunks, out], summed in chunk order by dora_finish_kernel.
// (fp32 rows keep 96 floats per thread besides addresses: one block per SM, so that nothing spills.)
template <class F, bool ROWS>
__global__ void __launch_bounds__(kThreads, ROWS && F::kBits == 32 ? 1 : 2)
    dora_kernel(const DoraParams p) {
  using TL = Tile<F>;
  static_assert(dm::col_block<F>() == TL::BP && dm::col_run<F>() == TL::RPT,
                "dora_math's column classes are the tile's 8 warps");
  static_assert(dm::kDoraChunk % TL::BP == 0 && dm::kDoraChunk % TL::BQ == 0);
  __shared__ __align__(16) float Rs[kJC][TL::BQ];
  __shared__ __align__(16) float Ls[kJC][TL::LS];
  __shared__ float red[ROWS ? 1 : 8][TL::BQ];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ck = blockIdx.x % p.chunks, c0 = ck * dm::kDoraChunk;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x / p.chunks) * (ROWS ? TL::BP : TL::BQ);
  const int64_t c1 = min(ROWS ? p.Q : p.P, c0 + dm::kDoraChunk);
  const int64_t n_out = ROWS ? p.P : p.Q;
  const bool vec = vec_rows<F>(p.w, p.ld);
  uint32_t w[TL::RPT][TL::G][kWords<F>];
  float acc[TL::RPT][TL::V];
  float sq[ROWS ? TL::RPT : 1][ROWS ? 4 : TL::V];
#pragma unroll
  for (int i = 0; i < (ROWS ? TL::RPT : 1); ++i)
#pragma unroll
    for (int v = 0; v < (ROWS ? 4 : TL::V); ++v) sq[i][v] = 0.f;

  for (int64_t s0 = c0; s0 < c1; s0 += ROWS ? TL::BQ : TL::BP) {
    const int64_t p0 = ROWS ? t0 : s0, q0 = ROWS ? s0 : t0;
    load_tile<F>(p.w, p.P, p.Q, p.ld, vec, p0, q0, w);  // in flight during the delta's FMAs
    delta<F>(p.f, p.P, p.Q, p0, q0, Rs, Ls, acc);
    // the thread's elements past W's last column (ROWS) / row (columns) are left out: the
    // factors read as 0 there, and 0 * inf would put a NaN into the sums (the other
    // direction's tail never reaches the output)
    const int64_t left = ROWS ? p.Q - q0 - lane * 4 : p.P - p0 - warp * TL::RPT;
    const int n_in = static_cast<int>(max(int64_t{0}, min(left, int64_t{TL::BQ})));
#pragma unroll
    for (int i = 0; i < TL::RPT; ++i) {
#pragma unroll
      for (int h = 0; h < TL::G; ++h)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const bool in = (ROWS ? h * 128 + u : i) < n_in;
          const float v = in ? mm::decode(F{}, get<F>(w[i][h], u)) + acc[i][h * 4 + u] : 0.f;
          if constexpr (ROWS) {
            sq[i][u] = __fmaf_rn(v, v, sq[i][u]);  // class 4 lane + u, chained over h and tiles
          } else {
            sq[0][h * 4 + u] = __fmaf_rn(v, v, sq[0][h * 4 + u]);  // class warp, over i and tiles
          }
        }
    }
  }

  float* dst = p.chunks == 1 ? p.out : p.ws + ck * n_out;
  if constexpr (ROWS) {
    const unsigned all = 0xffffffffu;
    const bool hi = lane & 16, mid = lane & 8;
#pragma unroll
    for (int i = 0; i < TL::RPT; ++i) {
      // halving h = 64 (lanes L, L ^ 16): lanes < 16 keep u = 0, 1, the others u = 2, 3
      float k0 = hi ? sq[i][2] : sq[i][0], k1 = hi ? sq[i][3] : sq[i][1];
      k0 += __shfl_xor_sync(all, hi ? sq[i][0] : sq[i][2], 16);
      k1 += __shfl_xor_sync(all, hi ? sq[i][1] : sq[i][3], 16);
      float t = mid ? k1 : k0;  // h = 32 (lanes L, L ^ 8): one u per lane from here
      t += __shfl_xor_sync(all, mid ? k0 : k1, 8);
      t += __shfl_xor_sync(all, t, 4);  // h = 16, 8, 4
      t += __shfl_xor_sync(all, t, 2);
      t += __shfl_xor_sync(all, t, 1);
      t += __shfl_xor_sync(all, t, 8);   // lanes 0-7 / 16-23: x0 + x1 / x2 + x3
      t += __shfl_xor_sync(all, t, 16);  // (x0 + x1) + (x2 + x3)
      const int64_t row = t0 + warp * TL::RPT + i;
      if (lane == 0 && row < p.P) dst[row] = p.chunks == 1 ? dm::finish(t) : t;
    }
  } else {
#pragma unroll
    for (int h = 0; h < TL::G; ++h)
#pragma unroll
      for (int u = 0; u < 4; ++u) red[warp][h * 128 + lane * 4 + u] = sq[0][h * 4 + u];
    __syncthreads();
    for (int c = threadIdx.x; c < TL::BQ; c += kThreads) {
      const int64_t col = t0 + c;
      if (col >= p.Q) continue;
      const float t = dm::col_combine(red[0][c], red[1][c], red[2][c], red[3][c], red[4][c],
                                      red[5][c], red[6][c], red[7][c]);
      dst[col] = p.chunks == 1 ? dm::finish(t) : t;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    dora_finish_kernel(const float* ws, int64_t chunks, int64_t n, float* out) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= n) return;
  float s = ws[o];
  for (int64_t k = 1; k < chunks; ++k) s = s + ws[k * n + o];
  out[o] = dm::finish(s);
}

template <class F>
__global__ void __launch_bounds__(kThreads) points_kernel(const MergePointsParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= p.n) return;
  const int64_t e = p.idx[t];
  if (e < 0 || e >= p.P * p.Q) return;  // the launcher rejects these; never touch memory
  const int64_t row = e / p.Q, col = e % p.Q;
  float s = 0.f;
  for (int k = 0; k < p.f.n; ++k) {
    const FactorPiece& pc = p.f.pc[k];
    for (int64_t j = 0; j < pc.rank; ++j) s = __fmaf_rn(l_at(pc, row, j), r_at(pc, j, col), s);
  }
  using Raw = std::conditional_t<F::kBits == 16, uint16_t, uint32_t>;
  const uint32_t v = static_cast<const Raw*>(p.vals)[t];
  static_cast<Raw*>(p.w)[e] = static_cast<Raw>(mm::merged<F>(v, s, p.f.Rt > 0));
}

template <class F>
__global__ void __launch_bounds__(kThreads)
    code_failures_kernel(const void* w0, const float* s, int64_t n, unsigned long long* counts) {
  using Raw = std::conditional_t<F::kBits == 16, uint16_t, uint32_t>;
  unsigned long long c[4] = {0, 0, 0, 0};
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint32_t w = static_cast<const Raw*>(w0)[i];
#pragma unroll
    for (int k = 0; k < 4; ++k) c[k] += !mm::code_restores<F>(w, s[i], mm::code_width(k));
  }
#pragma unroll
  for (int k = 0; k < 4; ++k)  // integer sums: the same whatever the order
    if (c[k] != 0) atomicAdd(counts + k, c[k]);
}

template <class Fn>
decltype(auto) dispatch_format(DType dt, Fn&& fn) {
  return dispatch_dtype<mm::F32, mm::F16, mm::BF16>(
      dt, [&](auto tag) { return fn(typename decltype(tag)::type{}); });
}

}  // namespace

cudaError_t merge(DType dt, const MergeParams& p, cudaStream_t stream) {
  return dispatch_format(dt, [&](auto f) {
    using F = decltype(f);
    using TL = Tile<F>;
    const int64_t blocks = ceil_div(p.P, TL::BP) * ceil_div(p.Q, TL::BQ);
    if (blocks >= (int64_t{1} << 31)) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(blocks));
    if (p.exact) {
      LORA_EXT_LAUNCH(merge_kernel<F, true>, grid, kThreads, 0, stream, p);
    } else {
      LORA_EXT_LAUNCH(merge_kernel<F, false>, grid, kThreads, 0, stream, p);
    }
    return cudaGetLastError();
  });
}

cudaError_t dora_norm(DType dt, const DoraParams& p, cudaStream_t stream) {
  const int64_t n_out = p.rows ? p.P : p.Q;
  const cudaError_t err = dispatch_format(dt, [&](auto f) {
    using F = decltype(f);
    using TL = Tile<F>;
    const int64_t blocks = ceil_div(n_out, p.rows ? TL::BP : TL::BQ) * p.chunks;
    if (blocks >= (int64_t{1} << 31)) return cudaErrorInvalidConfiguration;
    if (p.rows) {
      LORA_EXT_LAUNCH(dora_kernel<F, true>, static_cast<unsigned>(blocks), kThreads, 0, stream, p);
    } else {
      LORA_EXT_LAUNCH(dora_kernel<F, false>, static_cast<unsigned>(blocks), kThreads, 0, stream, p);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess || p.chunks == 1) return err;
  const unsigned blocks = static_cast<unsigned>(ceil_div(n_out, kThreads));  // n_out < 2^31 * 64
  LORA_EXT_LAUNCH(dora_finish_kernel, blocks, kThreads, 0, stream, p.ws, p.chunks, n_out, p.out);
  return cudaGetLastError();
}

cudaError_t merge_points(DType dt, const MergePointsParams& p, cudaStream_t stream) {
  dispatch_format(dt, [&](auto f) {
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.n, kThreads));  // n < 2^31 (launcher)
    LORA_EXT_LAUNCH(points_kernel<decltype(f)>, blocks, kThreads, 0, stream, p);
  });
  return cudaGetLastError();
}

cudaError_t merge_code_failures(DType dt, const void* w0, const float* s, int64_t n,
                                unsigned long long* counts, int num_sms, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), 4LL * num_sms);
  dispatch_format(dt, [&](auto f) {
    LORA_EXT_LAUNCH(code_failures_kernel<decltype(f)>, blocks, kThreads, 0, stream, w0, s, n,
                    counts);
  });
  return cudaGetLastError();
}

}  // namespace lora_ext::cuda
