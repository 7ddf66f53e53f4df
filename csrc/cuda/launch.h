// Host entry points of the CUDA kernels, torch-free: the .cpp launchers call these
// with raw pointers and the current stream; each returns the launch's cudaError_t.
// Built with -DLORA_EXT_EMU, <cuda_runtime.h> and friends are csrc/cuda/emu's CPU emulation.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "../dtype.h"
#include "../lowrank_job.h"

namespace lora_ext::cuda {

// Every kernel launch goes through LORA_EXT_LAUNCH(kernel, grid, block, smem, stream, args...):
// `kernel<<<grid, block, smem, stream>>>(args...)` under nvcc, the CPU emulator under
// LORA_EXT_EMU (which also records the launch site for its coverage report).
struct LaunchSite {
  const char* file;
  int line;
};
#if defined(LORA_EXT_EMU)
template <class... P, class... A>
inline void launch_kernel(LaunchSite site, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, A&&... args) {
  emu::launch(site.file, site.line, grid, block, smem, stream,
              [&] { kernel(static_cast<P>(args)...); });
}
#elif defined(__CUDACC__)
template <class... P, class... A>
inline void launch_kernel(LaunchSite, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
}
#endif
#define LORA_EXT_LAUNCH(...) \
  ::lora_ext::cuda::launch_kernel(::lora_ext::cuda::LaunchSite{__FILE__, __LINE__}, __VA_ARGS__)

// The single-adapter low-rank job of csrc/lowrank_job.h (seed in device memory). The shrink's
// split-K partials go to job.work (lowrank_workspace(job) floats, from shapes and job.num_sms
// only) and are summed in a fixed order, so results are bitwise deterministic.
int64_t lowrank_workspace(DType dt, const LowRankJob& job);
cudaError_t lowrank(DType dt, const LowRankJob& job, cudaStream_t stream);
// dst[t, :] = keep(t * width + k) * src[t, :] (src row stride ld, dst contiguous).
cudaError_t dropout_rows(DType dt, const void* src, int64_t ld, void* dst, int64_t T, int64_t width,
                         float p, const int64_t* seed, int num_sms, cudaStream_t stream);

// Merge kernels (merge_kernels.cu; element math in ../merge_math.h). W [P, Q] has row stride
// ld and gets S = L R, L [P, Rt] and R [Rt, Q] over the adapters' concatenated rank. The
// kernels read the factors where they lie: piece k covers the next `rank` rank indices j with
// L[p, j] = l[p * ls0 + j * ls1] and R[j, q] = r[j * rs0 + q * rs1] (element types lt, rt) and
// the side `scaled` (1: L, 2: R, 0: neither) multiplied by `scale` in fp32, so the factor from
// B is fl32(s * B) and the one from A is A, exactly as the CPU's operands (../merge_glue.h).
// More than kMaxPieces adapters (or factors that overlap W) come as one fp32 piece the
// launcher built. vec_r: R's rows are contiguous with 4-element aligned starts.
constexpr int kMaxPieces = 8;
struct FactorPiece {
  const void* l;
  const void* r;
  int64_t ls0, ls1, rs0, rs1, rank;
  float scale;
  int scaled;
  DType lt, rt;
  bool vec_r;
};
struct Factors {
  int n;       // pieces
  int64_t Rt;  // sum of their ranks
  FactorPiece pc[kMaxPieces];
};
// exact == false: W = merged(W, L R). exact == true (remerge_, W contiguous): the transition
// from the old factors (fo; fo.Rt == 0: W is W0, first merge, codes are written) to the new
// ones (f), codes/fails as described in merge_math.h.
struct MergeParams {
  void* w;
  int64_t P, Q, ld;
  Factors f, fo;
  uint32_t* codes;
  uint32_t* fails;
  int bits;
  bool exact;
  int num_sms;  // > 0: merges of total rank <= 32 may run the strip kernel (merge_kernels.cu)
};
cudaError_t merge(DType dt, const MergeParams& p, cudaStream_t stream);

// dora_norm (merge_kernels.cu; reduction order: ../dora_math.h): the norms of W + L R over `in`,
// which runs along Q (rows: one norm per row of W) or along P (one per column), L and R as for
// merge (f.Rt == 0: S = 0). chunks = ceil(in / 512); more than one: the partials go to ws
// [chunks, out] first and a second launch sums them in order.
struct DoraParams {
  const void* w;
  int64_t P, Q, ld;
  Factors f;
  float* out;
  float* ws;
  int64_t chunks;
  bool rows;
};
cudaError_t dora_norm(DType dt, const DoraParams& p, cudaStream_t stream);

// W.flat[idx[t]] = merged(vals[t], S at that element) for t < n (f.Rt == 0: vals[t]).
struct MergePointsParams {
  void* w;
  int64_t P, Q;
  const int64_t* idx;
  const void* vals;
  int64_t n;
  Factors f;
};
cudaError_t merge_points(DType dt, const MergePointsParams& p, cudaStream_t stream);
// counts[c] += number of i < n whose code_restores fails for code width code_width(c).
cudaError_t merge_code_failures(DType dt, const void* w0, const float* s, int64_t n,
                                unsigned long long* counts, int num_sms, cudaStream_t stream);

// multi_lora_ / lora_shrink / lora_expand_: one adapter per token (see multi_kernels.cu).
// Shapes as in csrc/multi_glue.h; pools contiguous, rows of x / y with strides ldx / ldy.
constexpr int kMultiMaxSlices = 8;
struct MultiLoraParams {
  void* y;
  const void* x;
  const void* A;           // [n, S, r_max, in]
  const void* B;           // [S, out, r_max]
  const void* idx;         // [T] int32 or int64
  const float* scales;     // [S] or [n, S]
  const int32_t* ranks;    // [S] or [n, S]
  int* bad;                // out-of-range index counter, or nullptr
  float* u;                // fp32 split-K partials [ksplit, n, T, r_max] (the given u: ksplit 1)
  float* u_out;            // lora_shrink's result [n, T, r_max]
  float u_scale;           // lora_shrink: u_out = u_scale * the sum of the partials
  int32_t* ws;             // int workspace of plan.ws_ints
  int64_t T, in, out, S, r_max, n, ldx, ldy, slot_stride;
  int64_t out_off[kMultiMaxSlices + 1];
  bool idx64;
  bool tc;                 // tensor-core tiles allowed (device is sm_80+)
  int num_sms;
};
// Launch plan, from shapes only (so the workspaces are graph-capture safe).
struct MultiLoraPlan {
  bool grouped;    // tokens sorted by adapter on the device (else one tile per adapter)
  int64_t tiles;   // upper bound of token tiles
  int64_t ksplit;  // split-K factor of the shrink (from `in` only)
  int64_t kchunk;  // K elements per split
  int64_t ws_ints; // int workspace size
  int64_t blocks;  // largest grid (blocks) of the launches; must stay below 2^31
};
enum MultiPhase : int { kMultiShrink = 1, kMultiExpand = 2, kMultiReduce = 4 };
MultiLoraPlan multi_lora_plan(const MultiLoraParams& p, bool allow_split);
// Output column tiles of all slices (expand grid).
int64_t expand_tiles(const MultiLoraParams& p);
cudaError_t multi_lora(DType dt, const MultiLoraParams& p, const MultiLoraPlan& plan, int phases,
                       cudaStream_t stream);

// Comma-separated SM architectures this binary holds code for (nvcc's __CUDA_ARCH_LIST__).
const char* compiled_archs();
// Multiprocessor count and compute capability (major * 10 + minor) of a device, cached.
int num_sms(int device);
int compute_capability(int device);
// Does the kernel image loaded for `device` (the current device) contain sm_80+ code? False when
// the device runs PTX of an older arch (e.g. a TORCH_CUDA_ARCH_LIST="7.5+PTX" build on an H200):
// that image has no tensor-core tiles.
bool tf32_mma_compiled(int device);

}  // namespace lora_ext::cuda
