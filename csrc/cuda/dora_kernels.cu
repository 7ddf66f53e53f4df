// CUDA kernels of dora_norm: merge_tiles.cuh's tiles of W + S summed into squares in
// ../dora_math.h's order (tiling: above dora_kernel).
#include "merge_tiles.cuh"

namespace lora_ext::cuda {
namespace {

using namespace merge_tiles;

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

}  // namespace

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

}  // namespace lora_ext::cuda
