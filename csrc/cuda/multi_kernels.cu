// Host side of multi_lora_ / lora_shrink / lora_expand_ on CUDA, plus the two small kernels:
//   group_tokens (one block of 1024 threads): stable counting sort of the tokens by adapter
//     with no host sync and no atomics on positions. Warp w owns a contiguous run of tokens
//     (read 8 x 32 indices at a time); pass 1 counts them per slot (__match_any_sync groups
//     the lanes of one slot, its lowest lane adds the group's size to the warp's own row
//     cnt[w][slot]); a block-wide scan over the slots gives each slot's first position and
//     first 64-token tile, from which the tile records are written (multi_kernels.cuh), and
//     each warp's start per slot; pass 2 walks the same tokens and places each at its start +
//     its rank among the earlier lanes of its group. perm therefore lists every slot's tokens
//     in ascending order. Indices outside -1 .. S-1 are skipped and added to the bad-index
//     counter. The GEMM-like kernels size their grids from the shape-only bound
//     tile_bound(T, S); blocks whose record says slot -1 exit at once.
//   reduce_partials: the sum of the split-K partials in the order z = 0, 1, ...; zero past a
//     token's rank and for tokens without a valid adapter (lora_shrink's result, or in place
//     for the expand of a grouped multi_lora_).
// Everything is sized from shapes, so a launch sequence can be captured in a CUDA graph and
// replayed with new indices, ranks and scales.
#include <algorithm>

#include "multi_kernels.cuh"

