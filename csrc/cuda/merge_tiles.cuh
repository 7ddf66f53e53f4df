// Device helpers of the merge-family tiles (merge_kernels.cu, dora_kernels.cu): element math
// in ../merge_math.h, shared with the CPU kernels, so both give the same bits.
//
// Tiling: a block of 256 threads (8 warps) owns a tile of BP rows x BQ columns of W [P, Q].
// A thread owns RPT rows (warp * RPT + i) and V columns laid out as V/4 groups of 4: columns
// h * 128 + lane * 4 + u, so a warp reads each row piece with 8- or 16-byte accesses that
// cover 256 / 512 contiguous bytes, and its float4 reads of the R tile in shared memory are
// conflict free.
//   16-bit W: RPT = 4, V = 8 -> tile 32 x 256;  fp32 W: RPT = 8, V = 4 -> tile 64 x 128.
// The delta S = L R of the thread's elements is computed in registers: the factors (launch.h's
// Factors, read where the adapters lie) are staged in shared memory as fp32, and each rank step
// is 1-2 float4 loads of L (broadcast), 1-2 float4 loads of R and 32 FMAs in a fixed order
// (the concatenated rank ascending, so S matches the CPU).
#pragma once
#include <type_traits>

#include "../dora_math.h"
#include "../merge_math.h"
#include "common.cuh"
#include "launch.h"

namespace lora_ext::cuda::merge_tiles {

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

// Rs[j][c .. c + 3] = R[jl, q .. q + 3] of piece pc (zeros past Q), Rs rows of BQ floats.
__device__ __forceinline__ void stage_r4(const FactorPiece& pc, int64_t jl, int64_t q, int64_t Q,
                                         float* dst) {
  float v[4];
  r_at4(pc, jl, q, Q, v);
  float4 x;
  x.x = v[0], x.y = v[1], x.z = v[2], x.w = v[3];
  *reinterpret_cast<float4*>(dst) = x;
}

// acc[i][h*4+u] = fma(L[row_i, j], R[j, col(h, u)], acc) for the jn staged rank steps, in order:
// Ls [jn][LS] (rows warp * RPT + i), Rs [jn][BQ] in shared memory.
template <class F>
__device__ __forceinline__ void fma_steps(const float* Rs, const float* Ls, int jn,
                                          float (&acc)[Tile<F>::RPT][Tile<F>::V]) {
  using TL = Tile<F>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll 2
  for (int jj = 0; jj < jn; ++jj) {
    float lv[TL::RPT], rv[TL::V];
#pragma unroll
    for (int i = 0; i < TL::RPT; i += 4) {
      const float4 x = *reinterpret_cast<const float4*>(Ls + jj * TL::LS + warp * TL::RPT + i);
      lv[i] = x.x, lv[i + 1] = x.y, lv[i + 2] = x.z, lv[i + 3] = x.w;
    }
#pragma unroll
    for (int h = 0; h < TL::G; ++h) {
      const float4 x = *reinterpret_cast<const float4*>(Rs + jj * TL::BQ + h * 128 + lane * 4);
      rv[h * 4] = x.x, rv[h * 4 + 1] = x.y, rv[h * 4 + 2] = x.z, rv[h * 4 + 3] = x.w;
    }
#pragma unroll
    for (int i = 0; i < TL::RPT; ++i)
#pragma unroll
      for (int v = 0; v < TL::V; ++v) acc[i][v] = __fmaf_rn(lv[i], rv[v], acc[i][v]);
  }
}

template <class F>
__device__ __forceinline__ void zero(float (&acc)[Tile<F>::RPT][Tile<F>::V]) {
#pragma unroll
  for (int i = 0; i < Tile<F>::RPT; ++i)
#pragma unroll
    for (int v = 0; v < Tile<F>::V; ++v) acc[i][v] = 0.f;
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
  zero<F>(acc);
  for (int k = 0; k < f.n; ++k) {
    const FactorPiece& pc = f.pc[k];
    for (int64_t j0 = 0; j0 < pc.rank; j0 += kJC) {
      const int jn = static_cast<int>(min(static_cast<int64_t>(kJC), pc.rank - j0));
      __syncthreads();  // the previous chunk is consumed
      for (int t = threadIdx.x; t < jn * (TL::BQ / 4); t += kThreads) {
        const int jj = t / (TL::BQ / 4), c4 = t % (TL::BQ / 4);
        stage_r4(pc, j0 + jj, q0 + c4 * 4, Q, &Rs[jj][c4 * 4]);
      }
      for (int t = threadIdx.x; t < jn * TL::BP; t += kThreads) {
        const int r = t / jn, jj = t % jn;
        Ls[jj][r] = p0 + r < P ? l_at(pc, p0 + r, j0 + jj) : 0.f;
      }
      __syncthreads();
      fma_steps<F>(&Rs[0][0], &Ls[0][0], jn, acc);
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

// The thread's elements of the tile at (p0, q0) written back (those inside W).
template <class F>
__device__ __forceinline__ void store_tile(void* w, int64_t P, int64_t Q, int64_t ld, bool vec,
                                           int64_t p0, int64_t q0,
                                           const uint32_t (&g)[Tile<F>::RPT][Tile<F>::G][kWords<F>]) {
  using TL = Tile<F>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < TL::RPT; ++i) {
    const int64_t row = p0 + warp * TL::RPT + i;
    if (row >= P) continue;
#pragma unroll
    for (int h = 0; h < TL::G; ++h) {
      const int64_t col = q0 + h * 128 + lane * 4;
      const int n = static_cast<int>(max(int64_t{0}, min(int64_t{4}, Q - col)));
      store4<F>(w, row * ld + col, vec, n, g[i][h]);
    }
  }
}

// g = merged(g, acc): the plain merge of the thread's elements (merge_math.h).
template <class F>
__device__ __forceinline__ void add_delta(uint32_t (&g)[Tile<F>::RPT][Tile<F>::G][kWords<F>],
                                          const float (&acc)[Tile<F>::RPT][Tile<F>::V]) {
#pragma unroll
  for (int i = 0; i < Tile<F>::RPT; ++i)
#pragma unroll
    for (int h = 0; h < Tile<F>::G; ++h)
#pragma unroll
      for (int u = 0; u < 4; ++u)
        set<F>(g[i][h], u, mm::merged<F>(get<F>(g[i][h], u), acc[i][h * 4 + u], true));
}

template <class F>
__device__ __forceinline__ bool vec_rows(const void* w, int64_t ld) {
  return ld % 4 == 0 && (reinterpret_cast<uintptr_t>(w) & (F::kBits == 16 ? 7 : 15)) == 0;
}

template <class Fn>
decltype(auto) dispatch_format(DType dt, Fn&& fn) {
  return dispatch_dtype<mm::F32, mm::F16, mm::BF16>(
      dt, [&](auto tag) { return fn(typename decltype(tag)::type{}); });
}

}  // namespace lora_ext::cuda::merge_tiles
