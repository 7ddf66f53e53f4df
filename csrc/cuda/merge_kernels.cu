// CUDA kernels of merge_ / remerge_ / merge_points_ (tiles and element math: merge_tiles.cuh).
// merge_kernel: a thread first issues the loads of its 32 W elements, then computes their
// delta (merge_tiles.cuh's delta) and writes W once; nothing but the two small staging arrays
// is used. The exact variant computes S for the old and for the new adapter set,
// reconstructs W0, checks the new value and ORs failure bits (rare) and first-merge codes into
// int32 words.
#include <algorithm>

#include "merge_tiles.cuh"

namespace lora_ext::cuda {
namespace {

using namespace merge_tiles;

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
    add_delta<F>(w, acc);
  }
  store_tile<F>(p.w, p.P, p.Q, p.ld, vec, p0, q0, w);
}

// merge_strip_kernel: merges without state whose total rank is <= kStripRank. Block (x, y) owns
// column strip x (BQ columns) and row tiles y * tpb .. y * tpb + tpb - 1, one after another:
// the strip's R [Rt][BQ] is staged once; each row tile's L rows come through registers. The
// next tile's W elements and L values are loaded before this tile's FMAs, so they are in flight
// while it computes and stores (the grid is about two blocks per SM). Same FMA order and
// element math as merge_kernel: the same bits.
constexpr int kStripRank = 32;

// The piece of concatenated rank index j, and j within it.
__device__ __forceinline__ int piece_of(const Factors& f, int j, int& jl) {
  int k = 0;
  jl = j;
  while (k + 1 < f.n && jl >= f.pc[k].rank) jl -= static_cast<int>(f.pc[k++].rank);
  return k;
}

template <class F>
__global__ void __launch_bounds__(kThreads, F::kBits == 16 ? 2 : 1)
    merge_strip_kernel(const MergeParams p, int64_t tpb) {
  using TL = Tile<F>;
  constexpr int kL = kStripRank * TL::BP / kThreads;  // L values per thread and tile
  __shared__ __align__(16) float Rs[kStripRank][TL::BQ];
  __shared__ __align__(16) float Ls[kStripRank][TL::LS];
  const int Rt = static_cast<int>(p.f.Rt);
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * TL::BQ;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tpb;
  const int64_t t1 = min((p.P + TL::BP - 1) / TL::BP, t0 + tpb);
  if (t0 >= t1) return;
  const bool vec = vec_rows<F>(p.w, p.ld);
  for (int e = threadIdx.x; e < Rt * (TL::BQ / 4); e += kThreads) {
    const int j = e / (TL::BQ / 4), c4 = e % (TL::BQ / 4);
    int jl;
    const int k = piece_of(p.f, j, jl);
    stage_r4(p.f.pc[k], jl, q0 + c4 * 4, p.Q, &Rs[j][c4 * 4]);
  }
  // L value i of a thread: element e = threadIdx.x + i * kThreads of the tile's [BP][Rt]
  auto load_l = [&](int64_t p0, float (&l)[kL]) {
#pragma unroll
    for (int i = 0; i < kL; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads, r = e / Rt;
      int jl;
      const int k = piece_of(p.f, e - r * Rt, jl);
      l[i] = r < TL::BP && p0 + r < p.P ? l_at(p.f.pc[k], p0 + r, jl) : 0.f;
    }
  };
  uint32_t w[TL::RPT][TL::G][kWords<F>];
  float l[kL];
  load_tile<F>(p.w, p.P, p.Q, p.ld, vec, t0 * TL::BP, q0, w);
  load_l(t0 * TL::BP, l);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t p0 = t * TL::BP;
    __syncthreads();  // the previous tile's FMAs are done with Ls
#pragma unroll
    for (int i = 0; i < kL; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads, r = e / Rt;
      if (r < TL::BP) Ls[e - r * Rt][r] = l[i];
    }
    __syncthreads();
    uint32_t wn[TL::RPT][TL::G][kWords<F>];
    if (t + 1 < t1) {
      load_tile<F>(p.w, p.P, p.Q, p.ld, vec, p0 + TL::BP, q0, wn);
      load_l(p0 + TL::BP, l);
    }
    float acc[TL::RPT][TL::V];
    zero<F>(acc);
    fma_steps<F>(&Rs[0][0], &Ls[0][0], Rt, acc);
    add_delta<F>(w, acc);
    store_tile<F>(p.w, p.P, p.Q, p.ld, vec, p0, q0, w);
#pragma unroll
    for (int i = 0; i < TL::RPT; ++i)
#pragma unroll
      for (int h = 0; h < TL::G; ++h)
#pragma unroll
        for (int q = 0; q < kWords<F>; ++q) w[i][h][q] = wn[i][h][q];
  }
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
    } else if (p.f.Rt <= kStripRank && p.num_sms > 0) {
      // about two blocks per SM, each over tpb row tiles of one column strip
      const int64_t ptiles = ceil_div(p.P, TL::BP), qtiles = ceil_div(p.Q, TL::BQ);
      const int64_t tpb = std::max<int64_t>(1, ceil_div(ptiles * qtiles, 2LL * p.num_sms));
      const int64_t ry = ceil_div(ptiles, tpb);
      if (qtiles >= (int64_t{1} << 31) || ry > 65535) return cudaErrorInvalidConfiguration;
      const dim3 sgrid(static_cast<unsigned>(qtiles), static_cast<unsigned>(ry));
      LORA_EXT_LAUNCH(merge_strip_kernel<F>, sgrid, kThreads, 0, stream, p, tpb);
    } else {
      LORA_EXT_LAUNCH(merge_kernel<F, false>, grid, kThreads, 0, stream, p);
    }
    return cudaGetLastError();
  });
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
