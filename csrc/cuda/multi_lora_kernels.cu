// Host side of multi_lora_ / lora_shrink / lora_expand_ on CUDA, plus the two small kernels:
//   group_tokens (one block of 1024 threads): counting sort of the tokens by adapter with no
//     host sync. Counts per slot (shared-memory atomics; a global scratch when S is large),
//     one block-wide scan giving seg_off[S + 1] (tokens) and tile_off[S + 1] (64-token
//     tiles), then a scatter into perm[T]. Indices outside -1 .. S-1 are skipped and added
//     to the bad-index counter. The GEMM-like kernels size their grids from the shape-only
//     bound ceil(T / 64) + min(S, T) tiles; blocks past tile_off[S] exit at once.
//   reduce_partials: lora_shrink's result = sum of the split-K partials, zero past a token's
//     rank and for tokens without a valid adapter.
// Everything is sized from shapes, so a launch sequence can be captured in a CUDA graph and
// replayed with new indices, ranks and scales.
#include <algorithm>

#include "multi_lora.cuh"

namespace lora_ext::cuda {
namespace multi {
namespace {

constexpr int kGroupThreads = 1024;
constexpr int64_t kSmemCountMax = 4096;  // slots counted in shared memory

__global__ void __launch_bounds__(kGroupThreads)
    group_tokens(const void* idx, bool idx64, int64_t T, int64_t S, int32_t* ws, int* bad,
                 bool smem_counts) {
  extern __shared__ int dyn[];
  __shared__ int warp_c[32], warp_t[32];
  int32_t* perm = ws;
  int32_t* seg = ws + T;
  int32_t* toff = seg + S + 1;
  int* cnt = smem_counts ? dyn : toff + S + 1;  // [S] counts, then [S] cursors
  int* cur = cnt + S;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int64_t i = tid; i < S; i += kGroupThreads) cnt[i] = 0;
  __syncthreads();
  int nbad = 0;
  for (int64_t t = tid; t < T; t += kGroupThreads) {
    const int64_t a = load_idx(idx, idx64, t);
    if (a >= 0 && a < S) {
      atomicAdd(cnt + a, 1);
    } else if (a != -1) {
      ++nbad;
    }
  }
  if (nbad > 0 && bad != nullptr) atomicAdd(bad, nbad);
  __syncthreads();

  // Block-wide exclusive scan of (tokens, tiles) over contiguous chunks of slots.
  const int64_t chunk = (S + kGroupThreads - 1) / kGroupThreads;
  const int64_t b = min(static_cast<int64_t>(S), tid * chunk), e = min(static_cast<int64_t>(S), b + chunk);
  int cs = 0, ts = 0;
  for (int64_t i = b; i < e; ++i) {
    cs += cnt[i];
    ts += (cnt[i] + kBM - 1) / kBM;
  }
  int ci = cs, ti = ts;  // inclusive warp scan
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int c2 = __shfl_up_sync(0xffffffffu, ci, o), t2 = __shfl_up_sync(0xffffffffu, ti, o);
    if (lane >= o) {
      ci += c2;
      ti += t2;
    }
  }
  if (lane == 31) {
    warp_c[warp] = ci;
    warp_t[warp] = ti;
  }
  __syncthreads();
  if (warp == 0) {
    int wc = warp_c[lane], wt = warp_t[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int c2 = __shfl_up_sync(0xffffffffu, wc, o), t2 = __shfl_up_sync(0xffffffffu, wt, o);
      if (lane >= o) {
        wc += c2;
        wt += t2;
      }
    }
    warp_c[lane] = wc - warp_c[lane];  // exclusive prefix of each warp
    warp_t[lane] = wt - warp_t[lane];
  }
  __syncthreads();
  int cp = warp_c[warp] + ci - cs, tp = warp_t[warp] + ti - ts;
  for (int64_t i = b; i < e; ++i) {
    seg[i] = cp;
    toff[i] = tp;
    cur[i] = cp;
    cp += cnt[i];
    tp += (cnt[i] + kBM - 1) / kBM;
  }
  if (tid == kGroupThreads - 1) {
    seg[S] = cp;
    toff[S] = tp;
  }
  __syncthreads();
  for (int64_t t = tid; t < T; t += kGroupThreads) {
    const int64_t a = load_idx(idx, idx64, t);
    if (a >= 0 && a < S) perm[atomicAdd(cur + a, 1)] = static_cast<int32_t>(t);
  }
}

__global__ void reduce_partials(const MultiLoraParams p, int64_t ksplit) {
  const int64_t total = p.n * p.T * p.r_max;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % p.r_max, t = (e / p.r_max) % p.T, sl = e / (p.r_max * p.T);
    const int64_t a = load_idx(p.idx, p.idx64, t);
    float s = 0.f;
    if (a >= 0 && a < p.S && j < rank_of(p, sl, a))
      for (int64_t z = 0; z < ksplit; ++z) s += p.u[z * total + e];
    p.u_out[e] = s;
  }
}

}  // namespace
}  // namespace multi

MultiLoraPlan multi_lora_plan(const MultiLoraParams& p, bool allow_split) {
  using namespace multi;
  MultiLoraPlan plan;
  plan.grouped = p.T > kUngroupedMaxT;
  plan.tiles = plan.grouped ? ceil_div(p.T, kBM) + std::min(p.S, p.T) : p.T;
  const int64_t rtiles = p.n * ceil_div(p.r_max, p.r_max <= 16 ? 16 : 64);
  int64_t ksplit = allow_split ? ceil_div(2 * static_cast<int64_t>(p.num_sms), plan.tiles * rtiles) : 1;
  ksplit = std::max<int64_t>(1, std::min<int64_t>({ksplit, 16, ceil_div(p.in, kKAlign)}));
  plan.kchunk = std::max<int64_t>(kKAlign, ceil_div(ceil_div(p.in, ksplit), kKAlign) * kKAlign);
  plan.ksplit = std::max<int64_t>(1, ceil_div(p.in, plan.kchunk));
  plan.ws_ints = plan.grouped ? p.T + 2 * (p.S + 1) + 2 * p.S : 1;
  return plan;
}

cudaError_t multi_lora(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int phases,
                       cudaStream_t stream) {
  using namespace multi;
  const bool shrink = phases & kMultiShrink, expand = phases & kMultiExpand;
  if (plan.grouped && (shrink || expand)) {
    const bool sm = p.S <= kSmemCountMax;
    group_tokens<<<1, kGroupThreads, sm ? 2 * p.S * sizeof(int) : 0, stream>>>(
        p.idx, p.idx64, p.T, p.S, p.ws, p.bad, sm);
  }
  if (shrink) launch_shrink(dt, p, plan, !plan.grouped, stream);
  if (phases & kMultiReduce) {
    const int64_t total = p.n * p.T * p.r_max;
    const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), 8 * static_cast<int64_t>(p.num_sms));
    if (blocks > 0) reduce_partials<<<blocks, 256, 0, stream>>>(p, plan.ksplit);
  }
  if (expand)
    launch_expand(dt, p, plan, shrink ? plan.ksplit : 1, !plan.grouped && !shrink, stream);
  return cudaGetLastError();
}

}  // namespace lora_ext::cuda