namespace lora_ext::cuda {
namespace multi {
namespace {

constexpr int kGroupThreads = 1024;
constexpr int kGroupWarps = kGroupThreads / 32;
constexpr int kIdxBatch = 8;  // index loads a lane issues at once (32 tokens each)

// av[i] = idx[t + 32 i] for t + 32 i < t1, else -1; all loads issued before any is used.
__device__ __forceinline__ void load_indices(const void* idx, bool idx64, int t, int t1,
                                             int64_t (&av)[kIdxBatch]) {
#pragma unroll
  for (int i = 0; i < kIdxBatch; ++i) av[i] = t + 32 * i < t1 ? load_idx(idx, idx64, t + 32 * i) : -1;
}

__global__ void __launch_bounds__(kGroupThreads)
    group_tokens(const void* idx, bool idx64, int T, int S, int32_t* ws, int* bad) {
  __shared__ int warp_c[32], warp_t[32], total_tiles;
  const int bound = static_cast<int>(tile_bound(T, S));
  int32_t* tiles = ws;  // [bound][4]: slot, start, tokens, the slot's tokens
  int32_t* perm = ws + 4 * bound;
  int32_t* cnt = perm + T;  // [kGroupWarps][S]: counts, then each warp's next position
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per_warp = (T + 32 * kGroupWarps - 1) / (32 * kGroupWarps) * 32;
  const int t0 = warp * per_warp, t1 = min(T, t0 + per_warp);
  int32_t* mine = cnt + warp * S;
  const unsigned below = (1u << lane) - 1u;

  for (int i = lane; i < S; i += 32) mine[i] = 0;
  __syncwarp();
  int nbad = 0;
  for (int b0 = t0; b0 < t1; b0 += 32 * kIdxBatch) {
    int64_t av[kIdxBatch];
    load_indices(idx, idx64, b0 + lane, t1, av);
#pragma unroll
    for (int i = 0; i < kIdxBatch; ++i) {
      if (b0 + i * 32 >= t1) break;  // warp-uniform
      const int64_t a = av[i];
      const bool ok = a >= 0 && a < S;
      if (b0 + i * 32 + lane < t1 && !ok && a != -1) ++nbad;
      const unsigned peers = __match_any_sync(0xffffffffu, ok ? static_cast<unsigned>(a) : ~0u);
      if (ok && (peers & below) == 0) mine[a] += __popc(peers);
      __syncwarp();
    }
  }
  if (nbad > 0 && bad != nullptr) atomicAdd(bad, nbad);
  __syncthreads();

  // Block-wide exclusive scan of (tokens, tiles) over contiguous chunks of slots.
  const int chunk = (S + kGroupThreads - 1) / kGroupThreads;
  const int b = min(S, tid * chunk), e = min(S, b + chunk);
  int cs = 0, ts = 0;
  for (int i = b; i < e; ++i) {
    int c = 0;
    for (int w = 0; w < kGroupWarps; ++w) c += cnt[w * S + i];
    cs += c;
    ts += (c + kBM - 1) / kBM;
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
  for (int i = b; i < e; ++i) {
    const int first = cp;
    for (int w = 0; w < kGroupWarps; ++w) {  // counts -> each warp's first position
      const int c = cnt[w * S + i];
      cnt[w * S + i] = cp;
      cp += c;
    }
    const int n = cp - first;
    for (int k = 0; k * kBM < n; ++k, ++tp) {
      int32_t* rec = tiles + 4 * tp;
      rec[0] = i;
      rec[1] = first + k * kBM;
      rec[2] = min(kBM, n - k * kBM);
      rec[3] = n;
    }
  }
  if (tid == kGroupThreads - 1) total_tiles = tp;
  __syncthreads();
  for (int k = total_tiles + tid; k < bound; k += kGroupThreads) {  // no tile: slot -1
    int32_t* rec = tiles + 4 * k;
    rec[0] = -1;
    rec[1] = rec[2] = rec[3] = 0;
  }
  for (int b0 = t0; b0 < t1; b0 += 32 * kIdxBatch) {
    int64_t av[kIdxBatch];
    load_indices(idx, idx64, b0 + lane, t1, av);
#pragma unroll
    for (int i = 0; i < kIdxBatch; ++i) {
      if (b0 + i * 32 >= t1) break;  // warp-uniform
      const int64_t a = av[i];
      const bool ok = a >= 0 && a < S;
      const unsigned peers = __match_any_sync(0xffffffffu, ok ? static_cast<unsigned>(a) : ~0u);
      const int leader = __ffs(peers) - 1;
      int pos = 0;
      if (ok && lane == leader) {
        pos = mine[a];
        mine[a] = pos + __popc(peers);
      }
      pos = __shfl_sync(0xffffffffu, pos, leader) + __popc(peers & below);
      if (ok) perm[pos] = b0 + i * 32 + lane;
      __syncwarp();
    }
  }
}

// out[e] = scale * sum over z of u[z * total + e] (fixed order), zero where no adapter row
// applies. out may be u itself (each element is read before it is written, by the same thread).
__global__ void reduce_partials(const MultiLoraParams p, int64_t ksplit, float* out, float scale) {
  const int64_t total = p.n * p.T * p.r_max;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % p.r_max, t = (e / p.r_max) % p.T, sl = e / (p.r_max * p.T);
    const int64_t a = load_idx(p.idx, p.idx64, t);
    const float s =
        a >= 0 && a < p.S && j < rank_of(p, sl, a) ? sum_partials(p.u + e, total, ksplit) : 0.f;
    out[e] = scale == 1.f ? s : scale * s;
  }
}

}  // namespace
}  // namespace multi

int64_t expand_tiles(const MultiLoraParams& p) {
  int64_t n = 0;
  for (int64_t i = 0; i < p.n; ++i) n += ceil_div(p.out_off[i + 1] - p.out_off[i], multi::kBNE);
  return n;
}

MultiLoraPlan multi_lora_plan(const MultiLoraParams& p, bool allow_split) {
  using namespace multi;
  MultiLoraPlan plan;
  plan.grouped = p.T > kUngroupedMaxT;
  plan.tiles = plan.grouped ? tile_bound(p.T, p.S) : p.T;
  // K chunks from `in` alone (<= kMaxSplits multiples of kKAlign): a token's sums do not
  // depend on the batch.
  plan.kchunk = allow_split ? std::max<int64_t>(
                                  kKAlign, ceil_div(ceil_div(p.in, kMaxSplits), kKAlign) * kKAlign)
                            : std::max<int64_t>(1, p.in);
  plan.ksplit = std::max<int64_t>(1, ceil_div(p.in, plan.kchunk));
  plan.ws_ints = plan.grouped ? 4 * plan.tiles + p.T + kGroupWarps * p.S : 1;
  const int64_t rtiles = p.n * ceil_div(p.r_max, p.r_max <= 16 ? 16 : 64);
  plan.blocks = plan.tiles * std::max(rtiles, expand_tiles(p));
  return plan;
}

cudaError_t multi_lora(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int phases,
                       cudaStream_t stream) {
  using namespace multi;
  const bool shrink = phases & kMultiShrink, expand = phases & kMultiExpand;
  // decode, T <= 8 and a small shrink: one launch, the expand computes u itself (every tile
  // streams; its u must fit one staging pass)
  if (shrink && expand && !(phases & kMultiReduce) && p.T <= kSkinny && p.r_max <= kUChunk &&
      p.r_max * p.in <= kFusedMaxWork) {
    launch_expand(dt, p, plan, plan.ksplit, true, true, stream);
    return cudaGetLastError();
  }
  if (plan.grouped && (shrink || expand)) {
    LORA_EXT_LAUNCH(group_tokens, 1, kGroupThreads, 0, stream, p.idx, p.idx64,
                    static_cast<int>(p.T), static_cast<int>(p.S), p.ws, p.bad);
  }
  if (shrink) launch_shrink(dt, p, plan, !plan.grouped, stream);
  // Grouped expands read the summed u (one pass) rather than summing the partials per output
  // tile; both add in the same order, so the bits are the same either way.
  const bool reduce =
      (phases & kMultiReduce) || (shrink && expand && plan.grouped && plan.ksplit > 1);
  if (reduce) {
    const int64_t total = p.n * p.T * p.r_max;
    const int64_t blocks =
        std::min<int64_t>(ceil_div(total, 256), 8 * static_cast<int64_t>(p.num_sms));
    if (blocks > 0)
      LORA_EXT_LAUNCH(reduce_partials, blocks, 256, 0, stream, p, plan.ksplit,
                      p.u_out ? p.u_out : p.u, p.u_out ? p.u_scale : 1.f);
  }
  if (expand)
    launch_expand(dt, p, plan, shrink && !reduce ? plan.ksplit : 1, !plan.grouped && !shrink,
                  false, stream);
  return cudaGetLastError();
}

}  // namespace lora_ext::cuda
